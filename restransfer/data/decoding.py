"""How a file becomes pixels: the image contract every door uses.

One decoder, in TensorFlow ops (:func:`decode_image_bytes`), for training, evaluation,
``predict``, the report, Grad-CAM and the exported SavedModel, so that the image a served model
decodes is the image it was trained on:

* JPEG: libjpeg with the accurate integer DCT; the EXIF orientation (1-8) read from the APP1
  segment in graph ops and applied as PIL's ``exif_transpose`` does; CMYK and grayscale JPEGs
  converted to RGB by libjpeg.
* PNG: 8- and 16-bit (a 16-bit value ``v`` becomes ``v * 255 / 65535``), gray, gray+alpha,
  palette with a transparent index, RGBA.
* GIF (first frame), BMP, WebP.
* Transparency is composited on white (transparent pixels are usually background); one
  channel is the ITU-R 601-2 luma of RGB (PIL's "L").
* Results are rounded to uint8, or kept as float32 on the same 0-255 scale with
  ``keep_precision``.

Formats TensorFlow cannot decode are read on the client side only: TIFF through Pillow (the
same conversions), DICOM and NIfTI through :mod:`restransfer.data.medical`. The serving
signature takes :data:`SERVED_FORMATS`; the export's model card says so.
``resize_image`` is the one resize used everywhere. Imports nothing heavy at module level.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from restransfer.graph import traced

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".dcm", ".dicom", ".nii", ".nii.gz")
SERVED_FORMATS = ("JPEG", "PNG", "GIF (first frame)", "BMP", "WebP")
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's "L" conversion


_EXIF_HEAD = 131072  # the EXIF APP1 segment follows SOI (and at most an APP0): it lies in here


def _exif_orientation(encoded):
    """The EXIF orientation (1-8) of a JPEG, 1 when there is none, in graph ops (so the
    SavedModel does it too).

    The APP1 segment is found as the first ``FF E1 <length> "Exif\\0\\0"`` in the head of the
    file -- one byte scan (``tf.strings.split``), not a walk over the segments, which cost
    ~1.2 ms per file in graph loops. Then the orientation tag (0x0112) is looked up among the
    first 256 entries of the TIFF directory at once.
    """
    import tensorflow as tf

    head = tf.strings.substr(encoded, 0, _EXIF_HEAD)
    pieces = tf.strings.split(head, sep="Exif\x00\x00")
    starts = tf.cumsum(tf.strings.length(pieces)[:-1] + 6) - 6  # each "Exif\0\0" found
    marker = tf.strings.substr(tf.fill(tf.shape(starts), head), tf.maximum(starts - 4, 0),
                               tf.fill(tf.shape(starts), 2))
    app1 = tf.where(tf.equal(marker, b"\xff\xe1") & (starts >= 4))[:, 0]

    def orientation_tag():
        tiff = tf.cast(tf.gather(starts, app1[0]), tf.int32) + 6
        data = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int32)
        size = tf.shape(data)[0]
        data = tf.concat([data, tf.zeros([16], tf.int32)], 0)  # reads past the end see zeros
        at = lambda i: tf.gather(data, tf.clip_by_value(i, 0, size + 15))
        little = tf.equal(at(tiff), 0x49)  # "II": little-endian

        def u16(i):
            return tf.where(little, at(i) + 256 * at(i + 1), 256 * at(i) + at(i + 1))

        low, high = u16(tiff + 4), u16(tiff + 6)
        directory = tiff + tf.where(little, low + 65536 * high, 65536 * low + high)
        entry = directory + 2 + 12 * tf.range(256)
        hits = tf.where(tf.equal(u16(entry), 0x0112) & (tf.range(256) < u16(directory)))[:, 0]
        return tf.cond(tf.size(hits) > 0, lambda: u16(tf.gather(entry, hits[0]) + 8), lambda: tf.constant(-1))

    value = tf.cond(tf.size(app1) > 0, orientation_tag, lambda: tf.constant(-1))
    return tf.where((value >= 1) & (value <= 8), value, 1)


def _apply_orientation(image, orientation):
    """PIL's ``exif_transpose`` for orientation 1..8."""
    import tensorflow as tf

    transposed = lambda: tf.transpose(image, [1, 0, 2])
    return tf.switch_case(orientation - 1, [
        lambda: image,
        lambda: image[:, ::-1],                          # 2: mirrored left-right
        lambda: image[::-1, ::-1],                       # 3: rotated 180
        lambda: image[::-1],                             # 4: mirrored top-bottom
        transposed,                                      # 5
        lambda: tf.image.rot90(image, k=3),              # 6: rotated 90 clockwise
        lambda: transposed()[::-1, ::-1],                # 7: transverse
        lambda: tf.image.rot90(image, k=1),              # 8: rotated 90 counter-clockwise
    ])


