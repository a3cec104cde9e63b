"""SavedModel export in the layout TensorFlow Serving loads as is.

``OUT/<model_name>/<version>/`` holds ``saved_model.pb``, ``variables/``, ``assets/labels.txt``
and ``assets.extra/`` (warmup requests, model card). The version directory is written under a
hidden temporary name in the same directory, verified against the Keras model, then renamed:
Serving only watches integer-named directories, so it never sees a partial export.

Signatures (tag ``serve``):
  * ``serving_default``: ``image_bytes`` (tf.string [N]: JPEG, PNG, GIF, BMP, WebP) decoded by
    the same TensorFlow ops that decode training images (:mod:`restransfer.data.decoding`:
    EXIF orientation, transparency on white, 16-bit scaling), resized and preprocessed in the
    graph exactly as in evaluation.
  * ``predict_images``: ``images`` (float32 [N, H, W, C], raw 0-255 pixels): for formats decoded
    on the client (TIFF, DICOM, NIfTI: ``restransfer.data.load_image``).
Outputs: ``probabilities`` [N, C] (the model's temperature applied; averaged over the
test-time views when the model uses them), ``class_ids``/``class_names``/``scores`` [N, k]
(top-k), and the model's decision (:mod:`restransfer.models.decision`): ``predictions``, the
decided class id [N] (single-label: argmax or the chosen binary threshold) or 0/1 [N, C]
(multi-label, per-label thresholds), and ``prediction_names`` [N] (multi-label: the names
joined by ",").
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from restransfer.graph import plain, traced

PARITY_TOLERANCE = 1e-5


def next_version(model_dir: Path) -> int:
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] if model_dir.is_dir() else []
    return max(versions, default=0) + 1


def hold_weights(module, model) -> None:
    """What a serving module saves of the Keras model: its weights and BatchNorm statistics.
    Holding the model itself made ``tf.saved_model.save`` walk its object graph and save the
    optimizer's moments too (a ResNet-18 export 129 MB, not 43) and doubled the export's time;
    the signatures call the model directly, so its variables are all they capture."""
    module.model_variables = list(model.variables)


def _serving_module(model, class_names, image_size, channels, top_k, decision, keep_precision, normalize=None):
    import tensorflow as tf

    from restransfer.data.decoding import decode_image_bytes, resize_image
    from restransfer.models.decision import graph_probabilities

    k = min(top_k, len(class_names))
    names = tf.constant(class_names)

    class ServingModule(tf.Module):
        def __init__(self):
            super().__init__()
            hold_weights(self, model)

        def _outputs(self, pixels):
            probabilities = graph_probabilities(model, pixels, decision.test_time_augmentation)
            scores, ids = tf.math.top_k(probabilities, k=k)
            decided = decision.decide(probabilities, class_names)
            if decision.rule == "per_label":
                chosen = tf.ragged.boolean_mask(tf.broadcast_to(names, tf.shape(decided)), decided > 0)
                decided_names = tf.strings.reduce_join(chosen, axis=1, separator=",")
            else:
                decided_names = tf.gather(names, decided)
            return {
                "probabilities": probabilities,
                "class_ids": ids,
                "class_names": tf.gather(names, ids),
                "scores": scores,
                "predictions": decided,
                "prediction_names": decided_names,
            }

        @traced(input_signature=[tf.TensorSpec([None, None, None, channels], tf.float32, name="images")])
        def predict_images(self, images):
            same = tf.logical_and(tf.shape(images)[1] == image_size, tf.shape(images)[2] == image_size)
            pixels = tf.cond(same, lambda: images, lambda: resize_image(images, image_size))
            return self._outputs(pixels)

        @traced(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serving_default(self, image_bytes):
            def decode(encoded):
                return resize_image(decode_image_bytes(encoded, channels, keep_precision, normalize), image_size)

            pixels = tf.map_fn(plain(decode), image_bytes,
                               fn_output_signature=tf.TensorSpec([image_size, image_size, channels], tf.float32))
            return self._outputs(pixels)

    return ServingModule()


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_warmup_requests(path: Path, encoded_images: list[bytes], model_name: str) -> None:
    """assets.extra/tf_serving_warmup_requests: PredictionLog records TF Serving replays at load."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for encoded in encoded_images:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name="serving_default")
            )
            request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([encoded], dtype=tf.string))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())


