"""Training-time augmentation, run inside tf.data.

A pipeline is given as a preset name or as a list of ``{"name": ..., **arguments}`` in
albumentations' names and arguments (so YAML can carry it). Each image gets its own seed,
drawn from (run seed, epoch, image index), so a run is reproducible under a seed and any
epoch can be replayed exactly (resume) while epochs still see different views.

Two ways to run a pipeline, chosen per pipeline:

* **In TensorFlow ops** (:class:`GraphAugmentation`) when every transform is one of
  :data:`GRAPH_TRANSFORMS` with arguments it implements: the same parameters and the same
  distributions as the albumentations transform of that name (albumentations parses and
  validates the arguments; the ops read them from its object). GIL-free, so tf.data runs it
  on every core -- the presets use this path.
* **Through albumentations** otherwise (one Python call per batch), for the transforms only
  it has.
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


def _symmetric(pair):
    return float(pair[0]), float(pair[1])


def _flip(axis):
    def apply(image, draws):
        import tensorflow as tf

        return tf.cond(draws[0] < 0.5, lambda: tf.reverse(image, [axis]), lambda: image)
    return apply, 1


def _affine(transform):
    """albumentations' Affine (scale, translation, rotation about the centre; bilinear; zeros
    outside) as one projective-transform op. None for arguments it does not implement."""
    plain = (transform.interpolation == 1 and transform.border_mode == 0 and not transform.fit_output
             and not transform.balanced_scale and float(np.sum(np.abs(np.asarray(transform.fill)))) == 0
             and all(v == 0 for pair in transform.shear.values() for v in pair))
    if not plain:
        return None
    scale_x, scale_y = _symmetric(transform.scale["x"]), _symmetric(transform.scale["y"])
    in_pixels = transform.translate_percent is None
    shift = transform.translate_px if in_pixels else transform.translate_percent
    shift_x, shift_y = _symmetric(shift["x"]), _symmetric(shift["y"])
    rotate, keep_ratio = _symmetric(transform.rotate), transform.keep_ratio

    def apply(image, draws):
        import tensorflow as tf

        between = lambda low_high, u: low_high[0] + (low_high[1] - low_high[0]) * u
        height, width = (tf.cast(tf.shape(image)[k], tf.float32) for k in (0, 1))
        sx = between(scale_x, draws[0])
        sy = sx if keep_ratio else between(scale_y, draws[1])
        if in_pixels:  # whole pixels, both ends included (randint)
            tx = tf.floor(shift_x[0] + (shift_x[1] - shift_x[0] + 1) * draws[2])
            ty = tf.floor(shift_y[0] + (shift_y[1] - shift_y[0] + 1) * draws[3])
        else:  # a fraction of the size, truncated to whole pixels
            tx = tf.cast(tf.cast(between(shift_x, draws[2]) * width, tf.int32), tf.float32)
            ty = tf.cast(tf.cast(between(shift_y, draws[3]) * height, tf.int32), tf.float32)
        angle = between(rotate, draws[4]) * (np.pi / 180.0)
        cx, cy = width / 2 - 0.5, height / 2 - 0.5
        # albumentations maps in -> out = c + t + R S (in - c), R = [[cos, sin], [-sin, cos]];
        # the op wants out -> in: c + S^-1 R^T (out - c - t)
        cos, sin = tf.cos(angle), tf.sin(angle)
        dx, dy = -cx - tx, -cy - ty
        a0, a1 = cos / sx, -sin / sx
        b0, b1 = sin / sy, cos / sy
        matrix = tf.stack([a0, a1, a0 * dx + a1 * dy + cx, b0, b1, b0 * dx + b1 * dy + cy, 0.0, 0.0])
        out = tf.raw_ops.ImageProjectiveTransformV3(
            images=image[None], transforms=matrix[None], output_shape=tf.shape(image)[:2],
            fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
        return out[0]
    return apply, 5


def _brightness_contrast(transform):
    """albumentations' RandomBrightnessContrast: ``image * (1 + c) + b * 255``, clipped."""
    if not transform.brightness_by_max or transform.ensure_safe_range:
        return None
    brightness, contrast = _symmetric(transform.brightness_limit), _symmetric(transform.contrast_limit)

    def apply(image, draws):
        import tensorflow as tf

        alpha = 1.0 + contrast[0] + (contrast[1] - contrast[0]) * draws[0]
        beta = (brightness[0] + (brightness[1] - brightness[0]) * draws[1]) * 255.0
        return tf.clip_by_value(image * alpha + beta, 0.0, 255.0)
    return apply, 2


