"""Image sources: folders, CSV files, arrays, ``.npz``, TFDS, scikit-learn's digits.

A source returns :class:`ImageData`: labels, class names, the files that were skipped and
why, and ``.dataset`` -- a tf.data pipeline of ``(image uint8 HxWxC, label)`` that
:func:`restransfer.data.pipeline.make_pipeline` turns into batches. Files are checked once,
when the source is made, so training never stops mid-epoch on a bad file. Images stream from
disk; training keeps them decoded and resized in memory when they fit (see
:func:`restransfer.data.pipeline.resized_pixels`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from restransfer.data.decoding import IMAGE_EXTENSIONS, first_line, load_image
from restransfer.data.splits import find_split_dir, split_folder
from restransfer.graph import plain

log = logging.getLogger("restransfer.data")


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

    Image/mask pairs (segmentation, :mod:`restransfer.data.masks`) also have ``masks``: mask
    files (class-index PNGs, read with ``mask_values`` mapping stored values to classes) or an
    array (N, H, W) of class indices, each the size of its image; ``ignore_index`` marks pixels
    without truth. Their ``labels`` are each image's stratum for splitting (its most frequent
    foreground class, 0 for an empty mask), and ``empty_masks`` counts the empty ones.
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
    masks: object = None              # segmentation: mask paths, or an array of class indices
    ignore_index: int | None = None
    mask_values: dict | None = None   # stored mask value -> class id (e.g. {0: 0, 255: 1})
    encoded_masks: object = None      # segmentation from TFDS: the masks' encoded PNG bytes
    empty_masks: int = 0
    pixel_stats: dict = dataclasses.field(default_factory=dict, repr=False)  # path -> image_stats(), from the check
    # image size -> every image decoded and resized once (pipeline.resized_pixels); not copied by subset
    _pixels: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices) -> "ImageData":
        indices = np.asarray(indices, dtype=int)
        if self.encoded is not None:
            raise ValueError("a TFDS source is split with TFDS split strings (train[:80%])")
        masks = self.masks
        if masks is not None:
            masks = [masks[i] for i in indices] if isinstance(masks, list) else masks[indices]
        return dataclasses.replace(
            self,
            labels=self.labels[indices],
            paths=[self.paths[i] for i in indices] if self.paths is not None else None,
            images=self.images[indices] if self.images is not None else None,
            groups=self.groups[indices] if self.groups is not None else None,
            masks=masks,
            skipped=[],
        )

    @property
    def has_masks(self) -> bool:
        """Image/mask pairs (segmentation) rather than labelled images."""
        return self.masks is not None or self.encoded_masks is not None

    def first_images(self, count: int) -> list[np.ndarray]:
        """The first ``count`` images, decoded as training decodes them."""
        if self.images is not None:
            return list(self.images[:count])
        if self.paths is not None:
            return [load_image(p, self.channels, self.keep_precision, **self.decode_options)
                    for p in self.paths[:count]]
        return [image.numpy() for image, _ in self.dataset.take(count)]

    @property
    def random_access(self) -> bool:
        """True when any image can be fetched by index (files, arrays; not TFDS streams)."""
        return self.encoded is None

    def fetcher(self):
        """A TF function: index -> (image, label), for files and in-memory arrays. Files are
        read and decoded by the image contract's TensorFlow ops (in parallel, without the
        GIL); only client-side formats (TIFF, DICOM, NIfTI) go through Python."""
        import tensorflow as tf

        from restransfer.data.decoding import graph_decoder, is_client_side

        target = self._target_fetcher()
        if self.images is not None:
            images = tf.constant(self.images)
            return lambda i: (tf.gather(images, i), target(i))
        channels, keep, options = self.channels, self.keep_precision, dict(self.decode_options)
        dtype = tf.float32 if keep else tf.uint8
        paths = tf.constant(self.paths)
        client_side = np.array([is_client_side(p) for p in self.paths], dtype=bool)
        flags = tf.constant(client_side)

        decoder = graph_decoder(channels, keep, options.get("normalize"))  # traced once per process

        def in_graph(path):
            return decoder(tf.io.read_file(path))

        def in_python(path):
            return tf.numpy_function(lambda p: load_image(p.decode(), channels, keep, **options),
                                     [path], dtype, stateful=False)

        def fetch(i):
            path = tf.gather(paths, i)
            if not client_side.any():
                image = in_graph(path)
            elif client_side.all():
                image = in_python(path)
            else:
                image = tf.cond(tf.gather(flags, i), lambda: in_python(path), lambda: in_graph(path))
            return tf.ensure_shape(image, [None, None, channels]), target(i)

        return fetch

    def _target_fetcher(self):
        """A TF function: index -> the image's target (its label, or its mask [H, W] uint8)."""
        import tensorflow as tf

        if self.masks is None:
            labels = tf.constant(self.labels)
            return lambda i: tf.gather(labels, i)
        if not isinstance(self.masks, list):
            masks = tf.constant(self.masks)
            return lambda i: tf.gather(masks, i)
        from restransfer.data.masks import read_mask

        paths, mapping = tf.constant(self.masks), self.mask_values

        def fetch(i):
            mask = tf.numpy_function(lambda p: read_mask(p.decode(), mapping), [tf.gather(paths, i)], tf.uint8,
                                     stateful=False)
            return tf.ensure_shape(mask, [None, None])

        return fetch

    @property
    def dataset(self):
        """Unbatched tf.data pipeline of (image uint8 HxWxC, label), in order."""
        import tensorflow as tf

        if self.encoded is not None:
            channels = self.channels

            from restransfer.data.decoding import decode_image_bytes

            keep, normalize = self.keep_precision, self.decode_options.get("normalize")

            def decode_bytes(encoded):
                return tf.ensure_shape(decode_image_bytes(encoded, channels, keep, normalize), [None, None, channels])

            images = self.encoded.map(plain(decode_bytes), num_parallel_calls=tf.data.AUTOTUNE)
            if self.encoded_masks is not None:
                from restransfer.data.masks import decode_mask_bytes

                mapping = self.mask_values
                masks = self.encoded_masks.map(plain(lambda encoded: decode_mask_bytes(encoded, mapping)),
                                               num_parallel_calls=tf.data.AUTOTUNE)
                return tf.data.Dataset.zip(images, masks)
            return tf.data.Dataset.zip(images, tf.data.Dataset.from_tensor_slices(self.labels))
        return tf.data.Dataset.range(len(self)).map(
            plain(self.fetcher()), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def image_stats(image: np.ndarray) -> tuple:
    """(height, width, channels as decoded, lowest, highest, sd) of one decoded image: what a
    data summary and the degenerate-data warning read."""
    return (int(image.shape[0]), int(image.shape[1]), int(image.shape[2]), float(image.min()),
            float(image.max()), float(np.asarray(image, np.float32).std()))


def check_files(paths: list[str], progress: bool = True, decode_options=None, stats: dict | None = None) -> dict[str, str]:
    """Decodes every file once (two threads); returns {path: reason} for the bad ones, and
    fills ``stats`` (when given) with each good file's :func:`image_stats`."""
    from tqdm.auto import tqdm

    from restransfer.data.decoding import inspect_image

    def check(path):
        reason, image = inspect_image(path, **(decode_options or {}))
        return reason, (image_stats(image) if image is not None else None)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = list(
            tqdm(pool.map(check, paths), total=len(paths), desc="checking images",
                 unit="img", disable=None if progress and len(paths) >= 50 else True, leave=False)
        )
    if stats is not None:
        stats.update({path: found for path, (_, found) in zip(paths, results) if found is not None})
    return {path: reason for path, (reason, _) in zip(paths, results) if reason}


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


def resolve_keep_precision(keep_precision: bool | str, paths: list[str]) -> bool:
    """``"auto"``: full precision when any of the files stores more than 8 bits per sample."""
    if keep_precision == "auto":
        from restransfer.data.decoding import high_bit_depth

        return any(high_bit_depth(p) for p in paths)
    if keep_precision not in (True, False):
        raise ValueError(f"keep_precision must be True, False or 'auto', got {keep_precision!r}")
    return bool(keep_precision)


def image_folder(
    path: str | os.PathLike,
    split: str | None = None,
    class_names: list[str] | None = None,
    policy: str = "skip",
    channels: int = 3,
    progress: bool = True,
    keep_precision: bool | str = False,
    decode_options: dict | None = None,
) -> ImageData:
    """Images in class sub-folders: ``path/<class>/*.jpg``, or ``path/<split>/<class>/``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` to read that sub-folder of ``path``.
        class_names: fix the class order (e.g. the training split's) instead of sorting.
        policy: ``"skip"`` bad files with a warning each and a count, or ``"strict"``.
        keep_precision: decode 16-bit files at full precision (float32 on the 0-255 scale);
            ``"auto"``: when any file stores more than 8 bits (16-bit PNG/TIFF, DICOM, NIfTI).
    """
    root = split_folder(path, split)
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
    stats: dict = {}
    bad = check_files(paths, progress=progress, decode_options=decode_options, stats=stats)
    skipped = apply_policy(bad, policy, str(root))
    keep = [i for i, p in enumerate(paths) if p not in bad]
    counts = np.bincount(np.asarray(labels, dtype=int)[keep], minlength=len(names))
    empty = [names[i] for i, count in enumerate(counts) if count == 0 and not class_names]
    if empty:
        raise ValueError(f"{root}: class folder(s) with no usable images: {empty}")
    kept = [paths[i] for i in keep]
    return ImageData(
        labels=np.asarray(labels, dtype=np.int32)[keep],
        class_names=names,
        paths=kept,
        skipped=skipped,
        channels=channels,
        keep_precision=resolve_keep_precision(keep_precision, kept),
        decode_options=dict(decode_options or {}),
        pixel_stats=stats,
    )


def from_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str] | None = None,
    multi_label: bool | None = None,
    channels: int | None = None,
) -> ImageData:
    """In-memory images (N, H, W[, C], 0-255) with class indices or multi-hot rows.

    ``channels`` (a recipe's): converted by the image contract's rule, as files are (RGBA on
    white, RGB to luma, gray replicated); None keeps what the arrays have (1 or 3 channels).
    Float arrays keep their precision (float32); floats that all lie in [0, 1] with fractions
    are refused (pixels are 0-255 here: multiply by 255)."""
    from restransfer.data.decoding import to_contract_pixels

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
    images = to_contract_pixels(images, channels)
    return ImageData(
        labels=labels,
        class_names=list(class_names) if class_names else [str(i) for i in range(num_classes)],
        images=images,
        multi_label=bool(multi_label),
        channels=images.shape[-1],
        keep_precision=images.dtype != np.uint8,
    )


