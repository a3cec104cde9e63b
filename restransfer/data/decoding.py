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


def _exif_orientation(encoded):
    """The EXIF orientation (1-8) in a JPEG's APP1 segment, 1 when there is none. Walks the
    JPEG segments, then the TIFF directory, in graph ops (so the SavedModel does it too)."""
    import tensorflow as tf

    head = tf.cast(tf.io.decode_raw(tf.strings.substr(encoded, 0, 131072), tf.uint8), tf.int32)
    size = tf.shape(head)[0]
    head = tf.concat([head, tf.zeros([16], tf.int32)], 0)  # reads past the end see zeros

    def at(i):
        return tf.gather(head, tf.clip_by_value(i, 0, size + 15))

    def u16(i, little):
        return tf.where(little, at(i) + 256 * at(i + 1), 256 * at(i) + at(i + 1))

    def u32(i, little):
        return tf.where(little, u16(i, True) + 65536 * u16(i + 2, True), 65536 * u16(i, False) + u16(i + 2, False))

    exif_header = tf.constant([0x45, 0x78, 0x69, 0x66, 0, 0])  # "Exif\0\0"

    def next_segment(position, found):
        is_exif = tf.equal(at(position + 1), 0xE1) & tf.reduce_all(
            tf.equal(tf.stack([at(position + 4 + k) for k in range(6)]), exif_header))
        return position + 2 + u16(position + 2, False), tf.where(is_exif, position + 10, found)

    _, tiff = tf.while_loop(  # segments until EXIF is found or the image data (SOS) starts
        lambda position, found: (found < 0) & (position + 4 < size) & tf.equal(at(position), 0xFF)
        & tf.not_equal(at(position + 1), 0xDA),
        next_segment, [tf.constant(2), tf.constant(-1)])

    def orientation_tag():
        little = tf.equal(at(tiff), 0x49)  # "II": little-endian
        directory = tiff + u32(tiff + 4, little)
        entries = u16(directory, little)

        def next_entry(k, value):
            entry = directory + 2 + 12 * k
            return k + 1, tf.where(tf.equal(u16(entry, little), 0x0112), u16(entry + 8, little), value)

        _, value = tf.while_loop(lambda k, value: (k < entries) & (value < 0), next_entry,
                                 [tf.constant(0), tf.constant(-1)])
        return value

    value = tf.cond(tiff >= 0, orientation_tag, lambda: tf.constant(-1))
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
        image = _apply_orientation(image, _exif_orientation(encoded))
        return tf.cast(image, tf.float32), tf.ones(tf.shape(image)[:2], tf.float32)

    def png():  # 8-bit PNGs read as 16-bit are v * 257: the scale below gives v back exactly
        image = tf.cast(tf.io.decode_png(encoded, channels=4, dtype=tf.uint16), tf.float32) * (255.0 / 65535.0)
        return image[..., :3], image[..., 3] / 255.0

    def other():  # GIF (first frame), BMP, WebP: 1 to 4 channels as stored
        image = tf.cast(tf.io.decode_image(encoded, channels=0, expand_animations=False), tf.float32)
        count = tf.shape(image)[-1]
        rgb = tf.cond(count >= 3, lambda: image[..., :3], lambda: tf.repeat(image[..., :1], 3, axis=-1))
        alpha = tf.cond(tf.equal(count % 2, 0), lambda: image[..., -1] / 255.0, lambda: tf.ones_like(image[..., 0]))
        return rgb, alpha

    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, 2), b"\xff\xd8")
    is_png = tf.equal(tf.strings.substr(encoded, 0, 8), _PNG_SIGNATURE)
    rgb, alpha = tf.cond(is_jpeg, jpeg, lambda: tf.cond(is_png, png, other))
    rgb = rgb * alpha[..., None] + 255.0 * (1.0 - alpha[..., None])  # composite on white
    if channels == 1:
        rgb = tf.reduce_sum(rgb * tf.constant(_LUMA), axis=-1, keepdims=True)
    if keep_precision:
        return rgb
    return tf.cast(tf.clip_by_value(tf.round(rgb), 0.0, 255.0), tf.uint8)


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
