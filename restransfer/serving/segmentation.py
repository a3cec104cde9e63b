"""SavedModel export of a segmentation model, in the layout and with the staging, warm-up and
card of :mod:`restransfer.serving.export`.

Signatures (tag ``serve``):
  * ``serving_default``: ``image_bytes`` (tf.string [N]: JPEG, PNG, GIF, BMP, WebP of any
    sizes), decoded and resized in the graph by the ops that decoded the training images;
  * ``predict_images``: ``images`` (float32 [N, H, W, C] raw 0-255 pixels of one size).
Outputs: ``probabilities`` [N, S, S, C'] at the model's resolution (C' = 1 foreground map for
a binary task, else a softmax over the classes); ``mask_png_bytes`` [N], each image's decided
mask at its *own* size as an 8-bit PNG of class ids (TF Serving's REST API returns an output
named ``*_bytes`` as ``{"b64": ...}``: a batch of differently sized images needs no ragged
tensor, and a client gets kilobytes instead of a float per pixel); ``mask_sizes`` [N, 2]
(height, width). The mask is decided as ``predict_masks`` decides it
(:func:`restransfer.models.unet.masks_at_size`); the export is refused unless the served masks
equal ``predict_masks`` on the original files, pixel for pixel.
"""

from __future__ import annotations

import io
import time

import numpy as np

from restransfer.graph import plain, traced
from restransfer.serving.export import (PARITY_TOLERANCE, hold_weights, staged_version, warmup_samples, write_card,
                                        write_labels, write_warmup_requests)


def _serving_module(model, image_size: int, channels: int, decision, keep_precision: bool, normalize):
    import tensorflow as tf

    from restransfer.data.decoding import decode_image_bytes, resize_image
    from restransfer.models.unet import masks_at_size

    def outputs(pixels, sizes, probabilities):
        def encode(args):
            image_probabilities, size = args
            return tf.io.encode_png(masks_at_size(image_probabilities, size[0], size[1], decision)[..., None])

        pngs = tf.map_fn(plain(encode), (probabilities, sizes), fn_output_signature=tf.TensorSpec([], tf.string))
        return {"probabilities": probabilities, "mask_png_bytes": pngs, "mask_sizes": sizes}

    class ServingModule(tf.Module):
        def __init__(self):
            super().__init__()
            hold_weights(self, model)

        @traced(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serving_default(self, image_bytes):
            def decode(encoded):
                image = decode_image_bytes(encoded, channels, keep_precision, normalize)
                return resize_image(image, image_size), tf.shape(image)[:2]

            pixels, sizes = tf.map_fn(plain(decode), image_bytes, fn_output_signature=(
                tf.TensorSpec([image_size, image_size, channels], tf.float32), tf.TensorSpec([2], tf.int32)))
            return outputs(pixels, sizes, tf.cast(model(pixels, training=False), tf.float32))

        @traced(input_signature=[tf.TensorSpec([None, None, None, channels], tf.float32, name="images")])
        def predict_images(self, images):
            shape = tf.shape(images)
            sizes = tf.tile(shape[None, 1:3], [shape[0], 1])
            pixels = resize_image(images, image_size)
            return outputs(pixels, sizes, tf.cast(model(pixels, training=False), tf.float32))

    return ServingModule()


def _card(metadata, class_names, image_size, channels, decision, keep_precision, normalize) -> dict:
    import keras
    import tensorflow as tf

    import restransfer
    from restransfer.data.decoding import SERVED_FORMATS

    binary = len(class_names) == 2
    return {
        **(metadata or {}),
        "task": "segmentation",
        "classes": list(class_names),
        "decision": {"description": decision.describe(class_names), **decision.get_config()},
        "input": {
            "serving_default": f"image_bytes: tf.string [N] ({', '.join(SERVED_FORMATS)} bytes of any sizes; REST: "
                               '{"instances": [{"b64": "..."}]}), decoded in the graph by the ops that decoded the '
                               f"training images (EXIF orientation, transparency on white), {channels} channel(s)"
                               + (", 16-bit PNGs normalised" if normalize else "")
                               + ("" if keep_precision else ", rounded to 8 bits"),
            "predict_images": f"images: float32 [N, H, W, {channels}], raw 0-255 pixels, one size per request",
        },
        "preprocessing": f"decode, bilinear antialiased resize to {image_size}x{image_size}, then the backbone's "
                         "own normalisation (a layer inside the model)",
        "outputs": {
            "probabilities": f"float32 [N, {image_size}, {image_size}, {1 if binary else len(class_names)}] at the "
                             "model's resolution: " + ("the foreground's sigmoid" if binary else "a softmax over the classes"),
            "mask_png_bytes": "string [N]: each image's decided mask at its own size, an 8-bit PNG whose pixel values "
                              "are class ids (REST returns it as {\"b64\": ...})",
            "mask_sizes": "int32 [N, 2]: (height, width) of each image and its mask",
        },
        "mask_sizing": f"the {image_size}x{image_size} probabilities are resized bilinearly to the image's own size, "
                       "then decided (threshold or argmax): restransfer's predict_masks computes the same",
        "versions": {"restransfer": restransfer.__version__, "tensorflow": tf.__version__, "keras": keras.__version__},
    }


def decode_png_masks(pngs) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(bytes(png)))) for png in pngs]


