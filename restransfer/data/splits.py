"""Which image goes to which split: train / validation / test, k-fold, split files.

One place decides the splits of a source (:func:`resolve_splits`); every door (the Python
API, recipe files, quickstart) goes through it. Stratified and group-aware (scikit-learn).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import typing
from pathlib import Path

import numpy as np

if typing.TYPE_CHECKING:
    from restransfer.data.sources import ImageData

log = logging.getLogger("restransfer.data")

SPLIT_DIR_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation"),
                   "test": ("test", "testing")}


def find_split_dir(root: Path, split: str) -> Path | None:
    for name in SPLIT_DIR_NAMES[split]:
        if (root / name).is_dir():
            return root / name
    return None


def split_folder(path, split: str | None = None) -> Path:
    """The folder a reader reads: ``path`` itself, or its ``split`` sub-folder (train/val/test
    under any of their usual names); a missing one is an error naming what was looked for."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    if split is None:
        return root
    part = find_split_dir(root, split)
    if part is None:
        raise FileNotFoundError(f"{root} has no {split!r} sub-folder ({'/'.join(SPLIT_DIR_NAMES[split])})")
    return part


def _strata(data: ImageData) -> np.ndarray:
    # Multi-label rows are stratified by their first positive label (-1 for none): a
    # simple, stable approximation of label balance.
    if not data.multi_label:
        return data.labels
    return np.where(data.labels.any(axis=1), data.labels.argmax(axis=1), -1)


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, modified_ns: int, size: int) -> str:
    # keyed by modification time and size too: a rewritten file is hashed again
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def content_digests(data: ImageData) -> list[str] | None:
    """SHA-256 of each image's file (or array) content; None for streamed sources. A file is
    read once per process (splitting, the duplicate check and calibration all ask)."""
    if data.paths is not None:
        stats = [os.stat(p) for p in data.paths]
        return [_file_digest(str(p), s.st_mtime_ns, s.st_size) for p, s in zip(data.paths, stats)]
    if data.images is not None:
        return [hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest() for image in data.images]
    return None


def split_groups(data: ImageData) -> np.ndarray | None:
    """What must stay on one side of any split: the user's groups (e.g. patients), with
    identical images (same content) joined into one group, so a duplicate can never be on
    both sides of a train/validation/test split or of two cross-validation folds. None when
    there are neither groups nor duplicates."""
    digests = content_digests(data)
    groups = [str(g) for g in data.groups] if data.groups is not None else None
    if digests is None or len(set(digests)) == len(digests):
        return data.groups
    # union-find over images: same group or same content -> same component
    parent = list(range(len(digests)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_by_key = {}
    for i, key in enumerate(digests):
        for k in (("content", key),) + ((("group", groups[i]),) if groups else ()):
            if k in first_by_key:
                parent[root(i)] = root(first_by_key[k])
            else:
                first_by_key[k] = i
    return np.array([root(i) for i in range(len(digests))])


def _enough_groups(groups, folds: int) -> None:
    if groups is not None and len(set(groups)) < folds:
        raise ValueError(f"only {len(set(groups))} distinct images/groups (identical images count once, "
                         f"and a group stays on one side): too few for {folds} parts")


def stratified_split(data: ImageData, val_fraction: float = 0.2, seed: int = 0):
    """Splits into (train, val) keeping class proportions; groups (and identical images, see
    :func:`split_groups`) never land on both sides (StratifiedGroupKFold, ~1/val_fraction folds)."""
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    indices = np.arange(len(data))
    groups = split_groups(data)
    if groups is not None:
        folds = max(2, int(round(1.0 / val_fraction)))
        _enough_groups(groups, folds)
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        train_idx, val_idx = next(splitter.split(indices, _strata(data), groups))
    else:
        train_idx, val_idx = train_test_split(
            indices, test_size=val_fraction, random_state=seed, stratify=_strata(data)
        )
    return data.subset(np.sort(train_idx)), data.subset(np.sort(val_idx))


def train_val_test_split(data: ImageData, val_fraction=0.15, test_fraction=0.15, seed=0):
    """Three stratified (and, with groups, group-disjoint) parts."""
    rest, test = stratified_split(data, test_fraction, seed)
    train, val = stratified_split(rest, val_fraction / (1.0 - test_fraction), seed)
    return train, val, test


def kfold(data: ImageData, n_splits: int = 5, seed: int = 0):
    """Yields (train, val) for stratified k-fold; groups and identical images (see
    :func:`split_groups`) stay inside one fold."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    indices = np.arange(len(data))
    groups = split_groups(data)
    if groups is not None:
        _enough_groups(groups, n_splits)
        folds = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(
            indices, _strata(data), groups)
    else:
        folds = StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(indices, _strata(data))
    for train_idx, val_idx in folds:
        yield data.subset(train_idx), data.subset(val_idx)


def write_split(path: str | os.PathLike, parts: dict[str, ImageData]) -> Path:
    """Writes ``path,label,split,group`` rows (image/mask pairs: ``path,mask,stratum,split,group``)
    so a run can be repeated and audited."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pairs = any(isinstance(part.masks, list) for part in parts.values())
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "mask", "stratum", "split", "group"] if pairs else ["path", "label", "split", "group"])
        for split, part in parts.items():
            if part.paths is None:
                raise ValueError("only file-based data can be written as a split file")
            for i, file in enumerate(part.paths):
                label = part.labels[i]
                names = ([part.class_names[j] for j in np.flatnonzero(label)] if part.multi_label
                         else [part.class_names[int(label)]])
                group = part.groups[i] if part.groups is not None else ""
                if pairs:
                    writer.writerow([file, part.masks[i], names[0], split, group])
                else:
                    writer.writerow([file, "|".join(names), split, group])
    return path


