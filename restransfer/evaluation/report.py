"""A self-contained ``report.html`` for a run: every plot is a PNG embedded in the page.

First a summary (task, model, images per split, the decision rule, headline figures with the
split they come from), then for medical runs the clinical figures at the model's threshold,
then curves, tables and plots, each naming its split."""

from __future__ import annotations

import base64
import html
import io
import math
import os

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


def curves_png(history: dict, phase_starts: list[int], metrics=("loss", "accuracy", "auc")) -> str:
    plt = _plt()
    metrics = [m for m in metrics if m in history]
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


def confusion_png(y_true, y_pred, class_names, split: str = "validation") -> str:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _plt()
    size = max(4, 0.6 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=range(len(class_names)),
                                            display_labels=class_names, ax=axis, colorbar=False,
                                            xticks_rotation=45)
    axis.set_title(f"confusion matrix ({split})")
    return _figure_png(figure)


def roc_png(y_onehot, probabilities, class_names, split: str = "validation") -> str:
    from sklearn.metrics import RocCurveDisplay

    plt = _plt()
    figure, axis = plt.subplots(figsize=(5, 4.5))
    columns = [1] if y_onehot.shape[1] == 2 and probabilities.shape[1] == 2 else range(y_onehot.shape[1])
    for j in columns:
        if 0 < y_onehot[:, j].sum() < len(y_onehot):
            RocCurveDisplay.from_predictions(y_onehot[:, j], probabilities[:, j], name=class_names[j], ax=axis)
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axis.set_title(f"ROC ({split})")
    return _figure_png(figure)


def calibration_png(y_onehot, probabilities, split: str = "validation", temperature: float | None = None) -> str:
    """Reliability curve over all classes; with a fitted ``temperature``, the curves before
    (the model's logits unscaled, recovered from the calibrated probabilities) and after."""
    from sklearn.calibration import calibration_curve

    curves = {"model": probabilities}
    if temperature is not None:
        logits = np.log(np.clip(probabilities, 1e-7, 1.0)) * temperature
        before = np.exp(logits - logits.max(axis=1, keepdims=True))
        curves = {"before (T = 1)": before / before.sum(axis=1, keepdims=True),
                  f"after (T = {temperature:.3g})": probabilities}
    plt = _plt()
    figure, axis = plt.subplots(figsize=(5, 4.5))
    for label, values in curves.items():
        observed, predicted = calibration_curve(y_onehot.ravel(), values.ravel(), n_bins=10, strategy="uniform")
        axis.plot(predicted, observed, marker="o", label=label)
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
    axis.set_xlabel("predicted probability")
    axis.set_ylabel("observed frequency")
    axis.set_title(f"calibration ({split}, all classes)")
    axis.legend()
    return _figure_png(figure)


def most_confident_wrong(y_true, y_pred, confidence, limit: int = 12) -> np.ndarray:
    """Indices of the wrongly decided images, most confident first (the grid's choice; the
    caller fetches just these images, so arrays of any size get a grid)."""
    wrong = np.flatnonzero(np.asarray(y_true) != np.asarray(y_pred))
    return wrong[np.argsort(-np.asarray(confidence)[wrong], kind="stable")][:limit]


def wrong_grid_png(images: dict, y_true, y_pred, confidence, class_names, limit=12) -> str | None:
    """``images``: index -> pixels for (at least) :func:`most_confident_wrong`'s indices."""
    wrong = most_confident_wrong(y_true, y_pred, confidence, limit)
    if not len(wrong):
        return None
    plt = _plt()
    columns = min(6, len(wrong))
    rows = math.ceil(len(wrong) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, index in zip(axes.ravel(), wrong):
        image = np.clip(images[int(index)], 0, 255).astype(np.uint8)
        axis.imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 else None)
        axis.set_title(f"{class_names[y_pred[index]]} {confidence[index]:.2f}\n(true: {class_names[y_true[index]]})",
                       fontsize=8)
    return _figure_png(figure)


def operating_point_png(truth, scores, threshold: float, split: str, positive: str) -> str:
    """ROC of the positive class with the chosen threshold's operating point marked."""
    from sklearn.metrics import RocCurveDisplay

    plt = _plt()
    figure, axis = plt.subplots(figsize=(5, 4.5))
    RocCurveDisplay.from_predictions(truth, scores, name=positive, ax=axis)
    decided = scores >= threshold
    sensitivity = decided[truth == 1].mean() if (truth == 1).any() else float("nan")
    specificity = (~decided[truth == 0]).mean() if (truth == 0).any() else float("nan")
    axis.plot([1 - specificity], [sensitivity], "o", color="crimson", markersize=9,
              label=f"threshold {threshold:.3g}")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axis.legend(loc="lower right")
    axis.set_title(f"ROC and operating point ({split})")
    return _figure_png(figure)