def read_table(table, root, needed: list[str]):
    """(frame, its name for messages, the root its paths are relative to) of a CSV file or a
    DataFrame, refused when a ``needed`` column is missing. The root defaults to the CSV's
    folder (the working directory for a DataFrame)."""
    import pandas as pd

    if isinstance(table, pd.DataFrame):
        frame, where = table, "DataFrame"
        root = Path(root) if root is not None else Path.cwd()
    else:
        frame, where = pd.read_csv(table), str(table)
        root = Path(root) if root is not None else Path(table).resolve().parent
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; columns are {list(frame.columns)}")
    return frame, where, root


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
    keep_precision: bool | str = False,
    decode_options: dict | None = None,
) -> ImageData:
    """Images listed in a CSV file or a pandas DataFrame.

    Single-label: ``label_column`` holds a class name per row. Multi-label: either
    ``label_columns`` (one 0/1 column per class) or ``separator`` (``"Effusion|Mass"`` in
    ``label_column``). Paths are relative to ``root`` (default: the CSV's folder) and may not
    escape it unless ``allow_outside_root``. ``group_column`` (e.g. a patient id) is kept
    for grouped splits.
    """
    needed = [path_column] + (label_columns or [label_column]) + ([group_column] if group_column else [])
    frame, where, root = read_table(table, root, needed)
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
    stats: dict = {}
    bad = check_files(paths, progress=progress, decode_options=decode_options, stats=stats)
    skipped = apply_policy(bad, policy, where)
    keep = [i for i, p in enumerate(paths) if p not in bad]
    kept = [paths[i] for i in keep]
    return ImageData(labels=labels[keep], class_names=names, paths=kept,
                     skipped=skipped, multi_label=multi_label, channels=channels,
                     groups=groups[keep] if groups is not None else None,
                     keep_precision=resolve_keep_precision(keep_precision, kept),
                     decode_options=dict(decode_options or {}), pixel_stats=stats)