def _model_card(metadata, class_names, image_size, channels, decision, top_k, keep_precision, normalize=None):
    import keras
    import tensorflow as tf

    import restransfer
    from restransfer.data.decoding import SERVED_FORMATS

    return {
        **(metadata or {}),
        "classes": list(class_names),
        "task": "multi-label" if decision.rule == "per_label" else "single-label",
        "decision": {"description": decision.describe(), **decision.get_config()},
        "test_time_augmentation": ("served: the probabilities of 5 views (identity, flip, 3 shifts) "
                                   "are averaged in the graph, as in evaluation"
                                   if decision.test_time_augmentation else "off"),
        "input": {
            "serving_default": f"image_bytes: tf.string [N] ({', '.join(SERVED_FORMATS)} bytes; REST: "
                               '{"instances": [{"b64": "..."}]}), decoded in the graph by the ops that '
                               "decoded the training images: EXIF orientation applied, transparency "
                               "composited on white, 16-bit values scaled to 0-255"
                               + (f", 16-bit PNGs' intensities mapped to 0-255 by their {'percentile' if normalize == 'auto' else normalize} range"
                                  if normalize else "")
                               + ("" if keep_precision else " and rounded to 8 bits")
                               + f", {channels} channel(s)" + (" (ITU-R 601-2 luma)" if channels == 1 else ""),
            "predict_images": f"images: float32 [N, H, W, {channels}], raw 0-255 pixels, "
                              f"resized to {image_size}x{image_size} in the graph",
            "client_side_formats": "TIFF, DICOM and NIfTI are not decoded by serving_default: decode "
                                   "them with restransfer.data.load_image (the same conversions, and "
                                   "the run's medical window/normalisation) and send predict_images",
        },
        "preprocessing": f"decode, bilinear antialiased resize to {image_size}x{image_size}, then "
                         "the backbone's own normalisation (a layer inside the model)",
        "outputs": ["probabilities", "class_ids", "class_names", "scores", "predictions",
                    "prediction_names"],
        "top_k": top_k,
        "versions": {"restransfer": restransfer.__version__, "tensorflow": tf.__version__,
                     "keras": keras.__version__},
    }


def _markdown_card(card: dict) -> str:
    lines = [f"# Model card: {card.get('model_name', 'model')}", ""]
    if "decision" in card:
        lines += [f"**Decision**: {card['decision']['description']}.", ""]
    for key, value in card.items():
        lines.append(f"- **{key}**: {json.dumps(value) if not isinstance(value, str) else value}")
    return "\n".join(lines) + "\n"


def export_saved_model(
    model,
    out_dir: str | os.PathLike,
    class_names: list[str],
    image_size: int,
    model_name: str = "restransfer",
    version: int | None = None,
    top_k: int = 5,
    decision=None,
    warmup_images: list[np.ndarray] | None = None,
    metadata: dict | None = None,
    encoded_images: list[bytes | None] | None = None,
    keep_precision: bool = False,
    decode_options: dict | None = None,
) -> Path:
    """Exports ``model`` for TF Serving; returns the version directory.

    ``warmup_images`` (decoded HxWxC pixels, a few real images) and ``encoded_images`` (the
    same images' original file bytes; None where there is no served file, e.g. arrays, which
    are then sent as lossless PNG) become the warmup requests and the parity check: the
    export is refused unless ``serving_default(original bytes)`` and ``predict_images(pixels)``
    both give the Keras model's probabilities. Without images a gray image is used.
    """
    import tensorflow as tf

    from restransfer.models.heads import find_head

    started = time.time()
    channels = int(model.input_shape[-1])
    decision = decision or find_head(model).decision
    decision.check(list(class_names), decision.rule == "per_label")
    warmup_images, encoded_images = warmup_samples(warmup_images, encoded_images, image_size, channels)
    with staged_version(out_dir, model_name, version) as (staging, version):
        normalize = (decode_options or {}).get("normalize")
        module = _serving_module(model, list(class_names), image_size, channels, top_k, decision, keep_precision,
                                 normalize)
        tf.saved_model.save(
            module, str(staging),
            signatures={"serving_default": module.serving_default,
                        "predict_images": module.predict_images},
        )
        write_labels(staging, class_names)
        write_warmup_requests(staging / "assets.extra" / "tf_serving_warmup_requests", encoded_images,
                              model_name)
        parity = verify_export(staging, model, warmup_images, encoded_images, image_size, decision,
                               list(class_names))
        card = _model_card({**(metadata or {}), "model_name": model_name, "version": version},
                           class_names, image_size, channels, decision, top_k, keep_precision, normalize)
        card["export_parity_max_abs_diff"] = parity
        write_card(staging, card)
    final = staging.parent / str(version)
    print(f"exported {final} in {time.time() - started:.1f}s (parity max|dprob| {parity:.2e})")
    return final