def png_section(name: str, png: str | None, anchor: str = "") -> str:
    ident = f' id="{anchor}"' if anchor else ""
    body = f'<img alt="{html.escape(name)}" src="data:image/png;base64,{png}">' if png else "<p>none</p>"
    return f"<section{ident}><h2>{html.escape(name)}</h2>{body}</section>"


def table(header: list[str] | None, rows: list[list], css: str = "") -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table{f" class={css}" if css else ""}>{head}{body}</table>'


def skipped_note(skipped) -> str:
    """The report's line on unusable files: how many, and each with why."""
    if not skipped:
        return "no unusable files were skipped"
    names = "; ".join(f"{os.path.basename(s.path)} ({s.reason})" for s in skipped[:20])
    return f"{len(skipped)} unusable file(s) skipped: {names}" + (" ..." if len(skipped) > 20 else "")


def with_ci(figures: dict, key: str) -> str:
    value = figures.get(key)
    if value is None:
        return "–"
    interval = figures.get("ci95", {}).get(key)
    return f"{value:.3f}" + (f" ({interval[0]:.3f}–{interval[1]:.3f})" if interval else "")


def clinical_section(clinical: dict, operating_point: str | None, calibration: str | None) -> str:
    """Threshold and how it was chosen, the figures at it with 95 % CIs, and the plots."""
    binary = clinical.get("binary")
    parts = [f"<p><b>Decision rule</b>: {html.escape(clinical.get('decision_rule', ''))}.</p>",
             f"<p>Threshold chosen on: <b>{html.escape(str(clinical.get('threshold_chosen_on')))}</b>; "
             f"figures below on: <b>{html.escape(str(clinical.get('figures_on')))}</b>.</p>"]
    if clinical.get("optimistic"):
        parts.append(f"<p class=\"warning\">{html.escape(clinical['optimistic'])}</p>")
    if binary:
        rows = [[name, with_ci(binary, key)] for name, key in (
            ("AUC", "auc"), ("sensitivity", "sensitivity"), ("specificity", "specificity"),
            ("PPV", "ppv"), ("NPV", "npv"), ("accuracy", "accuracy"))]
        parts.append(table(["at the threshold " + f"{binary['threshold']:.4g}", "value (95 % CI)"], rows))
        if "confusion_matrix" in binary:
            (tn, fp), (fn, tp) = binary["confusion_matrix"]
            parts.append("<h3>Confusion matrix at the threshold</h3>" + table(
                ["", "decided negative", "decided positive"],
                [["truly negative", tn, fp], ["truly positive", fn, tp]]))
    elif "per_label" in clinical:
        rows = [[name, with_ci(f, "auc"), with_ci(f, "sensitivity"), with_ci(f, "specificity"), f"{f['threshold']:.3g}"]
                for name, f in clinical["per_label"].items()]
        parts.append(table(["label", "AUC", "sensitivity", "specificity", "threshold"], rows))
    for name, png in (("ROC with the operating point", operating_point), ("Calibration", calibration)):
        if png:
            parts.append(f'<figure><img alt="{name}" src="data:image/png;base64,{png}"><figcaption>{name}</figcaption></figure>')
    return '<section id="clinical"><h2>Clinical figures</h2>' + "".join(parts) + "</section>"


def summary_section(summary: dict) -> str:
    """What a reader needs first: task, model, data per split, decision rule, headline figures."""
    rows = [["task", summary.get("task", "")], ["backbone", summary.get("backbone", "")],
            ["weights", summary.get("weights") or "random init"],
            ["images per split", ", ".join(f"{k} {v}" for k, v in summary.get("splits", {}).items())],
            ["decision rule", summary.get("decision", "")]]
    headline = "".join(f"<li><b>{html.escape(name)}</b>: {html.escape(value)} "
                       f"<span class=\"split\">({html.escape(split)})</span></li>"
                       for name, value, split in summary.get("headline", []))
    return ('<section id="summary"><h2>Summary</h2>' + table(None, rows, css="facts")
            + (f"<ul class=\"headline\">{headline}</ul>" if headline else "") + "</section>")