def from_npz(path: str | os.PathLike, split: str = "train", class_names=None, channels: int | None = None) -> ImageData:
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
    return from_arrays(images, labels, class_names=class_names, channels=channels)


def from_tfds(name: str, split: str = "train", data_dir: str | None = None,
              image_key: str = "image", label_key: str = "label", channels: int = 3,
              download: bool = True) -> ImageData:
    """A TensorFlow Datasets dataset (``"tf_flowers"`` or ``"tfds:tf_flowers"``), read with
    tensorflow-datasets' own loader from its data dir. Split strings such as ``train[:80%]``
    work as in TFDS. A dataset not yet prepared is downloaded and prepared as ``tfds.load``
    does (``download=False`` turns that off); where its download server cannot be reached,
    the error comes at once instead of after TFDS' minutes of retries."""
    ds, info = load_tfds(name, split, data_dir, download, skip_decoding=(image_key,))
    label_feature = info.features[label_key]
    labels = np.fromiter(ds.map(plain(lambda ex: ex[label_key])).as_numpy_iterator(), dtype=np.int32)
    return ImageData(labels=labels, class_names=list(label_feature.names),
                     encoded=ds.map(plain(lambda ex: ex[image_key])), channels=channels)


def load_tfds(name: str, split: str, data_dir: str | None, download: bool, skip_decoding=("image",)):
    """(dataset, info) of a TFDS split, its ``skip_decoding`` features left encoded (restransfer
    decodes images by its own contract); see :func:`from_tfds` for downloading."""
    import tensorflow_datasets as tfds

    name = name.removeprefix("tfds:")
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"

    def not_prepared(reason: str):
        return FileNotFoundError(
            f"TFDS dataset {name!r} (split {split!r}) is not prepared in {where}, and {reason}. On a "
            f"machine with internet run `tfds build {name}` (or tfds.builder('{name}').download_and_prepare()), "
            f"then copy its tensorflow_datasets/{name} directory into {where} (or pass data_dir= / set "
            f"TFDS_DATA_DIR).")

    def load(allow_download: bool):
        return tfds.load(name, split=split, data_dir=data_dir, download=allow_download, with_info=True,
                         decoders={key: tfds.decode.SkipDecoding() for key in skip_decoding})

    try:
        try:
            return load(False)
        except (AssertionError, FileNotFoundError) as error:  # TFDS: "Dataset ... not found"
            if not download:
                raise not_prepared(f"downloading is off ({first_line(error)})") from None
            unreachable = _unreachable_download_host(tfds.builder(name, data_dir=data_dir))
            if unreachable:
                raise not_prepared(f"its download server cannot be reached ({unreachable})") from None
            return load(True)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(f"unknown TFDS dataset {name!r}: {first_line(error)}") from None