def export_segmentation_model(model, out_dir, *, class_names, image_size: int, decision, model_name: str,
                              version: int | None, warmup_images, encoded_images, expected_masks,
                              keep_precision: bool, decode_options: dict | None, metadata: dict | None):
    """Exports a segmentation model for TF Serving; returns the version directory.

    ``warmup_images``/``encoded_images``: decoded pixels and original bytes of a few real
    images; ``expected_masks``: a function pixels -> the masks ``predict_masks`` decides for
    them (each at its image's size). Refused unless the served masks equal them exactly and
    the probabilities agree within :data:`PARITY_TOLERANCE`."""
    import tensorflow as tf

    started = time.time()
    channels = int(model.input_shape[-1])
    warmup_images, encoded_images = warmup_samples(warmup_images, encoded_images, image_size, channels)
    normalize = (decode_options or {}).get("normalize")
    with staged_version(out_dir, model_name, version) as (staging, version):
        module = _serving_module(model, image_size, channels, decision, keep_precision, normalize)
        tf.saved_model.save(module, str(staging), signatures={"serving_default": module.serving_default,
                                                               "predict_images": module.predict_images})
        write_labels(staging, class_names)
        write_warmup_requests(staging / "assets.extra" / "tf_serving_warmup_requests", encoded_images, model_name)
        parity = verify(staging, model, warmup_images, encoded_images, image_size, expected_masks)
        card = _card({**(metadata or {}), "model_name": model_name, "version": version}, class_names, image_size,
                     channels, decision, keep_precision, normalize)
        card.update(parity)
        write_card(staging, card)
    final = staging.parent / str(version)
    print(f"exported {final} in {time.time() - started:.1f}s (masks equal predict_masks on "
          f"{parity['export_parity_images']} images; max|dprob| {parity['export_parity_max_abs_diff']:.2e})")
    return final


def verify(export_dir, model, images, encoded, image_size: int, expected_masks) -> dict:
    """Both signatures against the Keras model on each image: probabilities within the
    tolerance, masks (at the image's own size) equal to ``predict_masks``'."""
    import tensorflow as tf

    from restransfer.data.decoding import resize_image

    loaded = tf.saved_model.load(str(export_dir))
    diff, pixels_compared = 0.0, 0
    for image, original in zip(images, encoded):  # one at a time: originals differ in size
        pixels = np.asarray(image, np.float32)[None]
        expected_probabilities = model.predict(np.asarray(resize_image(pixels, image_size)), verbose=0)
        expected = expected_masks([image])[0]
        for name, served in (("predict_images", loaded.signatures["predict_images"](images=tf.constant(pixels))),
                             ("serving_default", loaded.signatures["serving_default"](image_bytes=tf.constant([original])))):
            diff = max(diff, float(np.abs(served["probabilities"].numpy() - expected_probabilities).max()))
            mask = decode_png_masks(served["mask_png_bytes"].numpy())[0]
            if mask.shape != expected.shape or not np.array_equal(mask, expected):
                wrong = "shape" if mask.shape != expected.shape else f"{int((mask != expected).sum())} pixels"
                raise RuntimeError(f"the exported model's {name} mask differs from predict_masks ({wrong}); "
                                   "nothing was exported")
            pixels_compared += mask.size
    if not diff <= PARITY_TOLERANCE:
        raise RuntimeError(f"exported model disagrees with the Keras model: max|dprob|={diff:.3g}")
    return {"export_parity_max_abs_diff": diff, "export_parity_images": len(images),
            "export_parity_mask_pixels_equal": pixels_compared}
