"""Training-time augmentation with albumentations, run inside tf.data.

A pipeline is given as a preset name or as a list of ``{"name": ..., **arguments}`` (so YAML
can carry it). Each image gets its own seed from a seeded tf.data random stream that changes
every epoch, so a run is reproducible under a seed while epochs still see different views,
even with parallel map.
"""

from __future__ import annotations

import threading

import numpy as np

from restransfer.suggest import unknown_name

PRESETS: dict[str, list[dict]] = {
    "none": [],
    "light": [
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "Affine", "scale": (0.9, 1.1), "translate_percent": (-0.06, 0.06),
         "rotate": (-10, 10), "p": 0.5},
        {"name": "RandomBrightnessContrast", "brightness_limit": 0.15, "contrast_limit": 0.15,
         "p": 0.5},
    ],
    "medium": [
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "RandomResizedCrop", "scale": (0.6, 1.0), "p": 1.0},
        {"name": "Affine", "rotate": (-15, 15), "p": 0.5},
        {"name": "ColorJitter", "brightness": 0.2, "contrast": 0.2, "saturation": 0.2,
         "hue": 0.03, "p": 0.5},
    ],
    # image/mask pairs without a canonical orientation (endoscopy, microscopy, aerial)
    "segmentation": [
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "VerticalFlip", "p": 0.5},
        {"name": "Affine", "scale": (0.9, 1.1), "translate_percent": (-0.06, 0.06), "rotate": (-15, 15), "p": 0.5},
        {"name": "RandomBrightnessContrast", "brightness_limit": 0.15, "contrast_limit": 0.15, "p": 0.5},
    ],
    "medical": [
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "Affine", "scale": (0.95, 1.05), "translate_percent": (-0.04, 0.04),
         "rotate": (-7, 7), "p": 0.5},
        {"name": "RandomBrightnessContrast", "brightness_limit": 0.1, "contrast_limit": 0.1,
         "p": 0.3},
    ],
}


PRESET_NAMES = tuple(PRESETS)


def build_transform(spec, image_size: int):
    """An albumentations Compose for a preset name or a list of transform specs.

    Transforms that need the output size (``RandomResizedCrop``, ``Resize``, crops) get
    ``size``/``height``/``width`` filled in from ``image_size`` unless given.
    Unknown names or bad arguments raise ``ValueError`` naming the transform.
    """
    import albumentations as A  # ~1.7 s to import: only when a pipeline is built

    if spec is None:
        spec = "none"
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(unknown_name("augmentation preset", spec, PRESETS))
        spec = PRESETS[spec]
    transforms = []
    for index, item in enumerate(spec):
        item = dict(item)
        name = item.pop("name", None)
        transform_class = getattr(A, name, None) if isinstance(name, str) else None
        if transform_class is None or not isinstance(transform_class, type):
            known = [n for n in dir(A) if n[:1].isupper() and isinstance(getattr(A, n), type)]
            raise ValueError(f"augmentation[{index}]: "
                             + unknown_name("albumentations transform", name, known).split("; choices")[0])
        if name in ("RandomResizedCrop", "RandomSizedCrop", "Resize", "CenterCrop", "RandomCrop"):
            if name.endswith("ResizedCrop") or name == "RandomSizedCrop":
                item.setdefault("size", (image_size, image_size))
            else:
                item.setdefault("height", image_size)
                item.setdefault("width", image_size)
        try:
            transforms.append(transform_class(**item))
        except Exception as error:  # albumentations validates with pydantic
            raise ValueError(f"augmentation[{index}] {name}: bad arguments: {error}") from error
    return A.Compose(transforms) if transforms else None


class Augmenter:
    """Applies a Compose to one image with a given seed; safe to call from tf.data threads."""

    def __init__(self, spec, image_size: int):
        self.spec = spec
        self.image_size = image_size
        build_transform(spec, image_size)  # fail now, not inside tf.data
        self._local = threading.local()

    def _compose(self):
        compose = getattr(self._local, "compose", None)
        if compose is None:
            compose = self._local.compose = build_transform(self.spec, self.image_size)
        return compose

    @property
    def active(self) -> bool:
        return build_transform(self.spec, self.image_size) is not None

    def __call__(self, image: np.ndarray, seed, mask: np.ndarray | None = None):
        """The augmented image (and, given its mask, the mask moved by the same draw:
        albumentations resamples masks by nearest neighbour, so they keep their class ids)."""
        compose = self._compose()
        if compose is None:
            return image if mask is None else (image, mask)
        compose.set_random_seed(int(seed) % (2**32))
        precise = image.dtype != np.uint8  # float pixels (16-bit files): albumentations' float range is [0, 1]
        inputs = {"image": image / np.float32(255) if precise else image}
        if mask is not None:
            inputs["mask"] = mask
        result = compose(**inputs)
        out = result["image"]
        if out.shape[:2] != (self.image_size, self.image_size):
            import cv2

            out = cv2.resize(out, (self.image_size, self.image_size), interpolation=cv2.INTER_AREA)
            if mask is not None:
                result["mask"] = cv2.resize(result["mask"], (self.image_size, self.image_size),
                                            interpolation=cv2.INTER_NEAREST)
        if out.ndim == 2:  # OpenCV drops the channel axis of 1-channel images
            out = out[..., None]
        if precise:
            out = np.clip(out, 0.0, 1.0) * np.float32(255)
        out = np.ascontiguousarray(out, dtype=image.dtype)
        return out if mask is None else (out, np.ascontiguousarray(result["mask"], dtype=mask.dtype))

    def batch(self, images: np.ndarray, seeds: np.ndarray, masks: np.ndarray | None = None):
        """Augments each image of a batch (with its mask) with its own seed."""
        if masks is None:
            return np.stack([self(image, seed) for image, seed in zip(images, seeds)])
        pairs = [self(image, seed, mask) for image, seed, mask in zip(images, seeds, masks)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _shift(pixels, dy: int, dx: int):
    import tensorflow as tf

    size = tf.shape(pixels)[1:3]
    padded = tf.pad(pixels, [[0, 0], [abs(dy), abs(dy)], [abs(dx), abs(dx)], [0, 0]], mode="REFLECT")
    return tf.image.crop_to_bounding_box(padded, abs(dy) + dy, abs(dx) + dx, size[0], size[1])


# Test-time augmentation: views of a batch of resized pixels [N, H, W, C] whose probabilities
# are averaged. TensorFlow ops, so the serving graph averages the very same views.
# Identity, horizontal flip, 4-pixel shifts: changes a reader would not notice.
TEST_TIME_VIEWS = (
    lambda x: x,
    lambda x: x[:, :, ::-1, :],
    lambda x: _shift(x, 4, 0),
    lambda x: _shift(x, 0, 4),
    lambda x: _shift(x, -4, -4),
)
