"""A self-contained ``report.html`` for a run: every plot is a PNG embedded in the page."""

from __future__ import annotations

import base64
import html
import io
import math

import numpy as np


def _figure_png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_png(history: dict, phase_starts: list[int]) -> str:
    plt = _plt()
    metrics = [m for m in ("loss", "accuracy", "auc") if m in history]
    figure, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        epochs = np.arange(1, len(history[metric]) + 1)
        axis.plot(epochs, history[metric], marker="o", label=f"train {metric}")
        if f"val_{metric}" in history:
            axis.plot(epochs, history[f"val_{metric}"], marker="o", label=f"val {metric}")
        for number, start in enumerate(phase_starts):
            axis.axvline(start + 0.5, color="grey", linestyle=":")
            axis.text(start + 0.6, axis.get_ylim()[1], f"phase {number + 1}", va="top", fontsize=8)
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.legend(fontsize=8)
    return _figure_png(figure)


def confusion_png(y_true, y_pred, class_names) -> str:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _plt()
    size = max(4, 0.6 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=range(len(class_names)),
                                            display_labels=class_names, ax=axis, colorbar=False,
                                            xticks_rotation=45)
    axis.set_title("confusion matrix (validation)")
    return _figure_png(figure)


def roc_png(y_onehot, probabilities, class_names) -> str:
    from sklearn.metrics import RocCurveDisplay

    plt = _plt()
    figure, axis = plt.subplots(figsize=(5, 4.5))
    columns = [1] if y_onehot.shape[1] == 2 and probabilities.shape[1] == 2 else range(y_onehot.shape[1])
    for j in columns:
        if 0 < y_onehot[:, j].sum() < len(y_onehot):
            RocCurveDisplay.from_predictions(y_onehot[:, j], probabilities[:, j], name=class_names[j], ax=axis)
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axis.set_title("ROC (validation)")
    return _figure_png(figure)


def calibration_png(y_onehot, probabilities) -> str:
    from sklearn.calibration import calibration_curve

    plt = _plt()
    figure, axis = plt.subplots(figsize=(5, 4.5))
    truth, confidence = y_onehot.ravel(), probabilities.ravel()
    observed, predicted = calibration_curve(truth, confidence, n_bins=10, strategy="uniform")
    axis.plot(predicted, observed, marker="o", label="model")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
    axis.set_xlabel("predicted probability")
    axis.set_ylabel("observed frequency")
    axis.set_title("calibration (validation, all classes)")
    axis.legend()
    return _figure_png(figure)


def wrong_grid_png(images, y_true, y_pred, confidence, class_names, limit=12) -> str | None:
    wrong = np.flatnonzero(y_true != y_pred)
    if not len(wrong):
        return None
    wrong = wrong[np.argsort(-confidence[wrong])][:limit]
    plt = _plt()
    columns = min(6, len(wrong))
    rows = math.ceil(len(wrong) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, index in zip(axes.ravel(), wrong):
        image = np.clip(images[index], 0, 255).astype(np.uint8)
        axis.imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 else None)
        axis.set_title(f"{class_names[y_pred[index]]} {confidence[index]:.2f}\n(true: {class_names[y_true[index]]})",
                       fontsize=8)
    return _figure_png(figure)


def write_report(path, title: str, history, class_names, y_true, probabilities, images=None,
                 multi_label: bool = False, metrics: dict | None = None, notes: list[str] = (),
                 extra_images=(), decisions=None) -> None:
    """Writes the report. ``y_true``: class ids (or 0/1 rows for multi-label); ``decisions``:
    the model's decided class ids (or 0/1 rows) when its rule is not argmax / 0.5."""
    from sklearn.metrics import classification_report

    sections = []
    if history is not None and history.history:
        sections.append(("Training curves (dotted lines: phase starts)",
                         curves_png(history.history, history.phase_starts)))
    if multi_label:
        y_onehot = np.asarray(y_true)
        y_pred_onehot = np.asarray(decisions) if decisions is not None else (probabilities >= 0.5).astype(int)
        table = classification_report(y_onehot, y_pred_onehot, target_names=class_names,
                                      output_dict=True, zero_division=0)
    else:
        y_true = np.asarray(y_true).astype(int)
        y_pred = np.asarray(decisions) if decisions is not None else probabilities.argmax(axis=1)
        y_onehot = np.eye(len(class_names))[y_true]
        table = classification_report(y_true, y_pred, labels=range(len(class_names)),
                                      target_names=class_names, output_dict=True, zero_division=0)
        sections.append(("Confusion matrix", confusion_png(y_true, y_pred, class_names)))
    sections.append(("ROC curves", roc_png(y_onehot, probabilities, class_names)))
    sections.append(("Calibration", calibration_png(y_onehot, probabilities)))
    if images is not None and not multi_label:
        grid = wrong_grid_png(images, y_true, y_pred, probabilities.max(axis=1), class_names)
        sections.append(("Most confidently wrong validation images", grid) if grid else
                        ("Most confidently wrong validation images", None))

    if extra_images:  # e.g. Grad-CAM overlays, already PNG files
        for picture in extra_images:
            sections.append((f"Grad-CAM: {picture.stem}", base64.b64encode(picture.read_bytes()).decode()))

    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td>"
        f"<td>{v['f1-score']:.3f}</td><td>{int(v['support'])}</td></tr>"
        for name, v in table.items() if isinstance(v, dict))
    metric_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>"
                          for k, v in (metrics or {}).items() if isinstance(v, (int, float)))
    figures = "".join(
        f"<section><h2>{html.escape(name)}</h2>"
        + (f'<img alt="{html.escape(name)}" src="data:image/png;base64,{png}">' if png else "<p>none</p>")
        + "</section>" for name, png in sections)
    note_items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<ul>{note_items}</ul>
<h2>Metrics</h2><table><tr><th>metric</th><th>value</th></tr>{metric_rows}</table>
<h2>Per-class precision / recall / F1 (validation)</h2>
<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{rows}</table>
{figures}
</body></html>
"""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(page)
