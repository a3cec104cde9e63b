"""Segmentation figures on decided masks, and the report's segmentation sections.

Figures (each computed on masks at the images' own sizes, as ``predict_masks`` returns them):

* per class, **per image**: Dice and IoU of each image, their mean with a percentile
  bootstrap 95 % interval over images;
* per class, **over the whole split** ("dataset"): the pixels of all images pooled,
  2 sum(TP) / (sum(truth) + sum(prediction)), and IoU likewise;
* the **foreground mean** of both (background left out), and for a binary task the pixel
  sensitivity (recall) and precision of the foreground.

``ignore_index`` pixels count nowhere. :data:`EMPTY_RULE` says what an image whose truth and
prediction are both empty for a class scores; it is written into every ``metrics.json``.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

EMPTY_RULE = ("an image whose truth and prediction are both empty for a class has no Dice or IoU for that class: "
              "it is left out of the class's per-image mean (MONAI's ignore_empty) and counted in 'both_empty'; "
              "the dataset figures pool all pixels and are unaffected")


def pixel_counts(truth: np.ndarray, decided: np.ndarray, num_classes: int, ignore_index: int | None) -> np.ndarray:
    """[classes, 3] counts for one image: (true positives, truth pixels, predicted pixels)."""
    truth, decided = np.asarray(truth).ravel(), np.asarray(decided).ravel()
    if ignore_index is not None:
        keep = truth != ignore_index
        truth, decided = truth[keep], decided[keep]
    counts = np.zeros((num_classes, 3), np.int64)
    counts[:, 1] = np.bincount(truth, minlength=num_classes)[:num_classes]
    counts[:, 2] = np.bincount(decided, minlength=num_classes)[:num_classes]
    counts[:, 0] = np.bincount(truth[truth == decided], minlength=num_classes)[:num_classes]
    return counts


def _ratio(top, bottom):
    top, bottom = np.asarray(top, float), np.asarray(bottom, float)
    return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1), np.nan)


def _interval(values, bootstrap: int, rng) -> list[float]:
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if len(values) < 2 or not bootstrap:
        return [float("nan"), float("nan")]
    means = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(bootstrap)]
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def segmentation_figures(counts: np.ndarray, class_names: list[str], bootstrap: int = 1000, seed: int = 0) -> dict:
    """The figures (see the module docstring) from :func:`pixel_counts` of every image
    ([images, classes, 3])."""
    counts = np.asarray(counts, np.int64)
    rng = np.random.default_rng(seed)
    tp, truth, predicted = counts[..., 0], counts[..., 1], counts[..., 2]
    dice = _ratio(2 * tp, truth + predicted)            # [images, classes]; nan where both are empty
    iou = _ratio(tp, truth + predicted - tp)
    per_class = {}
    for c, name in enumerate(class_names):
        per_class[name] = {
            "dice": float(np.nanmean(dice[:, c])) if np.isfinite(dice[:, c]).any() else float("nan"),
            "dice_ci95": _interval(dice[:, c], bootstrap, rng),
            "iou": float(np.nanmean(iou[:, c])) if np.isfinite(iou[:, c]).any() else float("nan"),
            "iou_ci95": _interval(iou[:, c], bootstrap, rng),
            "dataset_dice": float(_ratio(2 * tp[:, c].sum(), truth[:, c].sum() + predicted[:, c].sum())),
            "dataset_iou": float(_ratio(tp[:, c].sum(), truth[:, c].sum() + predicted[:, c].sum() - tp[:, c].sum())),
            "images": int(np.isfinite(dice[:, c]).sum()),
            "both_empty": int((~np.isfinite(dice[:, c])).sum()),
        }
    foreground = class_names[1:]
    per_image = np.nanmean(dice[:, 1:], axis=1) if np.isfinite(dice[:, 1:]).any() else np.full(len(dice), np.nan)
    figures = {
        "dice": float(np.nanmean([per_class[n]["dice"] for n in foreground])),
        "iou": float(np.nanmean([per_class[n]["iou"] for n in foreground])),
        "dataset_dice": float(np.nanmean([per_class[n]["dataset_dice"] for n in foreground])),
        "dataset_iou": float(np.nanmean([per_class[n]["dataset_iou"] for n in foreground])),
        "dice_ci95": _interval(per_image, bootstrap, rng),
        "images": int(len(counts)),
        "per_class": per_class,
        "per_image_dice": [None if not np.isfinite(v) else float(v) for v in per_image],
        "empty_rule": EMPTY_RULE,
    }
    if len(class_names) == 2:
        figures["pixel_sensitivity"] = float(_ratio(tp[:, 1].sum(), truth[:, 1].sum()))
        figures["pixel_precision"] = float(_ratio(tp[:, 1].sum(), predicted[:, 1].sum()))
    return figures


def best_threshold(foreground_probabilities: list[np.ndarray], truths: list[np.ndarray], ignore_index=None,
                   candidates=np.round(np.arange(0.05, 0.951, 0.05), 2)) -> tuple[float, float]:
    """The foreground threshold with the highest dataset Dice on these images (and that Dice)."""
    best = (0.5, -1.0)
    for threshold in candidates:
        counts = sum(pixel_counts(t, (p >= threshold).astype(np.int64), 2, ignore_index)
                     for p, t in zip(foreground_probabilities, truths))
        dice = float(_ratio(2 * counts[1, 0], counts[1, 1] + counts[1, 2]))
        if np.isfinite(dice) and dice > best[1]:
            best = (float(threshold), dice)
    return best


# --- the report's sections --------------------------------------------------------------------

# class colours of the overlays: background transparent, then distinct colours (tab10)
_COLOURS = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60)]


def class_colour(index: int) -> tuple[int, int, int]:
    return _COLOURS[index % len(_COLOURS)] if index else (0, 0, 0)


def overlay(image: np.ndarray, mask: np.ndarray, ignore_index=None, alpha: float = 0.5) -> np.ndarray:
    """uint8 RGB: the image with each foreground class tinted in its colour (ignored pixels grey)."""
    base = np.clip(np.asarray(image, np.float32), 0, 255)
    if base.ndim == 2:
        base = base[..., None]
    if base.shape[-1] == 1:
        base = np.repeat(base, 3, axis=-1)
    out = base.copy()
    for value in np.unique(mask):
        if value == 0:
            continue
        colour = (128, 128, 128) if value == ignore_index else class_colour(int(value))
        where = mask == value
        out[where] = (1 - alpha) * base[where] + alpha * np.asarray(colour, np.float32)
    return out.astype(np.uint8)


def _png(array: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def examples_section(examples: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, float]], class_names,
                     split: str, ignore_index=None, display: int = 256) -> str:
    """Image | truth | prediction, each at least ``display`` px on its short side, for the given
    (title, image, truth, prediction, dice) rows, with the classes' colours as a legend."""
    from PIL import Image

    rows = []
    for title, image, truth, predicted, dice in examples:
        scale = max(1, -(-display // min(image.shape[:2])))  # the short side at least display px
        size = (image.shape[1] * scale, image.shape[0] * scale)
        pixels = np.clip(np.asarray(image, np.float32), 0, 255).astype(np.uint8)
        pixels = np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels
        panels = [pixels, overlay(image, truth, ignore_index), overlay(image, predicted, ignore_index)]
        cells = "".join(
            f'<figure><img alt="{html.escape(f"{title}: {label}")}" width="{size[0]}" height="{size[1]}" '
            f'src="data:image/png;base64,{_png(np.asarray(Image.fromarray(panel).resize(size, Image.Resampling.NEAREST)))}">'
            f"<figcaption>{label}</figcaption></figure>"
            for panel, label in zip(panels, ("image", "truth", "prediction")))
        rows.append(f'<div class="example"><h3>{html.escape(title)} (Dice {dice:.3f})</h3>{cells}</div>')
    legend = "".join(f'<span class="swatch" style="background:rgb{class_colour(i)}"></span>{html.escape(name)} '
                     for i, name in enumerate(class_names) if i)
    return (f'<section id="examples"><h2>Worst, median and best images ({html.escape(split)})</h2>'
            f'<p class="legend">{legend}</p>{"".join(rows)}</section>')


def dice_histogram_png(per_image_dice, split: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [v for v in per_image_dice if v is not None]
    if not values:
        return None
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    axis.hist(values, bins=np.linspace(0, 1, 21), color="C0", edgecolor="white")
    axis.axvline(np.mean(values), color="C3", linestyle="--", label=f"mean {np.mean(values):.3f}")
    axis.set_xlabel("Dice of the image (foreground classes' mean)")
    axis.set_ylabel("images")
    axis.set_title(f"per-image Dice ({split}, {len(values)} images)")
    axis.legend()
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()
