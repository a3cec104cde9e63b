"""What a run is about to train on, said before it trains: images per class and split, sizes,
channels, pixel range, and warnings for data that cannot teach anything (nearly constant
images, many byte-identical copies)."""

from __future__ import annotations

import numpy as np

# an image whose pixels span at most this many levels (of 255) holds almost nothing to learn
FLAT_RANGE = 8


def _stats(part) -> np.ndarray | None:
    """[N, 6] image statistics (see sources.image_stats) of a part, or None when unknown."""
    from restransfer.data.sources import image_stats

    if part.images is not None:
        return np.array([image_stats(image) for image in part.images], dtype=np.float64)
    if part.paths and part.pixel_stats:
        known = [part.pixel_stats[p] for p in part.paths if p in part.pixel_stats]
        return np.array(known, dtype=np.float64) if known else None
    return None


def summarise(splits) -> tuple[list[str], list[str]]:
    """(lines describing the data, warnings) for the parts of ``splits``."""
    from restransfer.data.splits import content_digests

    lines, warnings = [], []
    for name, part in splits.items():
        if part.has_masks:
            counts = f"{len(part)} image/mask pairs ({part.empty_masks} empty masks)"
        elif part.multi_label:
            counts = f"{len(part)} images, " + ", ".join(
                f"{c} {int(n)}" for c, n in zip(part.class_names, np.asarray(part.labels).sum(axis=0)))
        else:
            found = np.bincount(np.asarray(part.labels, int), minlength=part.num_classes)
            counts = f"{len(part)} images (" + ", ".join(f"{c} {n}" for c, n in zip(part.class_names, found)) + ")"
        stats = _stats(part)
        if stats is not None and len(stats):
            heights, widths = stats[:, 0], stats[:, 1]
            channels = sorted(set(stats[:, 2].astype(int).tolist()))
            counts += (f"; {int(widths.min())}x{int(heights.min())} to {int(widths.max())}x{int(heights.max())} px "
                       f"(median {int(np.median(widths))}x{int(np.median(heights))}), "
                       f"{'/'.join(map(str, channels))} channel(s) as read, pixels {stats[:, 3].min():g}-{stats[:, 4].max():g}")
            flat = int(((stats[:, 4] - stats[:, 3]) <= FLAT_RANGE).sum())
            if flat and flat >= 0.1 * len(stats):
                warnings.append(f"{flat} of {len(stats)} {name} images are nearly constant (their pixels span at most "
                                f"{FLAT_RANGE} levels): they hold almost nothing to learn; check the files "
                                "(a degenerate export, a wrong bit depth, a missing windowing?)")
        lines.append(f"  {name}: {counts}")
        digests = content_digests(part) if part.paths is not None else None
        if digests:
            copies = len(digests) - len(set(digests))
            if copies and copies >= 0.05 * len(digests):
                warnings.append(f"{copies} of the {len(digests)} {name} files are byte-identical copies of others "
                                "(kept on one side of every split, but they count twice in figures)")
    return lines, warnings