def folds_section(folds: list[dict], summary: dict) -> str:
    keys = sorted(summary)
    rows = [[f"fold {i + 1}"] + [f"{fold.get(k, float('nan')):.3f}" for k in keys] for i, fold in enumerate(folds)]
    rows.append(["mean ± sd"] + [f"{summary[k]['mean']:.3f} ± {summary[k]['sd']:.3f}" for k in keys])
    links = "".join(f'<li><a href="fold{i + 1}/report.html">fold {i + 1} report</a></li>' for i in range(len(folds)))
    return '<section id="folds"><h2>Cross-validation</h2>' + table([""] + keys, rows) + f"<ul>{links}</ul></section>"


STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}img{max-width:100%}.split{color:#666}
.facts td{text-align:left}
.warning{background:#fff3cd;padding:.5em}#summary{background:#f6f8fa;padding:.2em 1em 1em}
.gradcam img{width:512px;image-rendering:auto}figure{display:inline-block;margin:0 1em 1em 0}
.example figure img{image-rendering:pixelated}.swatch{display:inline-block;width:1em;height:1em;margin:0 .3em 0 1em;
vertical-align:middle;border:1px solid #888}"""


def write_page(path, title: str, body: str) -> None:
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(page)


def write_report(path, title: str, history, class_names, y_true, probabilities, images=None,
                 multi_label: bool = False, metrics: dict | None = None, notes: list[str] = (),
                 extra_images=(), decisions=None, summary: dict | None = None,
                 clinical: dict | None = None, clinical_plots=(None, None), split: str = "validation") -> None:
    """Writes the report of one model: summary, (clinical section), curves, per-class table,
    confusion matrix, ROC, calibration, most confidently wrong images, Grad-CAM.

    ``y_true``/``probabilities``/``decisions`` are on ``split``; ``decisions``: the model's
    decided class ids (or 0/1 rows; default argmax / 0.5); ``images``: index -> pixels for
    at least :func:`most_confident_wrong`'s indices; ``clinical``: the medical report (with
    ``clinical_plots``: operating-point ROC and calibration PNGs)."""
    from sklearn.metrics import classification_report

    sections = []
    if history is not None and history.history:
        sections.append(png_section("Training curves (dotted lines: phase starts)",
                                     curves_png(history.history, history.phase_starts)))
    if multi_label:
        y_onehot = np.asarray(y_true)
        y_pred_onehot = np.asarray(decisions) if decisions is not None else (probabilities >= 0.5).astype(int)
        per_class = classification_report(y_onehot, y_pred_onehot, target_names=class_names,
                                      output_dict=True, zero_division=0)
    else:
        y_true = np.asarray(y_true).astype(int)
        y_pred = np.asarray(decisions) if decisions is not None else probabilities.argmax(axis=1)
        y_onehot = np.eye(len(class_names))[y_true]
        per_class = classification_report(y_true, y_pred, labels=range(len(class_names)),
                                      target_names=class_names, output_dict=True, zero_division=0)
        sections.append(png_section(f"Confusion matrix at the decision rule ({split})",
                                     confusion_png(y_true, y_pred, class_names, split)))
    sections.append(png_section(f"ROC curves ({split})", roc_png(y_onehot, probabilities, class_names, split)))
    sections.append(png_section(f"Calibration ({split})", calibration_png(y_onehot, probabilities, split)))
    if images is not None and not multi_label:
        sections.append(png_section(f"Most confidently wrong images ({split})",
                                     wrong_grid_png(images, y_true, y_pred, probabilities.max(axis=1), class_names)))
    for picture in extra_images:  # Grad-CAM overlays, already PNG files (original | overlay)
        png = base64.b64encode(picture.read_bytes()).decode()
        sections.append(f'<section class="gradcam"><h2>Grad-CAM: {html.escape(picture.stem)}</h2>'
                        f'<img alt="Grad-CAM {html.escape(picture.stem)}" src="data:image/png;base64,{png}"></section>')

    rows = [[name, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1-score']:.3f}", int(v["support"])]
            for name, v in per_class.items() if isinstance(v, dict)]
    metric_rows = [[k, f"{v:.4f}"] for k, v in (metrics or {}).items() if isinstance(v, (int, float))]
    body = (summary_section(summary) if summary else "")
    body += f"<ul>{''.join(f'<li>{html.escape(n)}</li>' for n in notes)}</ul>"
    if clinical:
        body += clinical_section(clinical, *clinical_plots)
    body += "<h2>Metrics</h2>" + table(["metric", "value"], metric_rows)
    body += f"<h2>Per-class precision / recall / F1 ({split})</h2>" + table(
        ["class", "precision", "recall", "F1", "support"], rows)
    body += "".join(sections)
    write_page(path, title, body)
