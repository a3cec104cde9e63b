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


def decode_image_bytes(encoded, channels: int = 3, keep_precision: bool = False):
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> (H, W, channels) uint8, or float32 0-255 with
    ``keep_precision``. TensorFlow ops only: usable eagerly, in tf.data, and in a SavedModel."""
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

    def composited():  # everything but JPEG may carry transparency
        rgb, alpha = tf.cond(tf.equal(tf.strings.substr(encoded, 0, 8), _PNG_SIGNATURE), png, other)
        return rgb * alpha[..., None] + 255.0 * (1.0 - alpha[..., None])  # on white

    def finish(rgb):
        if channels == 1:
            rgb = tf.reduce_sum(rgb * tf.constant(_LUMA), axis=-1, keepdims=True)
        return rgb if keep_precision else tf.cast(tf.clip_by_value(tf.round(rgb), 0.0, 255.0), tf.uint8)

    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, 2), b"\xff\xd8")
    if channels == 3 and not keep_precision:  # a JPEG's pixels are already the answer
        return tf.cond(is_jpeg, jpeg, lambda: finish(composited()))
    return finish(tf.cond(is_jpeg, lambda: tf.cast(jpeg(), tf.float32), composited))


@functools.lru_cache(maxsize=None)
def _graph_decoder(channels: int, keep_precision: bool):
    """decode_image_bytes traced once: run eagerly, its loops would cost ~0.1 s per file."""
    import tensorflow as tf

    return tf.function(lambda encoded: decode_image_bytes(encoded, channels, keep_precision),
                       input_signature=[tf.TensorSpec([], tf.string)])


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
    if encoded[:4] in TIFF_SIGNATURES:
        return _load_tiff(path, channels, keep_precision)
    return _graph_decoder(int(channels), bool(keep_precision))(encoded).numpy()


def _load_tiff(path, channels: int, keep_precision: bool) -> np.ndarray:
    """TIFF (not decodable by TensorFlow) through Pillow, with the contract's conversions."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.seek(0)
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            gray = (np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)).astype(np.float32)[..., None]
            array = gray if channels == 1 else np.repeat(gray, 3, axis=-1)
        else:
            rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
            alpha = rgba[..., 3:] / 255.0
            array = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
            if channels == 1:
                array = np.sum(array * np.asarray(_LUMA, np.float32), axis=-1, keepdims=True)
    return array.astype(np.float32) if keep_precision else np.clip(np.round(array), 0, 255).astype(np.uint8)


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
    except Exception as error:  # decoders raise many types for corrupt data
        return f"cannot be decoded ({type(error).__name__}: {first_line(error)})"
    if image.shape[0] < 2 or image.shape[1] < 2:
        return f"too small ({image.shape[1]}x{image.shape[0]})"
    return None


def first_line(error) -> str:
    """An exception's message in one line (decoders and TFDS write several)."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def resize_image(image, image_size: int):
    """The one resize used in training, evaluation and the exported serving graph."""
    import tensorflow as tf

    return tf.image.resize(tf.cast(image, tf.float32), (image_size, image_size),
                           method="bilinear", antialias=True)