def _unreachable_download_host(builder, timeout: float = 5.0) -> str | None:
    """Why the dataset's first download URL's host cannot be reached, or None. One TCP
    connection attempt instead of TFDS' retries; datasets without registered URLs pass."""
    from restransfer.net import unreachable

    urls = list(getattr(builder, "url_infos", None) or {})
    return unreachable(urls[0], timeout) if urls else None


def sklearn_digits() -> ImageData:
    """scikit-learn's bundled handwritten digits: 1,797 real 8x8 grayscale scans, shipped
    inside scikit-learn, so they need no download (``"sklearn:digits"`` in recipes)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return from_arrays(images, digits.target, class_names=[str(i) for i in range(10)])


def as_image_data(source, class_names=None, split=None, policy="skip", channels=3,
                  decode_options=None, csv: dict | None = None, download: bool = True,
                  keep_precision: bool | str = False) -> ImageData:
    """Coerces what users pass to ``fit``/``evaluate`` into :class:`ImageData`: an image
    folder, a ``.csv`` (path,label; ``csv`` holds :func:`from_csv`'s column options), an
    ``.npz`` (MedMNIST layout), ``"tfds:NAME[:SPLIT]"``, ``"sklearn:digits"``, or an
    ``(images, labels)`` tuple. ``ImageData`` must already have ``class_names``' order; its
    images are read with ``channels`` channels by the same rule as files.
    ``download``: TFDS datasets not yet prepared are downloaded (see :func:`from_tfds`).
    ``keep_precision``: see :func:`image_folder`."""
    if isinstance(source, ImageData):
        if class_names is not None and list(source.class_names) != list(class_names):
            raise ValueError(f"the data's classes {source.class_names} are not the model's "
                             f"{list(class_names)} (same names, same order)")
        return with_channels(source, channels)
    if source == "sklearn:digits":
        return with_channels(sklearn_digits(), channels)
    files = dict(policy=policy, channels=channels, decode_options=decode_options, keep_precision=keep_precision)
    if isinstance(source, str) and source.startswith("tfds:"):
        name, _, tfds_split = source.removeprefix("tfds:").partition(":")
        return from_tfds(name, split=tfds_split or split or "train", channels=channels, download=download)
    if isinstance(source, (str, os.PathLike)) and str(source).lower().endswith(".csv"):
        columns = {k: v for k, v in (csv or {}).items()
                   if k in ("path_column", "label_column", "label_columns", "separator", "group_column")}
        return from_csv(source, class_names=class_names, **files, **columns)
    if isinstance(source, (str, os.PathLike)) and str(source).lower().endswith(".npz"):
        return from_npz(source, split={"val": "val", "test": "test"}.get(split, "train"),
                        class_names=class_names, channels=channels)
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if split and find_split_dir(root, split) is None:
            split = None
        return image_folder(root, split=split, class_names=class_names, **files)
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return from_arrays(source[0], source[1], class_names=class_names, channels=channels)
    raise TypeError(
        "data must be an image folder path, an (images, labels) tuple, restransfer ImageData, "
        f"or a tf.data.Dataset; got {type(source).__name__}"
    )


def with_channels(data: ImageData, channels: int | None) -> ImageData:
    """``data`` read with ``channels`` channels (the recipe's): arrays converted by the image
    contract's rule, files and streams decoded with that many."""
    if channels is None or data.channels == channels:
        return data
    if data.images is not None:
        from restransfer.data.decoding import to_contract_pixels

        return dataclasses.replace(data, images=to_contract_pixels(data.images, channels), channels=channels)
    return dataclasses.replace(data, channels=channels)
