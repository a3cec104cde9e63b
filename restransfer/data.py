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

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
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

    Exactly one of ``paths`` (decoded lazily from disk) or ``images`` (in memory) is set.
    ``labels`` holds class indices, or 0/1 rows for multi-label data.
    """

    labels: np.ndarray
    class_names: list[str]
    paths: list[str] | None = None
    images: np.ndarray | None = None
    skipped: list[SkippedFile] = dataclasses.field(default_factory=list)
    multi_label: bool = False
    channels: int = 3

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices) -> "ImageData":
        indices = np.asarray(indices, dtype=int)
        return dataclasses.replace(
            self,
            labels=self.labels[indices],
            paths=[self.paths[i] for i in indices] if self.paths is not None else None,
            images=self.images[indices] if self.images is not None else None,
            skipped=[],
        )

    @property
    def dataset(self):
        """Unbatched tf.data pipeline of (image uint8 HxWxC, label)."""
        import tensorflow as tf

        labels = tf.data.Dataset.from_tensor_slices(self.labels)
        if self.images is not None:
            return tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices(self.images), labels)
        channels = self.channels

        def decode(path):
            image = tf.numpy_function(
                lambda p: load_image(p.decode(), channels), [path], tf.uint8, stateful=False
            )
            return tf.ensure_shape(image, [None, None, channels])

        paths = tf.data.Dataset.from_tensor_slices(self.paths).map(
            decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        return tf.data.Dataset.zip(paths, labels)


# --- decoding ------------------------------------------------------------------------------


def load_image(path: str | os.PathLike, channels: int = 3) -> np.ndarray:
    """Decodes one file to uint8 HxWxC with PIL: EXIF orientation honoured, first GIF frame,
    grayscale/RGBA/CMYK/palette converted, 16-bit scaled to 8-bit."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.seek(0)
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, dtype=np.float64)
            top = 65535.0 if array.max() > 255 else 255.0
            image = Image.fromarray(np.round(array * (255.0 / top)).astype(np.uint8))
        target = "L" if channels == 1 else "RGB"
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # Composite on white: transparent pixels are usually background.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        array = np.asarray(image.convert(target), dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def check_image(path: str) -> str | None:
    """Why a file cannot be used as an image, or None if it decodes fully."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        image = load_image(path)
    except PermissionError:
        return "permission denied"
    except Exception as error:  # PIL raises many types for corrupt data
        return f"cannot be decoded ({type(error).__name__}: {error})"
    if image.shape[0] < 2 or image.shape[1] < 2:
        return f"too small ({image.shape[1]}x{image.shape[0]})"
    return None


def check_files(paths: list[str], progress: bool = True) -> dict[str, str]:
    """Decodes every file once (two threads); returns {path: reason} for the bad ones."""
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        reasons = list(
            tqdm(pool.map(check_image, paths), total=len(paths), desc="checking images",
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
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
        ignored += len(files) - len(images)
        paths += [str(p) for p in images]
        labels += [index] * len(images)
    if ignored:
        log.info("%s: ignored %d file(s) without an image extension", root, ignored)
    bad = check_files(paths, progress=progress)
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


def stratified_split(data: ImageData, val_fraction: float = 0.2, seed: int = 0):
    """Splits into (train, val) keeping class proportions (scikit-learn)."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(data))
    stratify = None if data.multi_label else data.labels
    train_idx, val_idx = train_test_split(
        indices, test_size=val_fraction, random_state=seed, stratify=stratify
    )
    return data.subset(np.sort(train_idx)), data.subset(np.sort(val_idx))


def as_image_data(source, class_names=None, split=None, policy="skip", channels=3) -> ImageData:
    """Coerces what users pass to ``fit``/``evaluate`` into :class:`ImageData`."""
    if isinstance(source, ImageData):
        return source
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if split and find_split_dir(root, split) is None:
            split = None
        return image_folder(root, split=split, class_names=class_names, policy=policy,
                            channels=channels)
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


def make_pipeline(
    data: ImageData,
    image_size: int,
    batch_size: int,
    training: bool = False,
    augmentation=None,
    seed: int = 0,
    shuffle: bool | None = None,
):
    """Batches of (float32 images 0-255 at image_size, labels), prefetched.

    Training pipelines shuffle (seeded, reshuffled each epoch) and apply ``augmentation``
    with a per-image seed drawn from a seeded stream that differs from epoch to epoch.
    """
    import tensorflow as tf

    from restransfer.augmentation import Augmenter

    ds = data.dataset
    if shuffle if shuffle is not None else training:
        ds = ds.shuffle(max(len(data), 1), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda image, label: (resize_image(image, image_size), label),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    augmenter = Augmenter(augmentation, image_size) if training else None
    if augmenter is not None and augmenter.active:
        channels = data.channels

        def augment(image, label, image_seed):
            pixels = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
            out = tf.numpy_function(augmenter, [pixels, image_seed], tf.uint8, stateful=False)
            out = tf.ensure_shape(out, [image_size, image_size, channels])
            return tf.cast(out, tf.float32), label

        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, seeds).map(
            lambda item, s: augment(item[0], item[1], s),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
        )
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
