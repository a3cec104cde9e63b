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


def test_bootstrap_intervals_are_those_of_scikit_learn_on_each_resample():
    """The resamples are scored all at once; each must score as scikit-learn scores it (ties in
    the scores, resamples with one class left out, PPV undefined when nothing is positive)."""
    rng = np.random.default_rng(3)
    y = (rng.random(30) < 0.25).astype(int)
    s = np.round(rng.random(30) * (0.6 + 0.4 * y), 1)  # few distinct values: many ties
    report = metrics.binary_report(y, s, threshold=0.7, bootstrap=300, seed=5)
    draws = np.random.default_rng(5)
    samples = {"auc": [], "sensitivity": [], "specificity": [], "ppv": [], "npv": []}
    for _ in range(300):
        index = draws.integers(0, 30, 30)
        if len(np.unique(y[index])) < 2:
            continue
        samples["auc"].append(roc_auc_score(y[index], s[index]))
        tn, fp, fn, tp = confusion_matrix(y[index], s[index] >= 0.7, labels=[0, 1]).ravel()
        samples["sensitivity"].append(tp / (tp + fn))
        samples["specificity"].append(tn / (tn + fp))
        samples["ppv"].append(tp / (tp + fp) if tp + fp else np.nan)
        samples["npv"].append(tn / (tn + fn) if tn + fn else np.nan)
    assert np.isnan(samples["ppv"]).any(), "the case of no positive decision is exercised"
    for key, values in samples.items():
        values = np.asarray(values)[np.isfinite(values)]
        np.testing.assert_allclose(report["ci95"][key], np.percentile(values, [2.5, 97.5]), rtol=0, atol=1e-12,
                                   err_msg=key)


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
