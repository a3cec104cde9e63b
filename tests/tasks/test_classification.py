"""ClassificationRecipe: fit / evaluate / predict / save / load."""

import numpy as np
import pytest

import restransfer as rt
from restransfer.training.phases import Phase
from restransfer.training.loop import TrainingHistory
from restransfer.training.schedules import learning_rate
from restransfer.models.stages import trainable_stages

from conftest import HYMENOPTERA, STANDIN_WEIGHTS, require_shared

FAST = [Phase("head", epochs=1, lr=1e-2), Phase("all", epochs=1, lr=1e-3)]


def small_recipe(**overrides):
    args = dict(backbone="resnet18", weights=None, image_size=32, batch_size=8,
                phases=FAST, augmentation="none", seed=0)
    return rt.ClassificationRecipe(**{**args, **overrides})


def test_folder_fit_predict_save_load_round_trip(tiny_folder, tmp_path):
    recipe = small_recipe()
    history = recipe.fit(tiny_folder, verbose=0)
    assert isinstance(history, TrainingHistory)
    assert history.phase_starts == [0, 1] and history.epochs == 2
    assert recipe.class_names == ["bright", "dark"]
    metrics = recipe.evaluate(tiny_folder / "val")
    assert set(metrics) >= {"loss", "accuracy"}

    images = np.random.default_rng(0).integers(0, 255, (3, 45, 37, 3), dtype=np.uint8)
    before = recipe.predict(images)
    assert before.shape == (3, 2)
    np.testing.assert_allclose(before.sum(axis=1), 1.0, rtol=1e-5)
    saved = recipe.save(tmp_path / "run" / "model.keras")
    loaded = rt.ClassificationRecipe.load(saved)
    np.testing.assert_array_equal(loaded.predict(images), before)
    assert loaded.class_names == ["bright", "dark"]
    assert loaded.backbone_name == "resnet18"
    assert not list(saved.parent.glob(".saving-*")), "no temporary files left behind"


