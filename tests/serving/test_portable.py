"""LiteRT and ONNX exports, each run in its own runtime (ai_edge_litert's interpreter,
onnxruntime) against the Keras model on original held-out files passed through the
reference preprocessing: a 3-channel classifier, a 1-channel medical classifier with a
threshold rule, and a segmentation model; int8 reports what it costs; what a runtime cannot
represent is refused."""

import json

import numpy as np
import pytest

import restransfer as rt
from restransfer import Phase
from restransfer.models.decision import DecisionRule
from restransfer.models.heads import find_head
from restransfer.models.precision import float32_twin
from restransfer.serving import portable

from conftest import write_image, write_pairs

pytest.importorskip("ai_edge_litert", reason="the deploy extra (ai-edge-litert) is not installed")
pytest.importorskip("onnxruntime", reason="the deploy extra (onnxruntime) is not installed")


def labelled_folder(root, channels):
    rng = np.random.default_rng(channels)
    for split, count in (("train", 8), ("val", 6)):
        for label, (low, high) in (("bright", (150, 255)), ("dark", (0, 105))):
            for i in range(count):
                size = int(rng.integers(30, 50))
                pixels = rng.integers(low, high, (size, size + 5, 3), dtype=np.uint8)
                write_image(root / split / label / f"{label}{i}.{'png' if i % 2 else 'jpg'}",
                            pixels if channels == 3 else pixels[..., 0])
    return root


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    out = tmp_path_factory.mktemp("portable")
    made = {}
    # the RGB classifier is trained as on a GPU (mixed_float16): its portable files are made from
    # its float32 twin (the converters have no 16-bit kernels)
    for name, cls, channels, extra in (("rgb", rt.ClassificationRecipe, 3, {"precision": "mixed_float16"}),
                                        ("gray-medical", rt.MedicalImagingRecipe, 1, {"positive_class": "dark"})):
        folder = labelled_folder(out / name, channels)
        recipe = cls(backbone="resnet18", weights=None, image_size=32, channels=channels, batch_size=8, seed=1,
                     augmentation="none", early_stopping_patience=None, phases=[Phase("head", epochs=2, lr=0.02)],
                     **extra)
        recipe.fit(str(folder), verbose=0)
        if name == "gray-medical":  # a threshold that decides otherwise than argmax on some images
            probabilities = recipe.predict_dataset(str(folder / "val"))[:, 1]
            find_head(recipe.model).set_decision(DecisionRule("threshold", positive_class="dark",
                                                              threshold=float(np.quantile(probabilities, 0.75))))
        made[name] = (recipe, folder, out / name)
    return made


@pytest.mark.parametrize("fmt", ["litert", "onnx"])
@pytest.mark.parametrize("name", ["rgb", "gray-medical"])
def test_a_portable_classifier_agrees_with_keras_in_its_runtime(classifiers, name, fmt):
    recipe, folder, out = classifiers[name]
    val = rt.data.image_folder(folder / "val", class_names=recipe.class_names, channels=recipe.channels, progress=False)
    directory = recipe.export(out / fmt, format=fmt, heldout=val)
    blob = (directory / portable.FILE_NAMES[fmt]).read_bytes()
    pixels = np.stack([portable.reference_pixels(p, 32, recipe.channels) for p in val.paths])
    served = portable.RUNTIMES[fmt](blob, pixels)
    keras_probabilities = float32_twin(recipe.model).predict(pixels, verbose=0)
    np.testing.assert_allclose(served["probabilities"], keras_probabilities, atol=portable.TOLERANCE)
    decided = np.asarray(recipe.decision.decide(keras_probabilities, recipe.class_names))
    np.testing.assert_array_equal(served["predictions"], decided)  # the decision rule is in the file
    card = json.loads((directory / "assets.extra" / "model_card.json").read_text())
    trained = recipe.model.predict(pixels, verbose=0)
    if name == "gray-medical":
        assert not np.array_equal(decided, keras_probabilities.argmax(axis=1)), "the threshold changes decisions"
        assert card["precision"] == {"trained_compute_dtypes": ["float32"], "converted": "float32"}
        np.testing.assert_array_equal(trained, keras_probabilities)  # a float32 model is its own twin
    else:  # the twin is the trained model up to float16 rounding, and the card says by how much
        assert "float16" in card["precision"]["trained_compute_dtypes"]
        gap = card["precision"]["max_abs_diff_probabilities_vs_trained"]
        assert 0 < gap < 0.01 and np.abs(trained - served["probabilities"]).max() <= gap + portable.TOLERANCE
    assert card["input"]["shape"] == f"[N, 32, 32, {recipe.channels}]" and "0-255" in card["input"]["range"]
    assert card["parity"]["decision_agreement"] == 1.0 and card["parity"]["max_abs_diff_probabilities"] <= 1e-4
    assert card["input"]["reference_vs_restransfer_decoder"]["max_abs_pixel"] < 4.0  # a client's Pillow resize
    assert (directory / "assets" / "labels.txt").read_text().split() == recipe.class_names


