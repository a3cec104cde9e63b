"""SegmentationRecipe through every door, on original files: fit / evaluate / predict /
predict_masks / save -> load / the CLI / the exported SavedModel (bytes in, PNG masks out),
for a binary 3-channel task and a multi-class 1-channel task with an ignore_index."""

import base64
import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import restransfer as rt
from restransfer import cli
from restransfer.models import stages
from restransfer.tasks.base import load
from restransfer.tasks.segmentation import SegmentationRecipe
from restransfer.training.phases import Phase

from conftest import REPO, write_pairs

WIDTHS = (16, 16, 8, 8, 8)  # small decoders: the behaviour, not the capacity


CASES = {
    "binary-rgb": dict(channels=3, classes=2, ignore=None, class_names=["background", "lesion"]),
    "multiclass-gray-ignore": dict(channels=1, classes=3, ignore=255, class_names=["background", "a", "b"]),
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def trained(request, tmp_path_factory):
    case = CASES[request.param]
    out = tmp_path_factory.mktemp(request.param)
    folder = write_pairs(out / "data", 12, case["channels"], case["classes"], seed=case["classes"],
                         ignore=case["ignore"])
    recipe = SegmentationRecipe(backbone="resnet18", weights=None, image_size=32, channels=case["channels"],
                                class_names=case["class_names"], ignore_index=case["ignore"], batch_size=6,
                                decoder_widths=WIDTHS, early_stopping_patience=None, seed=1,
                                phases=[Phase("all", epochs=2, lr=1e-2)])  # the plan's phases: see below
    history = recipe.fit(str(folder), verbose=0)
    files = sorted((folder / "val" / "images").iterdir())
    path = recipe.save(out / "model.keras")
    export_dir = recipe.export(out / "export", warmup_images=files[:2])
    return recipe, history, folder, files, path, export_dir, case


def test_fit_evaluate_predict_and_masks_at_each_images_size(trained):
    recipe, history, folder, files, _, _, case = trained
    assert history.epochs == 2 and {"dice", "val_dice", "loss"} <= set(history.history)
    probabilities = recipe.predict(files)
    assert probabilities.shape == (len(files), 32, 32, 1 if case["classes"] == 2 else case["classes"])
    masks = recipe.predict_masks(files)
    for mask, path in zip(masks, files):
        with Image.open(path) as image:
            assert mask.shape == (image.height, image.width) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= set(range(case["classes"]))
    figures = recipe.evaluate(str(folder / "val"), bootstrap=50)
    assert set(figures["per_class"]) == set(case["class_names"])
    for key in ("dice", "iou", "dataset_dice", "dataset_iou"):
        assert 0 <= figures[key] <= 1
    low, high = figures["dice_ci95"]
    assert low <= figures["dice"] <= high
    assert "both empty" in figures["empty_rule"]
    assert ("pixel_sensitivity" in figures) == (case["classes"] == 2)
    # the figures are those of predict_masks' own decisions, ignored pixels left out
    truths = [rt.data.read_mask(p) for p in sorted((folder / "val" / "masks").iterdir())]
    hits = sum(int(((m == 1) & (t == 1)).sum()) for m, t in zip(masks, truths))
    total = sum(int((m == 1).sum() + (t == 1).sum()) for m, t in zip(masks, truths))
    name = case["class_names"][1]
    assert figures["per_class"][name]["dataset_dice"] == pytest.approx(2 * hits / total if total else float("nan"))


def test_save_load_gives_the_same_masks_and_figures(trained):
    recipe, _, folder, files, path, _, case = trained
    reloaded = load(path)
    assert isinstance(reloaded, SegmentationRecipe) and reloaded.class_names == case["class_names"]
    assert reloaded.ignore_index == case["ignore"] and reloaded.channels == case["channels"]
    for a, b in zip(recipe.predict_masks(files), reloaded.predict_masks(files)):
        np.testing.assert_array_equal(a, b)
    assert reloaded.evaluate(str(folder / "val"), bootstrap=0)["dice"] == pytest.approx(
        recipe.evaluate(str(folder / "val"), bootstrap=0)["dice"])


def test_the_served_masks_are_predict_masks_on_original_files(trained):
    recipe, _, _, files, _, export_dir, case = trained
    signatures = tf.saved_model.load(str(export_dir)).signatures
    # as TF Serving's REST API carries bytes: {"b64": ...} in, and the *_bytes output back as b64
    body = json.dumps({"instances": [{"b64": base64.b64encode(p.read_bytes()).decode()} for p in files]})
    strings = tf.constant([base64.standard_b64decode(item["b64"]) for item in json.loads(body)["instances"]])
    served = signatures["serving_default"](image_bytes=strings)
    assert served["probabilities"].shape[1:3] == (32, 32)
    np.testing.assert_allclose(served["probabilities"].numpy(), recipe.predict(files), atol=1e-5)
    for png, mask, size in zip(served["mask_png_bytes"].numpy(), recipe.predict_masks(files),
                               served["mask_sizes"].numpy()):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), mask)
        assert tuple(size) == mask.shape
    pixels = rt.data.load_image(files[0], case["channels"])
    by_pixels = signatures["predict_images"](images=tf.constant(pixels[None], tf.float32))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(by_pixels["mask_png_bytes"].numpy()[0]))),
                                  recipe.predict_masks([files[0]])[0])
    card = json.loads((export_dir / "assets.extra" / "model_card.json").read_text())
    assert card["classes"] == case["class_names"] and card["task"] == "segmentation"
    assert "own size" in card["outputs"]["mask_png_bytes"] and card["export_parity_images"] == 2
    assert (card["decision"]["threshold"] == 0.5) == (case["classes"] == 2)