def warmup_samples(images, encoded, image_size: int, channels: int):
    """(decoded pixels, original bytes) of at most 8 warm-up images: a gray image without any;
    arrays (no file) sent as lossless PNG."""
    if not images:
        images = [np.full((image_size, image_size, channels), 128, np.uint8)]
    images = list(images[:8])
    encoded = list(encoded or [None] * len(images))[: len(images)]
    return images, [e if e is not None else encode_png(image) for e, image in zip(encoded, images)]


@contextlib.contextmanager
def staged_version(out_dir, model_name: str, version: int | None):
    """``out_dir/<model_name>/<version>/`` written under a hidden temporary name beside it and
    renamed into place only when the block finishes (an exception removes it): Serving watches
    integer-named directories only, so it never sees a partial export. Yields (staging, version)."""
    from restransfer.paths import child

    model_dir = child(out_dir, model_name, "model name")  # never a path out of out_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    version = int(version) if version is not None else next_version(model_dir)
    final = model_dir / str(version)
    if final.exists():
        raise FileExistsError(f"{final} exists; exports never overwrite a version")
    staging = model_dir / f".partial-{version}-{uuid.uuid4().hex[:8]}"
    try:
        yield staging, version
        os.rename(staging, final)  # atomic on one filesystem: the version appears complete
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_labels(staging: Path, class_names) -> None:
    (staging / "assets").mkdir(parents=True, exist_ok=True)
    (staging / "assets" / "labels.txt").write_text("\n".join(class_names) + "\n")


def write_card(staging: Path, card: dict) -> None:
    (staging / "assets.extra").mkdir(parents=True, exist_ok=True)
    (staging / "assets.extra" / "model_card.json").write_text(json.dumps(card, indent=2))
    (staging / "assets.extra" / "MODEL_CARD.md").write_text(_markdown_card(card))


def verify_export(export_dir, model, images: list[np.ndarray], encoded: list[bytes], image_size: int,
                  decision, class_names: list[str]) -> float:
    """Loads the export and checks both signatures against the Keras model: ``predict_images``
    on the decoded pixels, ``serving_default`` on the same images' original bytes; the
    probabilities and the decision.

    Returns max |dprob|; raises if it exceeds PARITY_TOLERANCE or a decision differs.
    """
    import tensorflow as tf

    from restransfer.data.decoding import resize_image
    from restransfer.models.decision import model_probabilities

    loaded = tf.saved_model.load(str(export_dir))
    diff = 0.0
    for image, original in zip(images, encoded):  # one at a time: originals differ in size
        pixels = np.asarray(image, dtype=np.float32)[None]
        expected = model_probabilities(model, np.asarray(resize_image(pixels, image_size)),
                                       decision.test_time_augmentation)
        by_pixels = loaded.signatures["predict_images"](images=tf.constant(pixels))
        by_bytes = loaded.signatures["serving_default"](image_bytes=tf.constant([original]))
        for served in (by_pixels, by_bytes):
            diff = max(diff, float(np.abs(served["probabilities"].numpy() - expected).max()))
            if not _decisions_agree(served, decision, class_names):
                raise RuntimeError(f"exported model decides {served['predictions'].numpy().tolist()} where "
                                   f"the Keras model's rule decides otherwise ({decision.describe()})")
    if not diff <= PARITY_TOLERANCE:
        raise RuntimeError(f"exported model disagrees with the Keras model: max|dprob|={diff:.3g}")
    return diff


def _decisions_agree(served: dict, decision, class_names) -> bool:
    """The graph's ``predictions`` are the rule's decision on the graph's own probabilities
    (their closeness to the Keras model's is checked separately)."""
    expected = np.asarray(decision.decide(served["probabilities"].numpy(), class_names))
    return bool(np.array_equal(served["predictions"].numpy(), expected))