NORMALIZATIONS = ("auto", "percentile", "minmax", "zscore")


def normalize_graph(image, method: str):
    """:func:`restransfer.data.medical.normalize_intensity` in TensorFlow ops (the same
    formulas: numpy's linear-interpolation percentiles), for the serving graph: a float image's
    intensities mapped to 0-255 by its own 0.5/99.5 percentiles (``percentile``, also what
    ``auto`` means), its range (``minmax``) or mean +- 3 sd (``zscore``)."""
    import tensorflow as tf

    values = tf.reshape(tf.cast(image, tf.float32), [-1])
    if method == "zscore":
        mean = tf.reduce_mean(values)
        sd = tf.math.reduce_std(values)
        sd = tf.where(sd > 0, sd, 1.0)
        return tf.clip_by_value(((image - mean) / sd + 3.0) / 6.0, 0.0, 1.0) * 255.0
    if method in ("percentile", "auto"):
        ordered = tf.sort(values)
        last = tf.cast(tf.size(ordered) - 1, tf.float32)

        def percentile(q):
            position = q / 100.0 * last
            below = tf.floor(position)
            low = tf.gather(ordered, tf.cast(below, tf.int32))
            high = tf.gather(ordered, tf.cast(tf.math.ceil(position), tf.int32))
            return low + (high - low) * (position - below)

        lower, upper = percentile(0.5), percentile(99.5)
    elif method == "minmax":
        lower, upper = tf.reduce_min(values), tf.reduce_max(values)
    else:
        raise ValueError(f"normalisation must be one of {', '.join(NORMALIZATIONS)}, got {method!r}")
    width = tf.maximum(upper - lower, 1e-6)
    return tf.clip_by_value((image - lower) / width, 0.0, 1.0) * 255.0


