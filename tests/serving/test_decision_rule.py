"""The decision rule travels with the model: the threshold, positive class, temperature,
per-label thresholds and test-time views stored in the head are what ``predict_labels``, a
reloaded recipe, the CLI's ``predict --json`` and the SavedModel's ``predictions`` apply, on
original image files."""

import io
import json
import textwrap
from contextlib import redirect_stdout

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import restransfer as rt
from restransfer import cli
from restransfer.models.decision import DecisionRule
from restransfer.models.heads import find_head

from conftest import scans_npz


def image_files(folder, channels, count=10):
    """PNG and JPEG files of varied content (so probabilities spread around any threshold)."""
    rng = np.random.default_rng(channels)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        y, x = np.mgrid[0:40, 0:52]
        pixels = np.stack([x * (i + 1) % 256, y * (9 - i) % 256, (x * y) % 256], -1).astype(np.uint8)
        pixels[rng.integers(0, 30):, rng.integers(0, 40):] = rng.integers(0, 255, 3)
        image = Image.fromarray(pixels).convert("L" if channels == 1 else "RGB")
        path = folder / f"image{i}.{'png' if i % 2 else 'jpg'}"
        image.save(path)
        paths.append(path)
    return paths


# (recipe class, classes, multi-label, channels, rule maker, temperature, test-time views)
CASES = {
    "binary-threshold-temperature-gray": (rt.MedicalImagingRecipe, ["normal", "lesion"], False, 1, "threshold", 2.5, False),
    "binary-threshold-tta-rgb": (rt.MedicalImagingRecipe, ["lesion", "normal"], False, 3, "threshold", 1.0, True),
    "multi-label-thresholds": (rt.ClassificationRecipe, ["a", "b", "c"], True, 3, "per_label", 0.7, False),
    "argmax-3-classes": (rt.ClassificationRecipe, ["x", "y", "z"], False, 3, "argmax", 1.0, False),
}


def _threshold_unlike_one_half(scores):
    """The threshold on one class's (or label's) scores that decides some image unlike the cut at
    0.5 (argmax, for two classes) and lies farthest from every score (so float noise between doors
    cannot flip a decision): the middle of the widest gap between neighbouring scores that is not
    the gap around 0.5."""
    edges = np.concatenate([[0.0], np.sort(scores), [1.0]])
    candidates = [((high - low) / 2, (low + high) / 2) for low, high in zip(edges[:-1], edges[1:])
                  if not low <= 0.5 <= high]
    margin, threshold = max(candidates)
    assert margin > 1e-4, f"these images' scores leave no threshold clear of them: {np.sort(scores)}"
    return float(threshold)


def _rule(kind, class_names, probabilities, tta):
    """A rule whose decisions differ from argmax / 0.5 on some of these images (``probabilities``
    are what the rule will decide on: test-time-averaged when ``tta``)."""
    if kind == "threshold":
        positive = class_names[0]
        return DecisionRule("threshold", positive_class=positive, test_time_augmentation=tta,
                            threshold=_threshold_unlike_one_half(probabilities[:, 0]),
                            chosen_on={"split": "val", "images": 10, "method": "test"})
    if kind == "per_label":
        return DecisionRule("per_label", thresholds=[_threshold_unlike_one_half(probabilities[:, j])
                                                     for j in range(len(class_names))])
    return DecisionRule("argmax", test_time_augmentation=tta)


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def doors(request, tmp_path_factory):
    recipe_class, class_names, multi_label, channels, kind, temperature, tta = CASES[request.param]
    out = tmp_path_factory.mktemp(request.param)
    files = image_files(out / "images", channels)
    recipe = recipe_class(backbone="resnet18", weights=None, image_size=32, channels=channels,
                          class_names=class_names, multi_label=multi_label, seed=3)
    recipe.build()
    head = find_head(recipe.model)
    head.temperature.assign(temperature)
    if tta:  # the rule will decide on test-time-averaged probabilities: choose it on those
        head.set_decision(DecisionRule("argmax", test_time_augmentation=True))
    head.set_decision(_rule(kind, class_names, recipe.predict(files), tta))
    path = recipe.save(out / "model.keras")
    export_dir = recipe.export(out / "export", warmup_images=files[:3])
    return recipe, path, export_dir, files, kind