def test_cli_predict_writes_a_mask_and_an_overlay_per_file_and_evaluate_scores(trained, tmp_path, capsys):
    recipe, _, folder, files, path, _, case = trained
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    code = cli.main(["predict", str(path), *map(str, files[:2]), str(bad), "--out", str(tmp_path / "out"), "--json"])
    out, err = capsys.readouterr()
    assert code == 1  # one file failed: said, and the others answered
    assert f"{bad}: not an image" in err and "Traceback" not in err
    answer = json.loads(out)
    assert [item["image"] for item in answer["failed"]] == [str(bad)]
    for item, file, expected in zip(answer["results"], files, recipe.predict_masks(files[:2])):
        written = np.asarray(Image.open(item["mask"]))
        np.testing.assert_array_equal(written, expected)
        assert Image.open(item["overlay"]).size == Image.open(file).size
        assert item["mask"].startswith(str(tmp_path / "out")) and " " not in item["mask"].rsplit("/", 1)[1]
    assert cli.main(["evaluate", str(path), "--data", str(folder / "val"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dice"] == pytest.approx(recipe.evaluate(str(folder / "val"))["dice"])


def test_the_decoder_phase_trains_the_decoder_and_the_encoders_batchnorm_only(tmp_path):
    folder = write_pairs(tmp_path / "data", 6, 3, 2, seed=5)
    recipe = SegmentationRecipe(backbone="resnet18", weights=None, image_size=32, batch_size=6, decoder_widths=WIDTHS,
                                class_names=["background", "thing"], early_stopping_patience=None,
                                phases=rt.preset("two_phase", epochs=4)[:1])
    model = recipe.build()
    encoder = stages.find_backbone(model)
    kernel = np.copy(encoder.get_layer("conv1_conv").kernel.numpy())
    moving = np.copy(encoder.get_layer("conv1_bn").moving_mean.numpy())
    decoder = np.copy(model.get_layer("decoder1_1_conv").kernel.numpy())
    recipe.fit(str(folder), verbose=0)
    assert stages.trainable_stages(model) == []
    np.testing.assert_array_equal(encoder.get_layer("conv1_conv").kernel.numpy(), kernel)
    assert not np.allclose(encoder.get_layer("conv1_bn").moving_mean.numpy(), moving)  # train_bn
    assert not np.allclose(model.get_layer("decoder1_1_conv").kernel.numpy(), decoder)


def test_segmentation_presets_train_every_stage_at_one_rate_and_classification_keeps_its_own(tmp_path):
    """The task chooses the presets' discriminative factor (restransfer.tasks.registry), and the
    Python API and a recipe file agree: segmentation's full phase trains every stage at one rate
    (discriminative rates cost 0.054 per-image Dice on a held-out part of Kvasir-SEG's train), classification's at 0.4."""
    from restransfer.cli.config import load_recipe
    from restransfer.cli.runs import recipe_from_config

    by_python = {
        "segmentation default": SegmentationRecipe(backbone="resnet18", weights=None).phases,
        "segmentation two_phase": SegmentationRecipe(backbone="resnet18", weights=None, phases="two_phase").phases,
        "classification default": rt.ClassificationRecipe(backbone="resnet18", weights=None).phases,
        "medical two_phase": rt.MedicalImagingRecipe(backbone="resnet18", weights=None, phases="two_phase").phases,
    }
    assert {name: [p.lr_mult for p in phases] for name, phases in by_python.items()} == {
        "segmentation default": [1.0, 1.0], "segmentation two_phase": [1.0, 1.0],
        "classification default": [1.0, 0.4], "medical two_phase": [1.0, 0.4]}
    full = by_python["segmentation default"][-1]
    assert set(full.stage_learning_rates().values()) == {full.lr}, "one rate for every stage"

    (tmp_path / "masks").mkdir()  # the recipe's own data need not be here: only its phases are read
    config, _ = load_recipe(REPO / "recipes" / "kvasir_seg.yaml",
                            ["backbone.weights=null", f"data.source={tmp_path / 'masks'}"])
    by_file = recipe_from_config(config)
    assert [p.lr_mult for p in by_file.phases] == [1.0, 1.0] and sum(p.epochs for p in by_file.phases) == 12
    explicit = tmp_path / "explicit.yaml"  # a phase written out keeps what it says
    explicit.write_text("task: segmentation\nbackbone: {name: resnet18, weights: null}\n"
                        "data: {source: masks}\nsegmentation: {classes: [background, polyp]}\n"
                        "fine_tune: [{trainable: all, epochs: 1, lr_mult: 0.5}]\n")
    assert [p.lr_mult for p in load_recipe(explicit)[0].phases()] == [0.5]


@pytest.mark.parametrize("backbone", rt.list_backbones())
def test_every_backbone_segments_at_a_size_that_is_no_multiple_of_32(backbone):
    one_channel = backbone in ("resnet34", "resnet101", "resnet50v2", "resnet152v2")  # half with the summed stem
    recipe = SegmentationRecipe(backbone=backbone, weights=None, image_size=40, channels=1 if one_channel else 3,
                                stem="sum" if one_channel else "replicate", class_names=["bg", "a", "b"],
                                decoder_widths=WIDTHS)
    model = recipe.build()
    assert model.output_shape == (None, 40, 40, 3)
    stages.freeze(model, up_to="stage3")
    assert stages.trainable_stages(model) == ["stage4"]


def test_the_multi_worker_loop_trains_a_segmenter():
    """restransfer's own loop (what MultiWorkerMirroredStrategy runs; here the default strategy)
    takes the segmentation objective as it takes classification's: per-image losses, the Dice
    metric on gathered masks."""
    from restransfer.training import distribute
    from restransfer.training.objectives import SegmentationObjective
    from restransfer.training.optimizers import make_optimizer

    recipe = SegmentationRecipe(backbone="resnet18", weights=None, image_size=32, class_names=["bg", "a", "b"],
                                decoder_widths=WIDTHS, ignore_index=255)
    model = recipe.build()
    objective = SegmentationObjective(3, ignore_index=255)
    phase = Phase("all", epochs=2, lr=1e-2, schedule="constant")
    objective.compile(model, make_optimizer(model, phase, 2), phase)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    masks = rng.integers(0, 3, (8, 32, 32)).astype("uint8")
    masks[:, 0] = 255
    batches = tf.data.Dataset.from_tensor_slices((images, masks)).batch(4)
    loss, metrics = objective.loss_and_metrics(phase)
    history = distribute.fit_multi_worker(
        tf.distribute.get_strategy(), model, batches.repeat(), loss=loss, metrics=metrics, validation_data=batches,
        val_metrics=objective.loss_and_metrics()[1], epochs=2, initial_epoch=0, steps_per_epoch=2, verbose=0)
    assert {"loss", "dice", "val_loss", "val_dice"} <= set(history.history)
    assert np.isfinite(history.history["loss"]).all() and history.history["loss"][1] < history.history["loss"][0]
