"""How a file becomes pixels: the image contract every door uses.

``load_image`` decodes a file to uint8 (or float32 at full precision) HxWxC, and
``resize_image`` is the one resize used in training, evaluation and the exported graph.
Imports nothing heavy at module level.
"""

from __future__ import annotations

import os

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".dcm", ".dicom", ".nii", ".nii.gz")

def load_image(path: str | os.PathLike, channels: int = 3, keep_precision: bool = False,
               **medical_options) -> np.ndarray:
    """Decodes one file to uint8 HxWxC with PIL: EXIF orientation honoured, first GIF frame,
    grayscale/RGBA/CMYK/palette converted, 16-bit scaled to 8-bit. DICOM and NIfTI
    (``volume.nii.gz#slice``) go through :mod:`restransfer.data.medical` (``medical_options``:
    window, normalize, axis).

    With ``keep_precision`` the result is float32 on the same 0-255 scale; a 16-bit image
    keeps all of its 65,536 levels (value * 255 / 65535) instead of being quantised.
    """
    from PIL import Image, ImageOps

    from restransfer.data.medical import is_medical, read_medical

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


def resize_image(image, image_size: int):
    """The one resize used in training, evaluation and the exported serving graph."""
    import tensorflow as tf

    return tf.image.resize(tf.cast(image, tf.float32), (image_size, image_size),
                           method="bilinear", antialias=True)
