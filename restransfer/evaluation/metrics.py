"""Evaluation numbers a paper needs, on fixed predictions (scikit-learn underneath).

Binary tasks take ``y_true`` in {0, 1} and ``scores`` = probability of the positive class.
A threshold is chosen on validation (:func:`choose_threshold`) and then applied unchanged to
test (:func:`binary_report`).
"""

from __future__ import annotations

import numpy as np


def classification_figures(labels, probabilities, decided, multi_label: bool) -> dict[str, float]:
    """The figures of a classifier's own decisions on labelled images: ``loss`` (cross-entropy
    of its probabilities), ``accuracy`` of ``decided`` (its decision rule's class ids, or 0/1
    rows per label), and for multi-label data ``auc`` (macro over labels with both values)."""
    from sklearn.metrics import roc_auc_score

    probabilities = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-7, 1 - 1e-7)
    labels, decided = np.asarray(labels), np.asarray(decided)
    if multi_label:
        loss = -np.mean(labels * np.log(probabilities) + (1 - labels) * np.log(1 - probabilities))
        usable = [j for j in range(labels.shape[1]) if 0 < labels[:, j].sum() < len(labels)]
        figures = {"loss": float(loss), "accuracy": float(np.mean(decided == labels))}
        if usable:
            figures["auc"] = float(np.mean([roc_auc_score(labels[:, j], probabilities[:, j]) for j in usable]))
        return figures
    labels = labels.astype(int)
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    loss = -np.mean(np.log(probabilities[np.arange(len(labels)), labels]))
    return {"loss": float(loss), "accuracy": float(np.mean(decided == labels))}


def choose_threshold(y_true, scores, method: str = "youden", target_sensitivity: float = 0.9) -> float:
    """``youden``: maximises sensitivity + specificity - 1 on the ROC curve;
    ``sensitivity``: the highest threshold whose sensitivity reaches the target."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(y_true, scores)
    thresholds = np.clip(thresholds, 0.0, 1.0)  # roc_curve's first threshold is +inf
    if method == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    if method == "sensitivity":
        reaching = np.flatnonzero(tpr >= target_sensitivity)
        return float(thresholds[reaching[0]])
    raise ValueError(f"threshold method must be 'youden' or 'sensitivity', got {method!r}")


def _rates(y_true, predicted):
    from sklearn.metrics import confusion_matrix

    tn, fp, fn, tp = confusion_matrix(y_true, predicted, labels=[0, 1]).ravel()
    safe = lambda a, b: float(a / b) if b else float("nan")
    return {"sensitivity": safe(tp, tp + fn), "specificity": safe(tn, tn + fp),
            "ppv": safe(tp, tp + fp), "npv": safe(tn, tn + fn),
            "accuracy": safe(tp + tn, tp + tn + fp + fn),
            "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]]}


def _interval(samples) -> list[float]:
    """Percentile 95 % interval of the defined samples (PPV is undefined when a resample
    decides nothing positive)."""
    values = np.asarray(samples, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return [float("nan"), float("nan")]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def binary_report(y_true, scores, threshold: float, bootstrap: int = 1000, seed: int = 0) -> dict:
    """AUC, sensitivity, specificity, PPV, NPV, accuracy at ``threshold`` (predict positive
    when score >= threshold), with percentile bootstrap 95 % intervals for AUC,
    sensitivity, specificity, PPV and NPV."""
    from sklearn.metrics import roc_auc_score

    y_true, scores = np.asarray(y_true).astype(int), np.asarray(scores, dtype=float)
    report = {"threshold": float(threshold), "auc": float(roc_auc_score(y_true, scores)),
              **_rates(y_true, (scores >= threshold).astype(int)), "n": int(len(y_true))}
    if bootstrap:
        samples = _bootstrap_rates(y_true, scores, threshold, bootstrap, np.random.default_rng(seed))
        report["ci95"] = {k: _interval(v) for k, v in samples.items()}
    return report


def _bootstrap_rates(y_true, scores, threshold: float, resamples: int, rng, chunk: int = 100) -> dict:
    """AUC, sensitivity, specificity, PPV and NPV of each bootstrap resample, all resamples of a
    chunk at once (a resample per row); resamples without both classes are left out (AUC needs
    both). AUC is the Mann-Whitney statistic of the average ranks, which is what
    ``roc_auc_score`` computes, ties included; a Python loop of scikit-learn calls took ~2 s
    per report for 1000 resamples."""
    from scipy.stats import rankdata

    n = len(y_true)
    samples = {"auc": [], "sensitivity": [], "specificity": [], "ppv": [], "npv": []}
    for start in range(0, resamples, chunk):
        index = rng.integers(0, n, (min(chunk, resamples - start), n))  # the stream of one draw per resample
        truth, score = y_true[index], scores[index]
        both = truth.min(axis=1) < truth.max(axis=1)
        truth, score = truth[both], score[both]
        positives = truth.sum(axis=1)
        negatives = n - positives
        ranks = rankdata(score, axis=1)
        samples["auc"].append(((ranks * truth).sum(axis=1) - positives * (positives + 1) / 2) / (positives * negatives))
        decided = score >= threshold
        tp, fp = (decided & (truth == 1)).sum(axis=1), (decided & (truth == 0)).sum(axis=1)
        fn, tn = positives - tp, negatives - fp
        with np.errstate(invalid="ignore", divide="ignore"):  # PPV/NPV: nan when nothing is decided so
            samples["sensitivity"].append(tp / positives)
            samples["specificity"].append(tn / negatives)
            samples["ppv"].append(np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), np.nan))
            samples["npv"].append(np.where(tn + fn > 0, tn / np.maximum(tn + fn, 1), np.nan))
    return {key: np.concatenate(values) for key, values in samples.items()}


def multiclass_auc(y_true, probabilities) -> dict:
    """One-vs-rest ROC-AUC per class and their macro average."""
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true).astype(int)
    per_class = [float(roc_auc_score(y_true == j, probabilities[:, j])) if 0 < (y_true == j).sum() < len(y_true)
                 else float("nan") for j in range(probabilities.shape[1])]
    return {"per_class": per_class, "macro": float(np.nanmean(per_class))}


def expected_calibration_error(y_true, probabilities, bins: int = 15) -> float:
    """ECE of the top-class confidence: sum over equal-width bins of |accuracy - confidence|,
    weighted by the share of samples in the bin."""
    probabilities = np.asarray(probabilities, dtype=float)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(y_true).astype(int)
    edges = np.linspace(0.0, 1.0, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(error)


def fit_temperature(y_true, logits) -> float:
    """Temperature T minimising the validation negative log-likelihood of softmax(logits/T)
    (Guo et al. 2017); one scalar, so accuracy is unchanged."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    y_true = np.asarray(y_true).astype(int)
    logits = np.asarray(logits, dtype=float)

    def nll(log_t):
        return -log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(y_true)), y_true].mean()

    return float(np.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))


def per_group(y_true, scores, groups, reduce: str = "mean"):
    """Aggregates image-level scores to one score per group (e.g. patient): mean or max;
    a group's label is positive if any of its images is. Returns (labels, scores, group ids)."""
    groups = np.asarray(groups)
    ids = np.unique(groups)
    y_true, scores = np.asarray(y_true), np.asarray(scores, dtype=float)
    combine = np.max if reduce == "max" else np.mean
    labels = np.array([int(y_true[groups == g].max()) for g in ids])
    pooled = np.array([combine(scores[groups == g]) for g in ids])
    return labels, pooled, ids