def find_duplicates(first: ImageData, second: ImageData) -> list[tuple[str, str]]:
    """Pairs of files with identical content across two file-based sources (SHA-256)."""
    def digests(part):
        return dict(zip(content_digests(part) or [], part.paths or []))

    seen = digests(first)
    return [(seen[h], p) for h, p in digests(second).items() if h in seen]


@dataclasses.dataclass
class Splits:
    """The parts of a source a run uses; ``val``/``test`` may be None. ``skipped``: every
    file left out of any part when the sources were read (a part made by splitting another
    carries none of its own)."""

    train: object
    val: object = None
    test: object = None
    skipped: list = dataclasses.field(default_factory=list)

    def items(self):
        """(name, part) for the parts that exist, in train/val/test order."""
        return [(name, part) for name, part in (("train", self.train), ("val", self.val), ("test", self.test))
                if part is not None]


def has_part(source, split: str) -> bool:
    """Whether a source carries its own ``split`` part: an image folder's ``val/`` (or
    ``valid/``, ...) sub-folder, or an ``.npz``'s ``val_images`` arrays (MedMNIST layout)."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = Path(source)
    if path.is_dir():
        return find_split_dir(path, split) is not None
    if path.suffix.lower() == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as archive:
            return f"{split}_images" in archive.files
    return False


def resolve_splits(source, validation=None, test=None, *, class_names=None, val_fraction: float = 0.2,
                   test_fraction: float = 0.0, with_test: bool = True, seed: int = 0, read=None,
                   **read_options) -> Splits:
    """The one place that decides train / validation / test for every door.

    In order: an explicit ``validation``/``test`` source; else the source's own part (a
    folder's ``val/``/``test/`` sub-folder, an ``.npz``'s ``val_``/``test_`` arrays); else a
    stratified, group-aware ``test_fraction`` and then ``val_fraction`` of the training part
    (0 = none: cross-validation splits later). Every part takes the training part's class
    order (``class_names`` fixes it). ``with_test=False``: no test part (training needs
    none). ``read`` reads a source (a task's reader; default
    :func:`restransfer.data.sources.as_image_data`), with ``read_options``.
    """
    from restransfer.data.sources import as_image_data

    read = read or as_image_data
    train = read(source, class_names=class_names, split="train", **read_options)
    names = train.class_names
    skipped = list(train.skipped)
    if "keep_precision" in read_options:  # every part decoded as the training part is ("auto" resolved)
        read_options = {**read_options, "keep_precision": train.keep_precision}

    def part(explicit, split):
        found = None
        if explicit is not None:
            found = read(explicit, class_names=names, split=split, **read_options)
        elif has_part(source, split):
            found = read(source, class_names=names, split=split, **read_options)
        if found is not None:
            skipped.extend(found.skipped)
        return found

    val, test = part(validation, "val"), part(test, "test") if with_test else None
    if with_test and test is None and test_fraction and train.random_access:
        train, test = stratified_split(train, test_fraction, seed)
    if val is None and val_fraction and train.random_access:
        train, val = stratified_split(train, val_fraction, seed)
    for other in (val, test):
        if other is not None and train.paths and other.paths:
            for first, second in find_duplicates(train, other):
                log.warning("same image in train and %s: %s and %s",
                            "validation" if other is val else "test", first, second)
    return Splits(train, val, test, skipped=skipped)