def test_every_door_decides_alike_on_original_files(doors):
    recipe, path, export_dir, files, kind = doors
    probabilities = recipe.predict(files)
    decided = recipe.predict_labels(files)
    # the rule is really applied: not what argmax / 0.5 would say on every image
    if kind == "threshold":
        assert decided != [recipe.class_names[i] for i in probabilities.argmax(1)]
    if kind == "per_label":
        assert decided != [[n for n, p in zip(recipe.class_names, row) if p >= 0.5] for row in probabilities]

    for loader in (rt.ClassificationRecipe, rt.MedicalImagingRecipe):
        reloaded = loader.load(path)
        np.testing.assert_allclose(reloaded.predict(files), probabilities, atol=1e-6)
        assert reloaded.predict_labels(files) == decided
        assert reloaded.decision == recipe.decision

    served = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    outputs = served(image_bytes=tf.constant([p.read_bytes() for p in files]))
    np.testing.assert_allclose(outputs["probabilities"].numpy(), probabilities, atol=1e-5)
    names = [n.decode() for n in outputs["prediction_names"].numpy()]
    assert names == [d if isinstance(d, str) else ",".join(d) for d in decided]

    stdout = io.StringIO()
    with redirect_stdout(stdout):
        assert cli.main(["predict", str(path), "--json", *map(str, files)]) == 0
    answer = json.loads(stdout.getvalue())
    assert [item["decision"] for item in answer["results"]] == decided
    assert answer["decision_rule"] == recipe.decision.describe()


def test_the_model_card_states_the_rule(doors):
    recipe, _, export_dir, _, kind = doors
    card = json.loads((export_dir / "assets.extra" / "model_card.json").read_text())
    assert card["decision"]["rule"] == kind
    assert card["decision"]["threshold"] == recipe.decision.threshold
    assert "prediction_names" in card["outputs"]
    assert card["test_time_augmentation"].startswith("served") == recipe.decision.test_time_augmentation
    if kind == "threshold":
        assert f"{recipe.decision.threshold:.4g}" in (export_dir / "assets.extra" / "MODEL_CARD.md").read_text()


def test_a_rule_that_does_not_fit_the_classes_is_refused():
    recipe = rt.ClassificationRecipe(backbone="resnet18", weights=None, image_size=32, class_names=["a", "b", "c"])
    recipe.build()
    with pytest.raises(ValueError, match="2 classes"):
        find_head(recipe.model).set_decision(DecisionRule("threshold", positive_class="a", threshold=0.3))
    with pytest.raises(ValueError, match="single-label"):
        find_head(recipe.model).set_decision(DecisionRule("per_label", thresholds=[0.5] * 3))


def test_a_medical_npz_run_exports_and_serves_its_chosen_threshold(tmp_path):
    """task: medical on a MedMNIST-style 1-channel .npz of 28x28 images, export on: exit 0, and
    the served decision is predict's on every test image, at the threshold the card names."""
    arrays = scans_npz(tmp_path / "scans.npz")
    recipe_file = tmp_path / "scans.yaml"
    recipe_file.write_text(textwrap.dedent(f"""\
        task: medical
        backbone: {{name: resnet18, weights: null}}
        input: {{image_size: 32, channels: 1}}
        data: {{source: {tmp_path / 'scans.npz'}, batch_size: 16}}
        fine_tune:
          - {{trainable: all, epochs: 2, lr: 0.002, schedule: one_cycle}}
        medical: {{gradcam_images: 0, temperature_scaling: true, positive_class: "1"}}
        training: {{early_stopping_patience: null}}
        export: {{enabled: true, model_name: scans}}
        output_dir: {tmp_path / 'runs'}
        """))
    assert cli.main(["train", str(recipe_file), "--quiet-progress"]) == 0
    run_dir = tmp_path / "runs" / "scans"
    clinical = json.loads((run_dir / "metrics.json").read_text())["clinical"]
    threshold = clinical["binary"]["threshold"]
    assert clinical["threshold_chosen_on"] == "val" and clinical["figures_on"] == "test"

    recipe = rt.MedicalImagingRecipe.load(run_dir / "model.keras")
    assert recipe.threshold == threshold and recipe.decision.chosen_on["split"] == "val"
    test_images = arrays["test_images"][..., None]
    decided = recipe.predict_labels(test_images)
    export_dir = run_dir / "export" / "scans" / "1"
    signatures = tf.saved_model.load(str(export_dir)).signatures
    by_pixels = signatures["predict_images"](images=tf.constant(test_images, tf.float32))
    pngs = []
    for image in test_images[..., 0]:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    by_bytes = signatures["serving_default"](image_bytes=tf.constant(pngs))
    for served in (by_pixels, by_bytes):
        assert [n.decode() for n in served["prediction_names"].numpy()] == decided
    card = json.loads((export_dir / "assets.extra" / "model_card.json").read_text())
    assert card["decision"]["threshold"] == threshold
    assert card["decision"]["chosen_on"]["split"] == "val"
    # the decisions are the threshold's, not argmax's, wherever the two differ
    probabilities = recipe.predict(test_images)
    positive = recipe.class_names.index(recipe.decision.positive_class)
    expected = [recipe.class_names[positive] if p >= threshold else recipe.class_names[1 - positive]
                for p in probabilities[:, positive]]
    assert decided == expected
