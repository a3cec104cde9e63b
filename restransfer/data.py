"""Image sources and the tf.data input pipeline every recipe uses.

A source (:func:`image_folder`, :func:`from_arrays`) returns :class:`ImageData`: labels,
class names, the files that were skipped and why, and ``.dataset`` -- a tf.data pipeline of
``(image uint8 HxWxC, label)``. :func:`make_pipeline` turns it into resized, optionally
augmented batches. Files are checked once, when the source is made, so training never
stops mid-epoch on a bad file. Images stream from disk; nothing stacks a whole folder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger("restransfer.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".dcm", ".dicom", ".nii", ".nii.gz")
SPLIT_DIR_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation"),
                   "test": ("test", "testing")}


class BadImagesError(ValueError):
    """Raised under ``policy="strict"``; lists every file that could not be used."""


@dataclasses.dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


@dataclasses.dataclass
class ImageData:
    """Labelled images from one source.

    Exactly one of ``paths`` (decoded lazily from disk), ``images`` (in memory) or
    ``encoded`` (a tf.data pipeline of encoded image bytes, e.g. from TFDS) is set.
    ``labels`` holds class indices, or 0/1 rows for multi-label data; ``groups`` an optional
    group id per image (a patient, say) that splits never divide.
    ``keep_precision`` decodes 16-bit files to float32 (0-255 scale, full precision).
    """

    labels: np.ndarray
    class_names: list[str]
    paths: list[str] | None = None
    images: np.ndarray | None = None
    encoded: object = None
    skipped: list[SkippedFile] = dataclasses.field(default_factory=list)
    multi_label: bool = False
    channels: int = 3
    groups: np.ndarray | None = None
    keep_precision: bool = False
    decode_options: dict = dataclasses.field(default_factory=dict)  # DICOM/NIfTI: window, normalize, axis

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices) -> "ImageData":
        indices = np.asarray(indices, dtype=int)
        if self.encoded is not None:
            raise ValueError("a TFDS source is split with TFDS split strings (train[:80%])")
        return dataclasses.replace(
            self,
            labels=self.labels[indices],
            paths=[self.paths[i] for i in indices] if self.paths is not None else None,
            images=self.images[indices] if self.images is not None else None,
            groups=self.groups[indices] if self.groups is not None else None,
            skipped=[],
        )

    @property
    def random_access(self) -> bool:
        """True when any image can be fetched by index (files, arrays; not TFDS streams)."""
        return self.encoded is None

    def fetcher(self):
        """A TF function: index -> (image, label), for files and in-memory arrays."""
        import tensorflow as tf

        labels = tf.constant(self.labels)
        if self.images is not None:
            images = tf.constant(self.images)
            return lambda i: (tf.gather(images, i), tf.gather(labels, i))
        channels, keep, options = self.channels, self.keep_precision, dict(self.decode_options)
        dtype = tf.float32 if keep else tf.uint8
        paths = tf.constant(self.paths)

        def fetch(i):
            image = tf.numpy_function(lambda p: load_image(p.decode(), channels, keep, **options),
                                      [tf.gather(paths, i)], dtype, stateful=False)
            return tf.ensure_shape(image, [None, None, channels]), tf.gather(labels, i)

        return fetch

    @property
    def dataset(self):
        """Unbatched tf.data pipeline of (image uint8 HxWxC, label), in order."""
        import tensorflow as tf

        if self.encoded is not None:
            channels = self.channels

            def decode_bytes(encoded):
                image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
                return tf.ensure_shape(image, [None, None, channels])

            images = self.encoded.map(decode_bytes, num_parallel_calls=tf.data.AUTOTUNE)
            return tf.data.Dataset.zip(images, tf.data.Dataset.from_tensor_slices(self.labels))
        return tf.data.Dataset.range(len(self)).map(
            self.fetcher(), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# --- decoding ------------------------------------------------------------------------------


def load_image(path: str | os.PathLike, channels: int = 3, keep_precision: bool = False,
               **medical_options) -> np.ndarray:
    """Decodes one file to uint8 HxWxC with PIL: EXIF orientation honoured, first GIF frame,
    grayscale/RGBA/CMYK/palette converted, 16-bit scaled to 8-bit. DICOM and NIfTI
    (``volume.nii.gz#slice``) go through :mod:`restransfer.medical` (``medical_options``:
    window, normalize, axis).

    With ``keep_precision`` the result is float32 on the same 0-255 scale; a 16-bit image
    keeps all of its 65,536 levels (value * 255 / 65535) instead of being quantised.
    """
    from PIL import Image, ImageOps

    from restransfer.medical import is_medical, read_medical

    if is_medical(path):
        gray = read_medical(path, **medical_options)
        image = gray if channels == 1 else np.repeat(gray, 3, axis=-1)
        return image if keep_precision else np.round(image).astype(np.uint8)

    with Image.open(path) as image:
        image.seek(0)
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
            if keep_precision:
                gray = array.astype(np.float32)[..., None]
                return gray if channels == 1 else np.repeat(gray, 3, axis=-1)
            image = Image.fromarray(np.round(array).astype(np.uint8))
        target = "L" if channels == 1 else "RGB"
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # Composite on white: transparent pixels are usually background.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        array = np.asarray(image.convert(target), dtype=np.uint8)
    array = array[..., None] if array.ndim == 2 else array
    return array.astype(np.float32) if keep_precision else array


def check_image(path: str, **medical_options) -> str | None:
    """Why a file cannot be used as an image, or None if it decodes fully."""
    try:
        if os.path.getsize(path.split("#", 1)[0]) == 0:
            return "empty file (0 bytes)"
        image = load_image(path, **medical_options)
    except PermissionError:
        return "permission denied"
    except ImportError as error:  # pydicom/nibabel missing: not the file's fault, say so once
        raise ImportError(f"{path}: {error}") from None
    except Exception as error:  # PIL raises many types for corrupt data
        return f"cannot be decoded ({type(error).__name__}: {error})"
    if image.shape[0] < 2 or image.shape[1] < 2:
        return f"too small ({image.shape[1]}x{image.shape[0]})"
    return None


def check_files(paths: list[str], progress: bool = True, decode_options=None) -> dict[str, str]:
    """Decodes every file once (two threads); returns {path: reason} for the bad ones."""
    import functools

    from tqdm.auto import tqdm

    check = functools.partial(check_image, **(decode_options or {}))
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        reasons = list(
            tqdm(pool.map(check, paths), total=len(paths), desc="checking images",
                 unit="img", disable=not progress or len(paths) < 50, leave=False)
        )
    return {path: reason for path, reason in zip(paths, reasons) if reason}


def apply_policy(bad: dict[str, str], policy: str, source: str) -> list[SkippedFile]:
    if policy not in ("skip", "strict"):
        raise ValueError(f"bad-image policy must be 'skip' or 'strict', got {policy!r}")
    skipped = [SkippedFile(path, reason) for path, reason in sorted(bad.items())]
    if skipped and policy == "strict":
        listing = "\n".join(f"  {s.path}: {s.reason}" for s in skipped)
        raise BadImagesError(f"{len(skipped)} unusable image(s) in {source}:\n{listing}")
    for item in skipped:
        log.warning("skipping %s: %s", item.path, item.reason)
    if skipped:
        log.warning("%d file(s) skipped in %s", len(skipped), source)
    return skipped


# --- sources -------------------------------------------------------------------------------


def find_split_dir(root: Path, split: str) -> Path | None:
    for name in SPLIT_DIR_NAMES[split]:
        if (root / name).is_dir():
            return root / name
    return None


def image_folder(
    path: str | os.PathLike,
    split: str | None = None,
    class_names: list[str] | None = None,
    policy: str = "skip",
    channels: int = 3,
    progress: bool = True,
    keep_precision: bool = False,
    decode_options: dict | None = None,
) -> ImageData:
    """Images in class sub-folders: ``path/<class>/*.jpg``, or ``path/<split>/<class>/``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` to read that sub-folder of ``path``.
        class_names: fix the class order (e.g. the training split's) instead of sorting.
        policy: ``"skip"`` bad files with a warning each and a count, or ``"strict"``.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    if split is not None:
        split_dir = find_split_dir(root, split)
        if split_dir is None:
            raise FileNotFoundError(f"{root} has no {split!r} sub-folder ({'/'.join(SPLIT_DIR_NAMES[split])})")
        root = split_dir
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
    names = list(class_names) if class_names else found
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise ValueError(f"{root}: folders {unknown} are not among the classes {names}")
    paths, labels, ignored = [], [], 0
    for index, name in enumerate(names):
        class_dir = root / name
        files = sorted(p for p in class_dir.rglob("*") if p.is_file()) if class_dir.is_dir() else []
        images = [p for p in files if p.name.lower().endswith(IMAGE_EXTENSIONS) and not p.name.startswith(".")]
        ignored += len(files) - len(images)
        paths += [str(p) for p in images]
        labels += [index] * len(images)
    if ignored:
        log.info("%s: ignored %d file(s) without an image extension", root, ignored)
    bad = check_files(paths, progress=progress, decode_options=decode_options)
    skipped = apply_policy(bad, policy, str(root))
    keep = [i for i, p in enumerate(paths) if p not in bad]
    counts = np.bincount(np.asarray(labels, dtype=int)[keep], minlength=len(names))
    empty = [names[i] for i, count in enumerate(counts) if count == 0 and not class_names]
    if empty:
        raise ValueError(f"{root}: class folder(s) with no usable images: {empty}")
    return ImageData(
        labels=np.asarray(labels, dtype=np.int32)[keep],
        class_names=names,
        paths=[paths[i] for i in keep],
        skipped=skipped,
        channels=channels,
        keep_precision=keep_precision,
        decode_options=dict(decode_options or {}),
    )


def from_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str] | None = None,
    multi_label: bool | None = None,
) -> ImageData:
    """In-memory images (N, H, W[, C], 0-255) with class indices or multi-hot rows."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, H, W[, C]), got {images.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if multi_label is None:
        multi_label = labels.ndim == 2 and labels.shape[1] > 1
    if multi_label:
        num_classes = labels.shape[1]
        labels = labels.astype(np.float32)
    else:
        labels = labels.reshape(-1).astype(np.int32)
        num_classes = int(labels.max()) + 1 if class_names is None else len(class_names)
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    if images.dtype != np.uint8:
        if images.min() < 0 or images.max() > 255:
            raise ValueError("images must hold raw pixel values in 0..255")
        images = np.round(images).astype(np.uint8)
    return ImageData(
        labels=labels,
        class_names=list(class_names) if class_names else [str(i) for i in range(num_classes)],
        images=images,
        multi_label=bool(multi_label),
        channels=images.shape[-1],
    )


def _resolve_under(root: Path, relative: str, allow_outside_root: bool, where: str) -> str:
    path = (root / relative).resolve()
    if not allow_outside_root and not path.is_relative_to(root.resolve()):
        raise ValueError(f"{where}: path {relative!r} escapes the data root {root} "
                         "(pass allow_outside_root=True to permit it)")
    return str(path)


def from_csv(
    table,
    path_column: str = "path",
    label_column: str | None = "label",
    label_columns: list[str] | None = None,
    separator: str | None = None,
    group_column: str | None = None,
    root: str | os.PathLike | None = None,
    class_names: list[str] | None = None,
    policy: str = "skip",
    channels: int = 3,
    allow_outside_root: bool = False,
    progress: bool = True,
    keep_precision: bool = False,
    decode_options: dict | None = None,
) -> ImageData:
    """Images listed in a CSV file or a pandas DataFrame.

    Single-label: ``label_column`` holds a class name per row. Multi-label: either
    ``label_columns`` (one 0/1 column per class) or ``separator`` (``"Effusion|Mass"`` in
    ``label_column``). Paths are relative to ``root`` (default: the CSV's folder) and may not
    escape it unless ``allow_outside_root``. ``group_column`` (e.g. a patient id) is kept
    for grouped splits.
    """
    import pandas as pd

    if isinstance(table, pd.DataFrame):
        frame, where = table, "DataFrame"
        root = Path(root) if root is not None else Path.cwd()
    else:
        frame, where = pd.read_csv(table), str(table)
        root = Path(root) if root is not None else Path(table).resolve().parent
    needed = [path_column] + (label_columns or [label_column]) + ([group_column] if group_column else [])
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; columns are {list(frame.columns)}")
    paths = [_resolve_under(root, str(p), allow_outside_root, f"{where} row {i + 2}")
             for i, p in enumerate(frame[path_column])]
    multi_label = bool(label_columns) or separator is not None
    if label_columns:
        names = list(label_columns)
        labels = frame[label_columns].to_numpy(dtype=np.float32)
        bad_rows = np.flatnonzero(~np.isin(labels, (0.0, 1.0)).all(axis=1))
        if len(bad_rows):
            raise ValueError(f"{where} row {bad_rows[0] + 2}: label columns must hold 0 or 1")
    else:
        raw = frame[label_column].astype(str).str.strip()
        rows = [[t.strip() for t in value.split(separator) if t.strip()] if separator else [value]
                for value in raw]
        names = list(class_names) if class_names else sorted({t for row in rows for t in row})
        index = {name: i for i, name in enumerate(names)}
        for i, row in enumerate(rows):
            unknown = [t for t in row if t not in index]
            if unknown:
                raise ValueError(f"{where} row {i + 2}: label(s) {unknown} not among the classes {names}")
        if multi_label:
            labels = np.zeros((len(rows), len(names)), np.float32)
            for i, row in enumerate(rows):
                labels[i, [index[t] for t in row]] = 1.0
        else:
            labels = np.asarray([index[row[0]] for row in rows], np.int32)
    groups = frame[group_column].astype(str).to_numpy() if group_column else None
    bad = check_files(paths, progress=progress, decode_options=decode_options)
    skipped = apply_policy(bad, policy, where)
    keep = [i for i, p in enumerate(paths) if p not in bad]
    return ImageData(labels=labels[keep], class_names=names, paths=[paths[i] for i in keep],
                     skipped=skipped, multi_label=multi_label, channels=channels,
                     groups=groups[keep] if groups is not None else None,
                     keep_precision=keep_precision, decode_options=dict(decode_options or {}))


def from_npz(path: str | os.PathLike, split: str = "train", class_names=None) -> ImageData:
    """Arrays in an .npz with the MedMNIST layout: ``<split>_images``, ``<split>_labels``
    (class ids, or 0/1 rows for multi-label), and optionally ``class_names``."""
    with np.load(path, allow_pickle=False) as archive:
        if class_names is None and "class_names" in archive:
            class_names = [str(name) for name in archive["class_names"]]
        keys = (f"{split}_images", f"{split}_labels")
        missing = [k for k in keys if k not in archive]
        if missing:
            raise ValueError(f"{path}: no {missing} (has {sorted(archive.files)})")
        images, labels = archive[keys[0]], archive[keys[1]]
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    return from_arrays(images, labels, class_names=class_names)


def from_tfds(name: str, split: str = "train", data_dir: str | None = None,
              image_key: str = "image", label_key: str = "label", channels: int = 3) -> ImageData:
    """A TensorFlow Datasets dataset (``"tf_flowers"`` or ``"tfds:tf_flowers"``), read with
    tensorflow-datasets' own loader from its data dir; never downloads (this may be offline).
    Split strings such as ``train[:80%]`` work as in TFDS."""
    import tensorflow_datasets as tfds

    name = name.removeprefix("tfds:")
    try:
        ds, info = tfds.load(name, split=split, data_dir=data_dir, download=False, with_info=True,
                             decoders={image_key: tfds.decode.SkipDecoding()})
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(f"unknown TFDS dataset {name!r}: {str(error).splitlines()[0]}") from None
    except (AssertionError, FileNotFoundError) as error:  # TFDS: "Dataset ... not found"
        where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        raise FileNotFoundError(
            f"TFDS dataset {name!r} (split {split!r}) is not prepared in {where}, and restransfer "
            f"does not download. On a machine with internet run `tfds build {name}` (or "
            f"tfds.builder('{name}').download_and_prepare()), then copy its "
            f"tensorflow_datasets/{name} directory into {where} (or pass data_dir= / set "
            f"TFDS_DATA_DIR). ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
        ) from None
    label_feature = info.features[label_key]
    labels = np.fromiter(ds.map(lambda ex: ex[label_key]).as_numpy_iterator(), dtype=np.int32)
    return ImageData(labels=labels, class_names=list(label_feature.names),
                     encoded=ds.map(lambda ex: ex[image_key]), channels=channels)


def sklearn_digits() -> ImageData:
    """scikit-learn's bundled handwritten digits: 1,797 real 8x8 grayscale scans, shipped
    inside scikit-learn, so they need no download (``"sklearn:digits"`` in recipes)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return from_arrays(images, digits.target, class_names=[str(i) for i in range(10)])


# --- splits (scikit-learn) -----------------------------------------------------------------


def _strata(data: ImageData) -> np.ndarray:
    # Multi-label rows are stratified by their first positive label (-1 for none): a
    # simple, stable approximation of label balance.
    if not data.multi_label:
        return data.labels
    return np.where(data.labels.any(axis=1), data.labels.argmax(axis=1), -1)


def stratified_split(data: ImageData, val_fraction: float = 0.2, seed: int = 0):
    """Splits into (train, val) keeping class proportions; with ``data.groups`` no group
    lands on both sides (StratifiedGroupKFold with ~1/val_fraction folds)."""
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    indices = np.arange(len(data))
    if data.groups is not None:
        folds = max(2, int(round(1.0 / val_fraction)))
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        train_idx, val_idx = next(splitter.split(indices, _strata(data), data.groups))
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
    """Yields (train, val) for stratified k-fold, group-aware when ``data.groups`` is set."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    indices = np.arange(len(data))
    if data.groups is not None:
        folds = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(
            indices, _strata(data), data.groups)
    else:
        folds = StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(indices, _strata(data))
    for train_idx, val_idx in folds:
        yield data.subset(train_idx), data.subset(val_idx)


def write_split(path: str | os.PathLike, parts: dict[str, ImageData]) -> Path:
    """Writes ``path,label,split[,group]`` rows so a run can be repeated and audited."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", "group"])
        for split, part in parts.items():
            if part.paths is None:
                raise ValueError("only file-based data can be written as a split file")
            for i, file in enumerate(part.paths):
                label = part.labels[i]
                names = ([part.class_names[j] for j in np.flatnonzero(label)] if part.multi_label
                         else [part.class_names[int(label)]])
                group = part.groups[i] if part.groups is not None else ""
                writer.writerow([file, "|".join(names), split, group])
    return path


def find_duplicates(first: ImageData, second: ImageData) -> list[tuple[str, str]]:
    """Pairs of files with identical content across two file-based sources (SHA-256)."""
    import hashlib

    def digests(part):
        return {hashlib.sha256(Path(p).read_bytes()).hexdigest(): p for p in part.paths or []}

    seen = digests(first)
    return [(seen[h], p) for h, p in digests(second).items() if h in seen]


def as_image_data(source, class_names=None, split=None, policy="skip", channels=3,
                  decode_options=None) -> ImageData:
    """Coerces what users pass to ``fit``/``evaluate`` into :class:`ImageData`: an image
    folder, a ``.csv`` (path,label), an ``.npz`` (MedMNIST layout), ``"tfds:NAME[:SPLIT]"``,
    ``"sklearn:digits"``, or an ``(images, labels)`` tuple."""
    if isinstance(source, ImageData):
        return source
    if source == "sklearn:digits":
        return sklearn_digits()
    if isinstance(source, str) and source.startswith("tfds:"):
        name, _, tfds_split = source.removeprefix("tfds:").partition(":")
        return from_tfds(name, split=tfds_split or split or "train", channels=channels)
    if isinstance(source, (str, os.PathLike)) and str(source).lower().endswith(".csv"):
        return from_csv(source, class_names=class_names, policy=policy, channels=channels,
                        decode_options=decode_options)
    if isinstance(source, (str, os.PathLike)) and str(source).lower().endswith(".npz"):
        return from_npz(source, split={"val": "val", "test": "test"}.get(split, "train"),
                        class_names=class_names)
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if split and find_split_dir(root, split) is None:
            split = None
        return image_folder(root, split=split, class_names=class_names, policy=policy,
                            channels=channels, decode_options=decode_options)
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return from_arrays(source[0], source[1], class_names=class_names)
    raise TypeError(
        "data must be an image folder path, an (images, labels) tuple, restransfer ImageData, "
        f"or a tf.data.Dataset; got {type(source).__name__}"
    )


# --- pipeline ------------------------------------------------------------------------------


def resize_image(image, image_size: int):
    """The one resize used in training, evaluation and the exported serving graph."""
    import tensorflow as tf

    return tf.image.resize(tf.cast(image, tf.float32), (image_size, image_size),
                           method="bilinear", antialias=True)


def epoch_order(count: int, seed: int, epoch):
    """The order epoch ``epoch`` visits ``count`` images in, drawn from (seed, epoch)."""
    import tensorflow as tf

    return tf.random.experimental.stateless_shuffle(
        tf.range(count, dtype=tf.int64),
        seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)]))


def make_pipeline(
    data: ImageData,
    image_size: int,
    batch_size: int,
    training: bool = False,
    augmentation=None,
    seed: int = 0,
    start_epoch: int = 0,
    in_order: bool = False,
    epochs: int | None = None,
    shard: tuple[int, int] | None = None,
):
    """Batches of (float32 images 0-255 at image_size, labels), prefetched.

    ``shard=(workers, index)`` (training pipelines, multi-worker): this worker's share of
    every epoch -- every ``workers``-th image of the epoch's order from ``index``, the same
    number on every worker (the ``len % workers`` images left over change each epoch). Only
    the shard's files are read.

    ``in_order`` keeps index order in training pipelines (still augmented with the epoch's
    seeds): used to cache augmented views of features. ``epochs`` bounds the pipeline.

    Evaluation pipelines are finite and in order. Training pipelines are endless (fit with
    ``steps_per_epoch``): epoch ``e`` visits the images in an order drawn from ``(seed, e)``
    and augments image ``i`` with a seed drawn from ``(seed, e, i)``, so any epoch can be
    reproduced exactly -- which is what makes an interrupted run resumable from
    ``start_epoch`` with the same data it would have seen.
    """
    import tensorflow as tf

    from restransfer.augmentation import Augmenter

    resize = lambda image, label, *rest: (resize_image(image, image_size), label, *rest)
    if not training:
        return data.dataset.map(resize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True) \
            .batch(batch_size).prefetch(tf.data.AUTOTUNE)
    augmenter = Augmenter(augmentation, image_size)
    active = augmenter.active
    channels = data.channels

    def augment_batch(images, labels, image_seeds):
        # One Python call per batch, not per image: fewer GIL hand-offs (~2x faster here).
        pixels = tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)
        out = tf.numpy_function(augmenter.batch, [pixels, image_seeds], tf.uint8, stateful=False)
        out = tf.ensure_shape(out, [None, image_size, image_size, channels])
        return tf.cast(out, tf.float32), labels

    count = len(data)
    if data.random_access:
        fetch = data.fetcher()

        def one_epoch(epoch):
            order = tf.range(count, dtype=tf.int64) if in_order else epoch_order(count, seed, epoch)
            if shard is not None:
                workers, index = shard
                order = order[index: count // workers * workers: workers]
            image_seeds = seed * 1_000_003 + epoch * 100_003 + order
            return tf.data.Dataset.from_tensor_slices((order, image_seeds)).map(
                lambda i, s: (*fetch(i), s), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

        last = start_epoch + epochs if epochs is not None else 2**31
        ds = tf.data.Dataset.range(start_epoch, last).flat_map(
            lambda epoch: one_epoch(epoch).map(resize, num_parallel_calls=tf.data.AUTOTUNE,
                                               deterministic=True).batch(batch_size))
    else:  # streamed sources (TFDS): seeded shuffle, not reproducible across a resume
        ds = data.dataset if shard is None else data.dataset.shard(*shard)
        ds = ds.shuffle(min(count, 10_000), seed=seed, reshuffle_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True))
        ds = ds.map(lambda item, s: resize(item[0], item[1], s), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(batch_size).repeat()
    if active:
        ds = ds.map(augment_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = ds.map(lambda images, labels, _: (images, labels))
    return ds.prefetch(tf.data.AUTOTUNE)
