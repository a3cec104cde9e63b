"""MedicalImagingRecipe: imbalance (class weights, focal loss), thresholds chosen on validation,
TTA, patients, Grad-CAM."""

import numpy as np
import pytest

import restransfer as rt
from restransfer import data
from restransfer.training.phases import Phase


def lesions(count, seed, positives=0.3):
    """Gray 'scans' with a bright lesion in a minority of them, and a patient id per pair."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(30, 80, (count, 48, 48, 1)).astype(np.uint8)
    labels = (rng.random(count) < positives).astype(int)
    for image, label in zip(images, labels):
        if label:
            y, x = rng.integers(4, 30, 2)
            image[y:y + 12, x:x + 12] = 230
    source = data.from_arrays(images, labels, class_names=["normal", "lesion"])
    source.groups = np.repeat(np.arange(count // 2), 2).astype(str)
    return source


@pytest.fixture(scope="module")
def trained():
    recipe = rt.MedicalImagingRecipe(
        backbone="resnet18", weights=None, image_size=48, channels=1, stem="sum", batch_size=16, focal_gamma=2.0,
        early_stopping_patience=None, val_fraction=0, tta=True, temperature_scaling=True, positive_class="lesion",
        phases=[Phase("all", epochs=5, lr=2e-3, schedule="one_cycle")])
    train = lesions(120, 0)
    recipe.fit(train, verbose=0)
    return recipe, train


def test_class_weights_come_from_the_training_split_and_the_focal_loss_trains(trained):
    recipe, train = trained
    assert "focal" in recipe.model.loss.name and np.isfinite(recipe.history.history["loss"]).all()
    weights = recipe.objective(train).class_weight
    counts = np.bincount(train.labels)
    assert weights[1] > 1 > weights[0]
    assert weights[0] * counts[0] == pytest.approx(weights[1] * counts[1])  # balanced
    assert recipe.model.get_layer("resnet18").get_layer("conv1_conv").kernel.shape[2] == 1


def test_threshold_from_validation_is_applied_to_test(trained):
    recipe, _ = trained
    chosen = recipe.calibrate(lesions(60, 1))
    assert 0 < chosen["threshold"] < 1 and chosen["temperature"] > 0
    report = recipe.evaluate_clinical(lesions(60, 2), bootstrap=100)
    binary = report["binary"]
    assert binary["threshold"] == chosen["threshold"]
    assert binary["auc"] > 0.8, binary
    for key in ("sensitivity", "specificity", "ppv", "npv"):
        assert 0 <= binary[key] <= 1
    assert binary["ci95"]["auc"][0] <= binary["auc"] <= binary["ci95"]["auc"][1]
    assert report["per_patient"]["patients"] == 30
    assert 0 <= report["ece"] <= 1


def test_tta_averages_several_views(trained):
    recipe, _ = trained
    test = lesions(10, 3)
    with_tta = recipe.predict_dataset(test)
    recipe.tta = False
    try:
        plain = recipe.predict_dataset(test)
    finally:
        recipe.tta = True
    assert with_tta.shape == plain.shape and not np.allclose(with_tta, plain)
    np.testing.assert_allclose(with_tta.sum(axis=1), 1.0, rtol=1e-5)


def test_grad_cam_overlays_are_written(trained, tmp_path):
    recipe, _ = trained
    written = recipe.grad_cam_overlays(lesions(4, 4), tmp_path, count=3)
    assert len(written) == 3 and all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_multi_label_findings_get_per_label_figures():
    rng = np.random.default_rng(0)
    images = rng.uniform(30, 80, (40, 48, 48, 1)).astype(np.uint8)
    findings = rng.integers(0, 2, (40, 2))
    images[findings[:, 0] == 1, 4:16, 4:16] = 230    # finding A: bright top-left
    images[findings[:, 1] == 1, 30:42, 30:42] = 230  # finding B: bright bottom-right
    source = data.from_arrays(images, findings.astype("float32"), class_names=["a", "b"])
    recipe = rt.MedicalImagingRecipe(backbone="resnet18", weights=None, image_size=48, channels=1,
                                     multi_label=True, batch_size=16, val_fraction=0,
                                     phases=[Phase("all", epochs=2, lr=2e-3)])
    recipe.fit(source, verbose=0)
    report = recipe.evaluate_clinical(source, bootstrap=50)
    assert set(report["per_label"]) == {"a", "b"}
    for figures in report["per_label"].values():
        assert {"auc", "sensitivity", "specificity", "ppv", "npv", "ci95"} <= set(figures)
