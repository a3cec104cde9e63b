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
    recipe = small_recipe(multi_label=True, class_names=["a", "b", "c"], val_fraction=0.25)
    recipe.fit((images, labels), verbose=0)
    probabilities = recipe.predict(images[:2])
    assert probabilities.shape == (2, 3)
    assert not np.allclose(probabilities.sum(axis=1), 1.0), "sigmoids, not a softmax"
    assert "auc" in recipe.evaluate((images, labels))


def test_fit_is_reproducible_under_a_seed(tiny_folder):
    first, second = small_recipe(augmentation="light"), small_recipe(augmentation="light")
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
    recipe = rt.ClassificationRecipe(
        backbone="resnet18", weights=require_shared(STANDIN_WEIGHTS), image_size=64, batch_size=32,
        phases=[Phase("head", epochs=2, lr=3e-3), Phase("all", epochs=2, lr=3e-4)], seed=0)
    recipe.fit(root, verbose=0)
    accuracy = recipe.evaluate(root / "val")["accuracy"]
    majority = 83 / 153  # the larger class of the official val split
    assert accuracy > majority + 0.05, accuracy
