"""Image/mask pairs for segmentation: reading masks, checking every pair before training, and
the sources (folders, CSV, ``.npz``, arrays, TFDS) that return :class:`ImageData` with masks.

A mask is a class-index image the size of its image: an 8- or 16-bit grey PNG (or BMP, GIF,
TIFF) holding class ids, or a palette PNG whose palette *indices* are the class ids (the
colours are only for display, as in Pascal VOC). ``mask_values`` maps stored values to
classes (``{0: 0, 255: 1}`` for the classic black/white binary mask); ``ignore_index``
(e.g. 255 on object borders) marks pixels without truth, left out of the loss and the
figures. Every pair is read once when the source is made: an image without a mask (or the
reverse), a mask of another size than its image, or an unreadable file is skipped with the
file named (``policy="skip"``) or refused (``"strict"``) before training; values outside the
classes are always refused, with the values found and the fix. Empty masks (only background)
are allowed and counted.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from restransfer.data.decoding import IMAGE_EXTENSIONS, first_line, inspect_image
from restransfer.data.sources import ImageData, apply_policy, resolve_keep_precision
from restransfer.data.splits import find_split_dir, split_folder
from restransfer.graph import plain

log = logging.getLogger("restransfer.data")

MASK_EXTENSIONS = (".png", ".bmp", ".gif", ".tif", ".tiff")
MAX_CLASSES = 255  # masks are held as uint8 class ids; 255 is free for ignore_index
IMAGE_DIRS, MASK_DIRS = ("images", "imgs", "image"), ("masks", "labels", "mask", "annotations")


def _mapping_table(mask_values: dict | None) -> np.ndarray | None:
    """stored value -> class id, as a lookup table over 0..65535; unmapped values keep theirs."""
    if not mask_values:
        return None
    table = np.arange(65536, dtype=np.int64)
    for stored, cls in mask_values.items():
        stored, cls = int(stored), int(cls)
        if not (0 <= stored < 65536 and 0 <= cls <= 255):
            raise ValueError(f"mask_values: {stored}: {cls} must map a stored value 0..65535 to a class 0..255")
        table[stored] = cls
    return table


def read_mask(path: str | os.PathLike, mask_values: dict | None = None) -> np.ndarray:
    """A mask file as class ids (H, W) uint8. Palette PNGs give their palette indices; a
    colour (RGB) mask whose channels differ is refused (it needs converting to class ids)."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in ("P", "L", "1"):
            values = np.asarray(image if image.mode != "1" else image.convert("L").point(lambda v: v // 255))
        elif image.mode in ("I;16", "I;16B", "I;16L", "I"):
            values = np.asarray(image, dtype=np.int64)
        elif image.mode in ("RGB", "RGBA", "LA"):
            array = np.asarray(image)
            grey = array[..., 0]
            if image.mode == "LA" or (array[..., :3] == grey[..., None]).all():
                values = grey
            else:
                raise ValueError(f"a colour mask (mode {image.mode}, channels differ): save it as class ids "
                                 "(one grey channel, or a palette PNG whose indices are the classes)")
        else:
            raise ValueError(f"masks are grey or palette images of class ids, not mode {image.mode}")
    values = np.asarray(values, dtype=np.int64)
    table = _mapping_table(mask_values)
    if table is not None:
        values = table[np.clip(values, 0, 65535)]
    if values.max(initial=0) > 255 or values.min(initial=0) < 0:
        raise ValueError(f"mask values {values.min()}..{values.max()} do not fit class ids 0..255 "
                         "(map them with mask_values)")
    return values.astype(np.uint8)


def decode_mask_bytes(encoded, mask_values: dict | None = None):
    """Encoded PNG mask bytes -> class ids [H, W] uint8, in TensorFlow ops (TFDS streams)."""
    import tensorflow as tf

    mask = tf.cast(tf.io.decode_png(encoded, channels=1, dtype=tf.uint16)[..., 0], tf.int64)
    table = _mapping_table(mask_values)
    if table is not None:
        mask = tf.gather(tf.constant(table), mask)
    return tf.cast(mask, tf.uint8)


# --- checking pairs ------------------------------------------------------------------------------


def _check_pair(image_path: str, mask_path: str, channels: int, mask_values, decode_options) -> tuple:
    """(reason or None, the mask's distinct values, its foreground counts) for one pair."""
    reason, image = inspect_image(image_path, channels, **(decode_options or {}))
    if reason:
        return reason, None, None
    try:
        mask = read_mask(mask_path, mask_values)
    except Exception as error:
        return f"mask {os.path.basename(mask_path)} cannot be used ({first_line(error)})", None, None
    if mask.shape != image.shape[:2]:
        return (f"mask {os.path.basename(mask_path)} is {mask.shape[1]}x{mask.shape[0]}, its image "
                f"{image.shape[1]}x{image.shape[0]}"), None, None
    values, counts = np.unique(mask, return_counts=True)
    return None, values, dict(zip(values.tolist(), counts.tolist()))


def _checked_pairs(pairs: list[tuple[str, str]], *, channels, mask_values, decode_options, progress):
    from tqdm.auto import tqdm

    def check(pair):
        return _check_pair(*pair, channels, mask_values, decode_options)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return list(tqdm(pool.map(check, pairs), total=len(pairs), desc="checking image/mask pairs", unit="pair",
                         disable=None if progress and len(pairs) >= 50 else True, leave=False))


def _classes(found_values: set, class_names, ignore_index, files_with: dict, mask_values) -> list[str]:
    """The class names, checked against every value the masks hold (refused with the values
    found and the fix when they are not class ids)."""
    values = sorted(v for v in found_values if v != ignore_index)
    if class_names is not None:
        names = list(class_names)
        outside = [v for v in values if v >= len(names)]
    else:  # classes 0..max found; values from 32 up do not look like class ids (0/255 masks)
        outside = [v for v in values if v >= 32]
        top = max([v for v in values if v < 32], default=0)
        names = ["background", *[f"class_{i}" for i in range(1, max(top, 1) + 1)]]
    if outside:
        example = sorted(files_with[outside[0]])[:3]
        hint = ""
        if set(values) == {0, 255} or set(values) == {0, 1, 255} and ignore_index is None:
            hint = " These look like binary masks saved as 0/255: set mask_values: {0: 0, 255: 1}."
        elif ignore_index is None and 255 in outside:
            hint = " If 255 marks pixels without truth (borders), set ignore_index: 255."
        else:
            hint = (" Map them to class ids 0..K-1 with mask_values (e.g. {" + ", ".join(
                f"{v}: {i}" for i, v in enumerate(values[:4])) + "}), or give the class names.")
        raise ValueError(f"mask values {values} are not class ids of {len(names)} classes {names} "
                         f"(value {outside[0]} is in {', '.join(example)}).{hint}"
                         + ("" if not mask_values else f" (after mask_values {mask_values})"))
    if len(names) > MAX_CLASSES:
        raise ValueError(f"{len(names)} classes: at most {MAX_CLASSES} (masks are uint8 class ids)")
    if len(names) < 2:
        raise ValueError(f"segmentation needs at least 2 classes (background and one more), got {names}")
    return names


def _pairs_data(pairs: list[tuple[str, str]], unpaired: dict[str, str], *, where: str, class_names, policy,
                channels, ignore_index, mask_values, keep_precision, decode_options, progress,
                groups=None) -> ImageData:
    """Checks every (image, mask) pair and makes the ImageData (see the module docstring);
    ``unpaired``: files without their counterpart, named with the bad pairs (all at once)."""
    results = _checked_pairs(pairs, channels=channels, mask_values=mask_values, decode_options=decode_options,
                             progress=progress)
    bad = {**unpaired, **{image: reason for (image, _), (reason, _, _) in zip(pairs, results) if reason}}
    skipped = apply_policy(bad, policy, where)
    keep = [i for i, (reason, _, _) in enumerate(results) if reason is None]
    if not keep:
        raise ValueError(f"{where}: no usable image/mask pairs"
                         + (f" ({len(skipped)} skipped: {skipped[0].path}: {skipped[0].reason})" if skipped else ""))
    files_with: dict[int, list[str]] = {}
    for i in keep:
        for value in results[i][1].tolist():
            files_with.setdefault(value, []).append(pairs[i][1])
    names = _classes(set(files_with), class_names, ignore_index, files_with, mask_values)
    strata, empty = [], 0
    for i in keep:
        counts = {v: c for v, c in results[i][2].items() if v not in (0, ignore_index)}
        strata.append(max(counts, key=counts.get) if counts else 0)
        empty += not counts
    if empty:
        log.info("%s: %d of %d masks are empty (no foreground); they are kept", where, empty, len(keep))
    images = [pairs[i][0] for i in keep]
    return ImageData(labels=np.asarray(strata, np.int32), class_names=names, paths=images,
                     masks=[pairs[i][1] for i in keep], skipped=skipped, channels=channels,
                     groups=np.asarray(groups)[keep] if groups is not None else None,
                     keep_precision=resolve_keep_precision(keep_precision, images),
                     decode_options=dict(decode_options or {}), ignore_index=ignore_index,
                     mask_values=dict(mask_values) if mask_values else None, empty_masks=empty)


# --- sources ------------------------------------------------------------------------------------


def _subdir(root: Path, names) -> Path | None:
    return next((root / name for name in names if (root / name).is_dir()), None)


def segmentation_folder(path, split: str | None = None, class_names=None, policy: str = "skip", channels: int = 3,
                        ignore_index: int | None = None, mask_values: dict | None = None,
                        keep_precision: bool | str = False, decode_options: dict | None = None,
                        progress: bool = True) -> ImageData:
    """Pairs in ``path/images/<id>.<ext>`` + ``path/masks/<id>.png`` (or ``path/<split>/images``
    and ``path/<split>/masks`` for ``split`` in train/val/test: the layout of Kvasir-SEG).
    An image without a mask and a mask without an image are skipped, each named, or refused
    with ``policy="strict"``."""
    root = split_folder(path, split)
    image_dir, mask_dir = _subdir(root, IMAGE_DIRS), _subdir(root, MASK_DIRS)
    if image_dir is None or mask_dir is None:
        raise ValueError(f"{root} needs images/ and masks/ sub-folders (images/<id>.jpg + masks/<id>.png) "
                         f"for segmentation; it has {sorted(p.name for p in root.iterdir() if p.is_dir())}")
    images = {p.stem: p for p in sorted(image_dir.iterdir())
              if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS) and not p.name.startswith(".")}
    masks = {p.stem: p for p in sorted(mask_dir.iterdir())
             if p.is_file() and p.name.lower().endswith(MASK_EXTENSIONS) and not p.name.startswith(".")}
    unpaired = {str(images[k]): f"no mask for it in {mask_dir}" for k in sorted(set(images) - set(masks))}
    unpaired.update({str(masks[k]): f"a mask without an image in {image_dir}" for k in sorted(set(masks) - set(images))})
    pairs = [(str(images[k]), str(masks[k])) for k in sorted(set(images) & set(masks))]
    return _pairs_data(pairs, unpaired, where=str(root), class_names=class_names, policy=policy, channels=channels,
                       ignore_index=ignore_index, mask_values=mask_values, keep_precision=keep_precision,
                       decode_options=decode_options, progress=progress)


def from_mask_csv(table, image_column: str = "image", mask_column: str = "mask", group_column: str | None = None,
                  root=None, class_names=None, policy: str = "skip", channels: int = 3,
                  ignore_index: int | None = None, mask_values: dict | None = None,
                  keep_precision: bool | str = False, decode_options: dict | None = None,
                  allow_outside_root: bool = False, progress: bool = True) -> ImageData:
    """Pairs listed in a CSV (or DataFrame): an image and a mask column, paths relative to the
    CSV's folder (never escaping it unless ``allow_outside_root``), optional groups."""
    from restransfer.data.sources import _resolve_under, read_table

    needed = [image_column, mask_column] + ([group_column] if group_column else [])
    frame, where, root = read_table(table, root, needed)
    pairs = [(_resolve_under(root, str(image), allow_outside_root, f"{where} row {i + 2}"),
              _resolve_under(root, str(mask), allow_outside_root, f"{where} row {i + 2}"))
             for i, (image, mask) in enumerate(zip(frame[image_column], frame[mask_column]))]
    groups = frame[group_column].astype(str).to_numpy() if group_column else None
    return _pairs_data(pairs, {}, where=where, class_names=class_names, policy=policy, channels=channels,
                       ignore_index=ignore_index, mask_values=mask_values, keep_precision=keep_precision,
                       decode_options=decode_options, progress=progress, groups=groups)


def from_mask_arrays(images, masks, class_names=None, channels: int | None = None, ignore_index: int | None = None,
                     mask_values: dict | None = None) -> ImageData:
    """In-memory pairs: images (N, H, W[, C], 0-255) and masks (N, H, W) of class ids (or
    stored values that ``mask_values`` maps), checked as files are."""
    from restransfer.data.decoding import to_contract_pixels

    images, masks = np.asarray(images), np.asarray(masks)
    if images.ndim == 3:
        images = images[..., None]
    if masks.ndim == 4 and masks.shape[-1] == 1:
        masks = masks[..., 0]
    if images.ndim != 4 or masks.ndim != 3:
        raise ValueError(f"images (N, H, W[, C]) and masks (N, H, W) expected, got {images.shape} and {masks.shape}")
    if images.shape[:3] != masks.shape:
        raise ValueError(f"each mask must be its image's size: images {images.shape[1:3]}, masks {masks.shape[1:]}")
    if not np.issubdtype(masks.dtype, np.integer):
        raise ValueError(f"masks hold class ids (integers), got {masks.dtype}")
    table = _mapping_table(mask_values)
    stored = masks.astype(np.int64)
    ids = table[np.clip(stored, 0, 65535)] if table is not None else stored
    values = set(np.unique(ids).tolist())
    names = _classes(values, class_names, ignore_index, {v: ["the mask array"] for v in values}, mask_values)
    ids = ids.astype(np.uint8)
    flat = ids.reshape(len(ids), -1)
    strata, empty = [], 0
    for row in flat:
        counts = np.bincount(row, minlength=256)
        counts[0] = 0
        if ignore_index is not None:
            counts[ignore_index] = 0
        strata.append(int(counts.argmax()) if counts.any() else 0)
        empty += not counts.any()
    pixels = to_contract_pixels(images, channels)
    return ImageData(labels=np.asarray(strata, np.int32), class_names=names, images=pixels, masks=ids,
                     channels=pixels.shape[-1], keep_precision=pixels.dtype != np.uint8,
                     ignore_index=ignore_index, empty_masks=empty)


def from_mask_npz(path, split: str = "train", class_names=None, channels: int | None = None,
                  ignore_index: int | None = None, mask_values: dict | None = None) -> ImageData:
    """Pairs in an ``.npz``: ``images`` and ``masks`` (or ``train_images``/``train_masks``), with
    ``val_``/``test_`` parts, and optionally ``class_names``."""
    with np.load(path, allow_pickle=False) as archive:
        if class_names is None and "class_names" in archive:
            class_names = [str(name) for name in archive["class_names"]]
        prefix = "" if split == "train" and "images" in archive else f"{split}_"
        keys = (f"{prefix}images", f"{prefix}masks")
        missing = [k for k in keys if k not in archive]
        if missing:
            raise ValueError(f"{path}: no {missing} (has {sorted(archive.files)})")
        images, masks = archive[keys[0]], archive[keys[1]]
    return from_mask_arrays(images, masks, class_names, channels, ignore_index, mask_values)


# oxford_iiit_pet's trimaps: 1 pet, 2 background, 3 border (no truth)
TFDS_MASKS = {"oxford_iiit_pet": ("segmentation_mask", {1: 1, 2: 0, 3: 255}, 255, ["background", "pet"])}


def from_tfds_masks(name: str, split: str = "train", data_dir: str | None = None, image_key: str = "image",
                    mask_key: str | None = None, channels: int = 3, mask_values: dict | None = None,
                    ignore_index: int | None = None, class_names=None, download: bool = True) -> ImageData:
    """A TFDS dataset with segmentation masks (``oxford_iiit_pet``'s ``segmentation_mask``,
    its trimap mapped to background / pet with the border ignored), read by TFDS' own loader
    as :func:`restransfer.data.from_tfds` reads labelled images (downloaded and prepared where
    online)."""
    name = name.removeprefix("tfds:")
    known = TFDS_MASKS.get(name)
    mask_key = mask_key or (known[0] if known else "segmentation_mask")
    if known and mask_values is None:
        mask_values, ignore_index, class_names = known[1], known[2], class_names or known[3]
    if class_names is None:
        raise ValueError(f"TFDS dataset {name!r}: give class_names (and mask_values) for its masks")
    from restransfer.data.sources import load_tfds

    ds, _ = load_tfds(name, split, data_dir, download, skip_decoding=(image_key, mask_key))
    count = int(ds.cardinality())
    return ImageData(labels=np.zeros(count, np.int32), class_names=list(class_names),
                     encoded=ds.map(plain(lambda example: example[image_key])),
                     encoded_masks=ds.map(plain(lambda example: example[mask_key])), channels=channels,
                     ignore_index=ignore_index, mask_values=dict(mask_values) if mask_values else None)


def as_segmentation_data(source, class_names=None, split=None, policy="skip", channels=3, decode_options=None,
                         csv: dict | None = None, download: bool = True, keep_precision: bool | str = False,
                         ignore_index: int | None = None, mask_values: dict | None = None) -> ImageData:
    """What users pass to a segmentation recipe's ``fit``/``evaluate``, as ImageData with
    masks: a folder (``images/`` + ``masks/``, optional ``train/ val/ test/``), a ``.csv``
    (``csv`` holds :func:`from_mask_csv`'s column options), an ``.npz``, ``"tfds:NAME[:SPLIT]"``,
    or an ``(images, masks)`` tuple."""
    from restransfer.data.sources import with_channels

    masks = dict(ignore_index=ignore_index, mask_values=mask_values)
    if isinstance(source, ImageData):
        if not source.has_masks:
            raise ValueError("this ImageData has labels, not masks: segmentation needs image/mask pairs")
        if class_names is not None and list(source.class_names) != list(class_names):
            raise ValueError(f"the data's classes {source.class_names} are not the model's {list(class_names)}")
        return with_channels(source, channels)
    if isinstance(source, str) and source.startswith("tfds:"):
        name, _, tfds_split = source.removeprefix("tfds:").partition(":")
        return from_tfds_masks(name, split=tfds_split or split or "train", channels=channels, download=download,
                               class_names=class_names, **masks)
    files = dict(class_names=class_names, policy=policy, channels=channels, decode_options=decode_options,
                 keep_precision=keep_precision, **masks)
    if isinstance(source, (str, os.PathLike)) and str(source).lower().endswith(".csv"):
        columns = {k: v for k, v in (csv or {}).items() if k in ("image_column", "mask_column", "group_column")}
        return from_mask_csv(source, **columns, **files)
    if isinstance(source, (str, os.PathLike)) and str(source).lower().endswith(".npz"):
        return from_mask_npz(source, split={"val": "val", "test": "test"}.get(split, "train"),
                             class_names=class_names, channels=channels, **masks)
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if split and find_split_dir(root, split) is None:
            split = None
        return segmentation_folder(root, split=split, **files)
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return from_mask_arrays(source[0], source[1], class_names=class_names, channels=channels, **masks)
    raise TypeError("segmentation data must be a folder (images/ + masks/), a .csv, an .npz, 'tfds:NAME', "
                    f"(images, masks) arrays or ImageData with masks; got {type(source).__name__}")