def decode_image_bytes(encoded, channels: int = 3, keep_precision: bool = False, normalize: str | None = None):
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> (H, W, channels) uint8, or float32 0-255 with
    ``keep_precision``. ``normalize`` (a medical recipe's): 16-bit PNGs, whose stored range
    (often 12 bits of 16) is not a display range, are mapped to 0-255 by :func:`normalize_graph`;
    8-bit files are used as stored. TensorFlow ops only: usable eagerly, in tf.data, and in a
    SavedModel."""
    import tensorflow as tf

    encoded = tf.convert_to_tensor(encoded, tf.string)

    def jpeg():
        image = tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")
        return _apply_orientation(image, _exif_orientation(encoded))

    def png():  # 8-bit PNGs read as 16-bit are v * 257: the scale below gives v back exactly
        image = tf.cast(tf.io.decode_png(encoded, channels=4, dtype=tf.uint16), tf.float32) * (255.0 / 65535.0)
        return image[..., :3], image[..., 3] / 255.0

    def other():  # GIF (first frame), BMP, WebP: 1 to 4 channels as stored
        image = tf.cast(tf.io.decode_image(encoded, channels=0, expand_animations=False), tf.float32)
        count = tf.shape(image)[-1]
        rgb = tf.cond(count >= 3, lambda: image[..., :3], lambda: tf.repeat(image[..., :1], 3, axis=-1))
        alpha = tf.cond(tf.equal(count % 2, 0), lambda: image[..., -1] / 255.0, lambda: tf.ones_like(image[..., 0]))
        return rgb, alpha

    is_png = tf.equal(tf.strings.substr(encoded, 0, 8), _PNG_SIGNATURE)

    def composited():  # everything but JPEG may carry transparency
        rgb, alpha = tf.cond(is_png, png, other)
        return rgb * alpha[..., None] + 255.0 * (1.0 - alpha[..., None])  # on white

    def finish(rgb):
        if channels == 1:
            rgb = tf.reduce_sum(rgb * tf.constant(_LUMA), axis=-1, keepdims=True)
        if normalize:
            sixteen_bit = is_png & tf.equal(tf.strings.substr(encoded, 24, 1), b"\x10")  # IHDR bit depth
            rgb = tf.cond(sixteen_bit, lambda: normalize_graph(rgb, normalize), lambda: rgb)
        return rgb if keep_precision else tf.cast(tf.clip_by_value(tf.round(rgb), 0.0, 255.0), tf.uint8)

    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, 2), b"\xff\xd8")
    if channels == 3 and not keep_precision:  # a JPEG's pixels are already the answer
        return tf.cond(is_jpeg, jpeg, lambda: finish(composited()))
    return finish(tf.cond(is_jpeg, lambda: tf.cast(jpeg(), tf.float32), composited))


@functools.lru_cache(maxsize=None)
def graph_decoder(channels: int, keep_precision: bool, normalize: str | None = None):
    """decode_image_bytes traced once per process (its graph takes seconds to trace; eagerly,
    its loops would cost ~0.1 s per file): for load_image and every tf.data pipeline."""
    import tensorflow as tf

    return traced(lambda encoded: decode_image_bytes(encoded, channels, keep_precision, normalize),
                       input_signature=[tf.TensorSpec([], tf.string)])


def high_bit_depth(path) -> bool:
    """Whether a file stores more than 8 bits per sample: 16-bit PNG and TIFF (read from
    their headers), DICOM and NIfTI (always read at full precision)."""
    from restransfer.data.medical import is_medical

    if is_medical(path):
        return True
    with open(path, "rb") as handle:
        head = handle.read(32)
    if head[:8] == _PNG_SIGNATURE:
        return len(head) > 24 and head[24] == 16
    if head[:4] in TIFF_SIGNATURES:
        from PIL import Image

        with Image.open(path) as image:
            return image.mode in ("I;16", "I;16B", "I;16L", "I", "F")
    return False


def is_client_side(path) -> bool:
    """Files the serving signature cannot take: DICOM, NIfTI (by name) and TIFF (by content)."""
    from restransfer.data.medical import is_medical

    if is_medical(path):
        return True
    with open(path, "rb") as handle:
        return handle.read(4) in TIFF_SIGNATURES


def load_image(path: str | os.PathLike, channels: int = 3, keep_precision: bool = False,
               **medical_options) -> np.ndarray:
    """Decodes one file to uint8 HxWxC (float32 0-255 with ``keep_precision``) by the image
    contract above. DICOM and NIfTI (``volume.nii.gz#slice``) go through
    :mod:`restransfer.data.medical` (``medical_options``: window, normalize, axis)."""
    from restransfer.data.medical import is_medical, read_medical

    if is_medical(path):
        gray = read_medical(path, **medical_options)
        image = gray if channels == 1 else np.repeat(gray, 3, axis=-1)
        return image if keep_precision else np.round(image).astype(np.uint8)
    encoded = Path(path).read_bytes()
    normalize = medical_options.get("normalize")
    if encoded[:4] in TIFF_SIGNATURES:
        return _load_tiff(path, channels, keep_precision, normalize)
    return graph_decoder(int(channels), bool(keep_precision), normalize)(encoded).numpy()


def _load_tiff(path, channels: int, keep_precision: bool, normalize: str | None = None) -> np.ndarray:
    """TIFF (not decodable by TensorFlow) through Pillow, with the contract's conversions."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.seek(0)
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            gray = (np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)).astype(np.float32)[..., None]
            if normalize:
                from restransfer.data.medical import normalize_intensity

                gray = normalize_intensity(gray, "percentile" if normalize == "auto" else normalize)
            array = gray if channels == 1 else np.repeat(gray, 3, axis=-1)
        else:
            rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
            alpha = rgba[..., 3:] / 255.0
            array = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
            if channels == 1:
                array = np.sum(array * np.asarray(_LUMA, np.float32), axis=-1, keepdims=True)
    return array.astype(np.float32) if keep_precision else np.clip(np.round(array), 0, 255).astype(np.uint8)


_SIGNATURES = ((b"\xff\xd8", "JPEG"), (_PNG_SIGNATURE, "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
               (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def file_format(head: bytes) -> str | None:
    """The image format a file's first bytes announce (None: none restransfer reads)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for signature, name in _SIGNATURES if head.startswith(signature)), None)


def check_image(path: str, **medical_options) -> str | None:
    """Why a file cannot be used as an image, in plain words (``None`` if it decodes fully):
    not an image at all, a damaged (e.g. truncated) JPEG or PNG, empty, unreadable, too small.
    JPEG and PNG files are first read by Pillow, which names the damage (and keeps libjpeg
    from writing its own messages); then by the image contract's decoder."""
    return inspect_image(path, **medical_options)[0]


def inspect_image(path: str, channels: int = 3, **medical_options) -> tuple[str | None, np.ndarray | None]:
    """(why the file cannot be used, or None; its decoded pixels, or None): see :func:`check_image`."""
    from restransfer.data.medical import is_medical, split_slice

    try:
        if os.path.getsize(split_slice(path)[0]) == 0:
            return "an empty file (0 bytes)", None
        kind = None
        if not is_medical(path):
            with open(path, "rb") as handle:
                kind = file_format(handle.read(16))
            if kind is None:
                return "not an image: its content is none of " + ", ".join(SERVED_FORMATS + ("TIFF", "DICOM", "NIfTI")), None
            if kind in ("JPEG", "PNG"):
                from PIL import Image

                try:
                    with Image.open(path) as image:
                        image.load()
                except Exception as error:
                    text = str(error)
                    damage = "the data ends early (a truncated file)" if "truncated" in text.lower() else first_line(error)
                    return f"a damaged {kind}: {damage}", None
        image = load_image(path, channels, **medical_options)
    except PermissionError:
        return "permission denied", None
    except ImportError as error:  # pydicom/nibabel missing: not the file's fault, say so once
        raise ImportError(f"{path}: {error}") from None
    except Exception as error:  # decoders raise many types for corrupt data
        return f"a damaged {kind or 'file'}: {plain_decoder_error(error)}", None
    if image.shape[0] < 2 or image.shape[1] < 2:
        return f"too small ({image.shape[1]}x{image.shape[0]} pixels)", None
    return None, image


def plain_decoder_error(error) -> str:
    """A decoder's message without TensorFlow's graph internals ({{function_node ...}}, [[node ...]])."""
    import re

    text = re.sub(r"\{\{[^}]*\}\}|\[\[[^\]]*\]\]", "", first_line(error)).strip(" :;")
    return text or type(error).__name__


def first_line(error) -> str:
    """An exception's message in one line (decoders and TFDS write several)."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def to_contract_pixels(images: np.ndarray, channels: int | None = None) -> np.ndarray:
    """Pixel arrays (N, H, W, C) as files become pixels: C = 2 (gray + alpha) or 4 (RGBA)
    composited on white, then ``channels`` channels (1: the ITU-R 601-2 luma of RGB; 3: gray
    replicated; None: as they are). Integer pixels (0-255) stay uint8, rounded where the rule
    computed; float pixels stay float32 (their precision kept). Refused with what to do:
    values outside 0-255, non-finite ones, and floats that all lie in [0, 1] with fractions
    (images scaled to [0, 1] would silently round to black and white)."""
    images = np.asarray(images)
    floating = np.issubdtype(images.dtype, np.floating)
    if images.ndim != 4 or images.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"images must have shape (N, H, W, C) with C in 1..4, got {images.shape}")
    if images.size:
        low, high = float(images.min()), float(images.max())
        if floating and not np.isfinite(images).all():
            raise ValueError("images hold NaN or infinite values")
        if low < 0 or high > 255:
            raise ValueError(f"images must hold raw pixel values in 0..255, got {low:g}..{high:g}"
                             + (" (16-bit? scale them to 0-255 as float32: v * 255 / 65535)" if high > 255 else ""))
        if floating and high <= 1.0 and not np.all(images == np.round(images)):
            raise ValueError("images are floats in [0, 1]; restransfer takes 0-255 pixel values, as files "
                             "decode to: multiply them by 255 (they keep their precision as float32)")
    if not floating and images.dtype != np.uint8:
        images = images.astype(np.uint8)
    count = images.shape[-1]
    target = channels if channels is not None else (1 if count <= 2 else 3)
    if count == target and count in (1, 3):
        return images.astype(np.float32) if floating else images
    pixels = images.astype(np.float32)
    if count in (2, 4):  # transparency on white, as the decoder does
        alpha = pixels[..., -1:] / 255.0
        pixels = pixels[..., :-1] * alpha + 255.0 * (1.0 - alpha)
    if pixels.shape[-1] == 3 and target == 1:
        pixels = np.sum(pixels * np.asarray(_LUMA, np.float32), axis=-1, keepdims=True)
    elif pixels.shape[-1] == 1 and target == 3:
        pixels = np.repeat(pixels, 3, axis=-1)
    return pixels if floating else np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def resize_image(image, image_size: int):
    """The one resize used in training, evaluation and the exported serving graph."""
    import tensorflow as tf

    return tf.image.resize(tf.cast(image, tf.float32), (image_size, image_size),
                           method="bilinear", antialias=True)


def resize_mask(mask, image_size: int):
    """A mask of class ids [H, W] (or [N, H, W]) to image_size x image_size by nearest
    neighbour: resized with its image, never interpolated into new classes."""
    import tensorflow as tf

    mask = tf.convert_to_tensor(mask)
    resized = tf.image.resize(mask[..., None], (image_size, image_size), method="nearest")
    return tf.cast(resized[..., 0], mask.dtype)