# albumentations name -> (its parsed transform -> (apply(image, draws), draws needed) or None)
GRAPH_TRANSFORMS = {
    "HorizontalFlip": lambda transform: _flip(1),
    "VerticalFlip": lambda transform: _flip(0),
    "Affine": _affine,
    "RandomBrightnessContrast": _brightness_contrast,
}


class GraphAugmentation:
    """A pipeline of :data:`GRAPH_TRANSFORMS` as TensorFlow ops on one float32 image (0-255,
    any channel count). Every random number comes from the image's seed (stateless), so the
    same (seed, image) always gives the same view."""

    def __init__(self, steps):
        self.steps = steps  # [(probability, apply, draws)]

    @classmethod
    def from_compose(cls, compose):
        """The graph version of an albumentations Compose, or None when a transform (or an
        argument of one) has no graph implementation."""
        steps = []
        for transform in compose.transforms if compose is not None else []:
            make = GRAPH_TRANSFORMS.get(type(transform).__name__)
            step = make(transform) if make is not None else None
            if step is None:
                return None
            steps.append((float(transform.p), *step))
        return cls(steps)

    def __call__(self, image, seed):
        import tensorflow as tf

        needed = sum(1 + draws for _, _, draws in self.steps)
        uniforms = tf.random.stateless_uniform(
            [needed], seed=tf.stack([tf.cast(seed, tf.int64), tf.constant(0x5EED, tf.int64)]))
        image = tf.cast(image, tf.float32)
        position = 0
        for probability, apply, draws in self.steps:
            chosen, parameters = uniforms[position], uniforms[position + 1: position + 1 + draws]
            position += 1 + draws
            image = tf.cond(chosen < probability, lambda: apply(image, parameters), lambda: image)
        return image


class Augmenter:
    """One augmentation pipeline: ``graph`` (TensorFlow ops, see :class:`GraphAugmentation`)
    when every transform has a graph version, else :meth:`batch` through albumentations
    (safe to call from tf.data threads)."""

    def __init__(self, spec, image_size: int):
        self.spec = spec
        self.image_size = image_size
        compose = build_transform(spec, image_size)  # fail now, not inside tf.data
        self.graph = GraphAugmentation.from_compose(compose)
        self._local = threading.local()

    def _compose(self):
        compose = getattr(self._local, "compose", None)
        if compose is None:
            compose = self._local.compose = build_transform(self.spec, self.image_size)
        return compose

    @property
    def active(self) -> bool:
        return build_transform(self.spec, self.image_size) is not None

    def __call__(self, image: np.ndarray, seed) -> np.ndarray:
        compose = self._compose()
        if compose is None:
            return image
        compose.set_random_seed(int(seed) % (2**32))
        out = compose(image=image)["image"]
        if out.shape[:2] != (self.image_size, self.image_size):
            import cv2

            out = cv2.resize(out, (self.image_size, self.image_size), interpolation=cv2.INTER_AREA)
        if out.ndim == 2:  # OpenCV drops the channel axis of 1-channel images
            out = out[..., None]
        return np.ascontiguousarray(out, dtype=image.dtype)

    def batch(self, images: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """Augments each image of a batch with its own seed."""
        return np.stack([self(image, seed) for image, seed in zip(images, seeds)])


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