def test_array_input_and_multi_label(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (24, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, (24, 3)).astype("float32")
    recipe = small_recipe(multi_label=True, class_names=["a", "b", "c"], val_fraction=0.25,
                          phases=[Phase("all", epochs=1, lr=1e-3)])  # a second phase adds nothing here
    recipe.fit((images, labels), verbose=0)
    probabilities = recipe.predict(images[:2])
    assert probabilities.shape == (2, 3)
    assert not np.allclose(probabilities.sum(axis=1), 1.0), "sigmoids, not a softmax"
    assert "auc" in recipe.evaluate((images, labels))


def test_fit_is_reproducible_under_a_seed(tiny_folder):
    # one augmented full phase: the seeds of the order, the augmentation and the initialisation
    one_phase = [Phase("all", epochs=2, lr=1e-3)]
    first, second = small_recipe(augmentation="light", phases=one_phase), small_recipe(augmentation="light", phases=one_phase)
    first.fit(tiny_folder, verbose=0)
    second.fit(tiny_folder, verbose=0)
    for a, b in zip(first.model.get_weights(), second.model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_head_phase_leaves_the_backbone_untouched(tiny_folder):
    recipe = small_recipe(phases=[Phase("head", epochs=1, lr=1e-2)])
    recipe.fit(tiny_folder, verbose=0)
    assert trainable_stages(recipe.model) == []
    assert len(recipe.model.trainable_weights) == 2  # classifier kernel + bias


def test_learning_rate_schedules():
    cosine = learning_rate(Phase("all", epochs=2, lr=0.1, schedule="cosine", warmup_epochs=1), 10)
    assert float(cosine(0)) == pytest.approx(0.0)
    assert float(cosine(10)) == pytest.approx(0.1)
    assert float(cosine(20)) == pytest.approx(0.0, abs=1e-6)
    constant = learning_rate(Phase("all", epochs=2, lr=0.1, schedule="constant", warmup_epochs=1), 10)
    assert float(constant(5)) == pytest.approx(0.05)
    assert float(constant(19)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lr"):
        Phase("all", lr=-1)


@pytest.mark.slow
def test_hymenoptera_fine_tune_beats_chance():
    root = require_shared(HYMENOPTERA)
    # without augmentation the head phase trains on cached features (one backbone pass)
    recipe = rt.ClassificationRecipe(
        backbone="resnet18", weights=require_shared(STANDIN_WEIGHTS), image_size=64, batch_size=32,
        augmentation="none", phases=[Phase("head", epochs=3, lr=3e-3), Phase("all", epochs=1, lr=3e-4)], seed=0)
    recipe.fit(root, verbose=0)
    accuracy = recipe.evaluate(root / "val")["accuracy"]
    majority = 83 / 153  # the larger class of the official val split
    assert accuracy > majority + 0.05, accuracy


def test_evaluate_scores_the_decisions_predict_and_the_cli_make(tiny_folder, capsys):
    """A medical model with a stored threshold (0.05, as in the review's reproduction):
    evaluate's accuracy is that of predict_labels' decisions, through the API and the CLI."""
    import json

    from restransfer import cli
    from restransfer.models.decision import DecisionRule
    from restransfer.models.heads import find_head

    recipe = rt.MedicalImagingRecipe(backbone="resnet18", weights=None, image_size=32,
                                     class_names=["bright", "dark"], positive_class="dark", seed=2)
    recipe.build()
    val = rt.data.image_folder(tiny_folder / "val", progress=False)
    probabilities = recipe.predict(val.paths)
    argmax = float(np.mean(probabilities.argmax(axis=1) == val.labels))
    truth = [val.class_names[i] for i in val.labels]
    # an untrained model: a threshold inside its narrow range of scores, where its decisions
    # score differently from argmax's (else this test could not tell the two apart)
    for quantile in np.linspace(0.1, 0.9, 9):
        threshold = float(np.quantile(probabilities[:, 1], quantile))
        find_head(recipe.model).set_decision(DecisionRule("threshold", positive_class="dark", threshold=threshold))
        decided = recipe.predict_labels(val.paths)
        own = float(np.mean([d == t for d, t in zip(decided, truth)]))
        if own != argmax:
            break
    assert own != argmax
    assert recipe.evaluate(val)["accuracy"] == pytest.approx(own)
    path = recipe.save(tiny_folder / "m.keras")
    assert cli.main(["evaluate", str(path), "--data", str(tiny_folder / "val"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(own)


def test_arrays_follow_the_channel_rule_of_files(tmp_path):
    """A 1-channel model given RGB arrays answers as for the same pixels in a file (luma); a
    3-channel recipe trains on 1-channel arrays (replicated); [0, 1] floats are refused."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (2, 30, 30, 3), dtype=np.uint8)
    gray = small_recipe(channels=1, class_names=["a", "b"])
    gray.build()
    files = []
    for i, image in enumerate(rgb):
        files.append(tmp_path / f"rgb{i}.png")
        Image.fromarray(image).save(files[-1])
    np.testing.assert_allclose(gray.predict(rgb), gray.predict(files), atol=1e-6)
    with pytest.raises(ValueError, match="multiply them by 255"):
        gray.predict(rgb / 255.0)
    colour = small_recipe(phases=[Phase("head", epochs=1)], val_fraction=0)
    colour.fit((rng.integers(0, 255, (8, 32, 32), dtype=np.uint8), np.arange(8) % 2), verbose=0)
    assert colour.model.input_shape[-1] == 3


def test_a_tf_dataset_trains_with_a_folder_for_validation(tiny_folder):
    import tensorflow as tf

    images = rt.data.image_folder(tiny_folder / "train", progress=False)
    pixels = np.stack([np.asarray(rt.data.resize_image(rt.data.load_image(p), 32)) for p in images.paths])
    batches = tf.data.Dataset.from_tensor_slices((pixels, images.labels)).batch(8)
    recipe = small_recipe(num_classes=2, phases=[Phase("head", epochs=1)])
    history = recipe.fit(batches, validation_data=str(tiny_folder / "val"), verbose=0)
    assert recipe.class_names == ["bright", "dark"] and np.isfinite(history.history["val_loss"]).all()


def test_the_medical_default_augmentation_is_one_default(tmp_path):
    from restransfer.cli.config import load_recipe
    from restransfer.cli.runs import recipe_from_config

    recipe_file = tmp_path / "m.yaml"
    recipe_file.write_text("task: medical\nbackbone: {name: resnet18, weights: null}\ndata: {source: 'sklearn:digits'}\n")
    config, resolved = load_recipe(recipe_file)
    by_file = recipe_from_config(config)
    by_python = rt.MedicalImagingRecipe(backbone="resnet18", weights=None)
    assert by_file.augmentation == by_python.augmentation == resolved["data"]["augmentation"] == "medical"
    assert rt.ClassificationRecipe(backbone="resnet18", weights=None).augmentation == "light"
