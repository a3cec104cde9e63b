"""Clinical metrics on fixed predictions, checked against scikit-learn and by hand."""

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, roc_auc_score

from restransfer.evaluation import metrics

Y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0])
S = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.9, 0.6, 0.3, 0.95, 0.2])


def test_binary_report_matches_sklearn_and_hand_counts():
    report = metrics.binary_report(Y, S, threshold=0.5, bootstrap=200)
    assert report["auc"] == pytest.approx(roc_auc_score(Y, S))
    tn, fp, fn, tp = confusion_matrix(Y, S >= 0.5).ravel()  # tp=4, fn=1, tn=4, fp=1
    assert (report["sensitivity"], report["specificity"]) == (tp / (tp + fn), tn / (tn + fp))
    assert (report["ppv"], report["npv"]) == (tp / (tp + fp), tn / (tn + fn))
    assert report["confusion_matrix"] == [[tn, fp], [fn, tp]]
    low, high = report["ci95"]["auc"]
    assert low <= report["auc"] <= high and 0 <= low < high <= 1


def test_threshold_chosen_on_validation_is_applied_unchanged_to_test():
    threshold = metrics.choose_threshold(Y, S, "youden")
    assert threshold == pytest.approx(0.6)  # tpr 0.8 / fpr 0.2 is the best J = 0.6
    sensitive = metrics.choose_threshold(Y, S, "sensitivity", target_sensitivity=1.0)
    assert sensitive == pytest.approx(0.3)
    test_scores = np.array([0.55, 0.65, 0.2, 0.9])
    report = metrics.binary_report([0, 1, 0, 1], test_scores, threshold, bootstrap=0)
    assert report["threshold"] == threshold and report["sensitivity"] == 1.0 and report["specificity"] == 1.0


def test_multiclass_auc_macro_is_the_mean_of_one_vs_rest():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    p = rng.dirichlet(np.ones(3), 60)
    result = metrics.multiclass_auc(y, p)
    assert result["macro"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))


def test_expected_calibration_error():
    perfect = np.array([[0.2, 0.8]] * 10)
    labels = np.array([1] * 8 + [0] * 2)  # 80 % right at 0.8 confidence: calibrated
    assert metrics.expected_calibration_error(labels, perfect) == pytest.approx(0.0)
    overconfident = np.array([[0.01, 0.99]] * 10)
    assert metrics.expected_calibration_error(labels, overconfident) == pytest.approx(0.19)


def test_temperature_scaling_softens_overconfident_logits():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    clean = np.where(rng.random(400) < 0.75, y, 1 - y)  # 75 % accurate
    logits = np.stack([(clean == 0) * 8.0, (clean == 1) * 8.0], axis=1)  # wildly overconfident
    temperature = metrics.fit_temperature(y, logits)
    assert temperature > 2
    scaled = np.exp(logits / temperature) / np.exp(logits / temperature).sum(axis=1, keepdims=True)
    before = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert metrics.expected_calibration_error(y, scaled) < metrics.expected_calibration_error(y, before)


def test_per_patient_aggregation():
    labels, pooled, ids = metrics.per_group([0, 1, 0, 0], [0.2, 0.8, 0.4, 0.1], ["a", "a", "b", "b"])
    assert ids.tolist() == ["a", "b"] and labels.tolist() == [1, 0]
    assert pooled.tolist() == pytest.approx([0.5, 0.25])