def test_int8_says_what_it_costs_and_a_drop_past_the_bound_is_refused(classifiers, capsys):
    recipe, folder, out = classifiers["rgb"]
    val = rt.data.image_folder(folder / "val", class_names=recipe.class_names, progress=False)
    train = rt.data.image_folder(folder / "train", class_names=recipe.class_names, progress=False)
    directory = recipe.export(out / "int8", format="litert", quantization="int8", heldout=val, representative=train,
                              max_metric_drop=1.0)
    card = json.loads((directory / "assets.extra" / "model_card.json").read_text())
    figures = card["heldout_figures"]
    assert set(figures["keras"]) == set(figures["litert"]) == {"accuracy", "auc"}
    assert card["quantization"] == "int8" and 0 <= card["parity"]["decision_agreement"] <= 1
    float32_bytes = 4 * recipe.model.count_params()
    assert card["file_bytes"] < 0.4 * float32_bytes, "int8 weights take a quarter of float32's"
    with pytest.raises(portable.PortableExportError, match="drops by .* nothing was exported"):
        recipe.export(out / "strict", format="litert", quantization="int8", heldout=val, representative=train,
                      max_metric_drop=-1.0)
    assert not list((out / "strict").rglob("*.tflite")), "a refused export leaves no version"
    kept = recipe.export(out / "lenient", format="litert", quantization="float16", heldout=val, max_metric_drop=-1.0,
                         allow_drop=True)
    assert (kept / "model.tflite").is_file() and "warning:" in capsys.readouterr().out


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    out = tmp_path_factory.mktemp("portable_segmenter")
    folder = write_pairs(out / "pairs", 6, 3, 2, seed=3)
    recipe = rt.SegmentationRecipe(backbone="resnet18", weights=None, image_size=32, batch_size=6,
                                   class_names=["background", "lesion"], decoder_widths=(16, 16, 8, 8, 8),
                                   early_stopping_patience=None, phases=[Phase("all", epochs=1, lr=0.01)])
    recipe.fit(str(folder), verbose=0)
    return recipe, folder, out


@pytest.mark.parametrize("fmt", ["litert", "onnx"])
def test_a_portable_segmenter_decides_the_masks_keras_decides(segmenter, fmt):
    recipe, folder, out = segmenter
    directory = recipe.export(out / fmt, format=fmt, heldout=str(folder / "val"))
    files = sorted((folder / "val" / "images").iterdir())
    pixels = np.stack([portable.reference_pixels(p, 32, 3) for p in files])
    served = portable.RUNTIMES[fmt]((directory / portable.FILE_NAMES[fmt]).read_bytes(), pixels)
    keras_probabilities = recipe.model.predict(pixels, verbose=0)
    np.testing.assert_allclose(served["probabilities"], keras_probabilities, atol=portable.TOLERANCE)
    np.testing.assert_array_equal(served["predictions"], np.asarray(recipe.decision.decide(keras_probabilities)))
    card = json.loads((directory / "assets.extra" / "model_card.json").read_text())
    assert "dataset_dice_at_model_size" in card["heldout_figures"]["keras"]


def test_what_a_runtime_cannot_represent_is_refused_with_a_clear_error():
    import tensorflow as tf

    def strings_in_the_graph(pixels):  # string ops exist in no LiteRT builtin kernel set
        return {"probabilities": tf.reduce_mean(pixels, axis=[1, 2]),
                "predictions": tf.strings.to_number(tf.strings.as_string(tf.reduce_max(pixels, axis=[1, 2, 3])))}

    with pytest.raises(portable.PortableExportError, match="LiteRT cannot represent this model"):
        portable.to_litert(strings_in_the_graph, 32, 3)
    with pytest.raises(ValueError, match="quantization must be one of"):
        portable.export_portable(None, "x", format="onnx", quantization="int8", heldout=[])
