"""LiteRT (formerly TFLite) and ONNX exports, each checked in its own runtime before it is kept.

The in-graph JPEG/PNG decoder of the SavedModel is TensorFlow-only, so these formats take
**decoded pixels**: ``pixels``, float32 [N, S, S, C], raw 0-255 values, RGB (or the ITU-R
601-2 luma for a 1-channel model), already resized to the model's S x S. The graph applies
the backbone's normalisation, the temperature, the test-time views and the decision rule, and
returns ``probabilities`` and ``predictions`` (the decided class ids, or 0/1 per label, or the
decided mask at S x S), the names the SavedModel uses.

:func:`reference_pixels` is that input made from a file with NumPy and Pillow only (what a
client mirrors: EXIF orientation, transparency on white, luma, a bilinear antialiased resize
of float pixels); its distance from restransfer's own decoder is measured and written into the
model card. An export is refused unless the file, run in its runtime (``ai_edge_litert``'s
interpreter; ``onnxruntime``), gives the Keras model's probabilities within
:data:`TOLERANCE` and the same decisions on held-out images passed through
:func:`reference_pixels`. Quantized LiteRT files (``float16``; ``int8``: full-integer weights
and activations, calibrated on training images, float32 in and out) are scored on the
held-out images before and after: the card states the file size, the metric change and the
decisions' agreement, and the export is refused when the metric drops by more than
``max_metric_drop`` (``allow_drop=True``: warned instead). A model trained in mixed precision
is converted (and checked) as its float32 twin, the same weights computing in float32; the
card's ``precision`` says how far the twin's probabilities are from the trained model's.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np

from restransfer.graph import traced
from restransfer.models.precision import compute_dtypes, float32_twin
from restransfer.serving.export import staged_version, write_card, write_labels

FORMATS = ("saved_model", "litert", "onnx")
QUANTIZATIONS = {"litert": (None, "float16", "int8"), "onnx": (None,)}
TOLERANCE = 1e-4          # max |dprob| of a float32 file against Keras (runtimes order sums differently)
FILE_NAMES = {"litert": "model.tflite", "onnx": "model.onnx"}


class PortableExportError(RuntimeError):
    """The runtime cannot represent the model, or the exported file disagrees with it."""


# --- the input contract, for clients -----------------------------------------------------------


def reference_pixels(path, image_size: int, channels: int = 3) -> np.ndarray:
    """One file as a portable export's input (float32 [S, S, C], 0-255): decoded by Pillow,
    EXIF orientation applied, transparency composited on white, RGB (or the ITU-R 601-2 luma for
    one channel), resized to S x S by a bilinear, antialiased filter on float pixels. NumPy and
    Pillow only: what a client in another language mirrors."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.seek(0)
        image = ImageOps.exif_transpose(image)
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
    planes = [np.sum(rgb * np.array([0.299, 0.587, 0.114], np.float32), axis=-1)] if channels == 1 else \
        [rgb[..., c] for c in range(3)]
    resized = [np.asarray(Image.fromarray(plane.astype(np.float32), mode="F").resize(
        (image_size, image_size), Image.Resampling.BILINEAR)) for plane in planes]
    return np.clip(np.stack(resized, axis=-1), 0, 255).astype(np.float32)


# --- conversion -------------------------------------------------------------------------------


def _concrete_function(outputs_fn, image_size: int, channels: int):
    import tensorflow as tf

    function = traced(outputs_fn, input_signature=[
        tf.TensorSpec([None, image_size, image_size, channels], tf.float32, name="pixels")])
    return function, function.get_concrete_function()


def to_litert(outputs_fn, image_size: int, channels: int, quantization: str | None = None,
              representative: np.ndarray | None = None) -> bytes:
    """The pixel graph as a LiteRT flatbuffer (``float16``/``int8`` quantized when asked)."""
    import tensorflow as tf

    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    _, concrete = _concrete_function(outputs_fn, image_size, channels)
    frozen = convert_variables_to_constants_v2(concrete)  # every variable a constant: nothing to read at run time
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
    if quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "int8":
        if representative is None or not len(representative):
            raise PortableExportError("int8 quantization needs representative images (from the training split)")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None]] for image in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif quantization is not None:
        raise PortableExportError(f"LiteRT quantization must be float16 or int8, got {quantization!r}")
    try:
        with _quiet():
            return converter.convert()
    except Exception as error:  # the converter raises ConverterError and friends
        raise PortableExportError(f"LiteRT cannot represent this model: {_first_line(error)}") from None



def to_onnx(outputs_fn, image_size: int, channels: int, opset: int = 17) -> bytes:
    import tensorflow as tf
    import tf2onnx

    function, _ = _concrete_function(outputs_fn, image_size, channels)
    try:
        with _quiet():
            proto, _ = tf2onnx.convert.from_function(
                function, input_signature=[tf.TensorSpec([None, image_size, image_size, channels], tf.float32,
                                                         name="pixels")], opset=opset)
    except Exception as error:
        raise PortableExportError(f"ONNX cannot represent this model: {_first_line(error)}") from None
    return proto.SerializeToString()


@contextlib.contextmanager
def _quiet():
    """The converters log pages of graph details; only errors matter here."""
    import logging

    loggers = [logging.getLogger(name) for name in ("tf2onnx", "tensorflow", "absl")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _first_line(error) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if "error" in line.lower() or "not supported" in line.lower()]
    return (useful or lines or [type(error).__name__])[0][:400]


# --- running in the runtimes ----------------------------------------------------------------------


def run_litert(model_bytes: bytes, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs of a LiteRT file on a batch, from ``ai_edge_litert``'s interpreter (one image
    per invocation). The file's outputs are ``probabilities`` (float32) and ``predictions``
    (int32), told apart by their types."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_bytes)
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]
    outputs = {("probabilities" if np.dtype(d["dtype"]).kind == "f" else "predictions"): d
               for d in interpreter.get_output_details()}
    results = {name: [] for name in outputs}
    for image in pixels:
        interpreter.set_tensor(source["index"], np.ascontiguousarray(image[None], np.float32))
        interpreter.invoke()
        for name, detail in outputs.items():
            results[name].append(interpreter.get_tensor(detail["index"]))
    return {name: np.concatenate(values) for name, values in results.items()}


def run_onnx(model_bytes: bytes, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs of an ONNX file on a batch, from ``onnxruntime`` (CPU)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    names, source = [output.name for output in session.get_outputs()], session.get_inputs()[0].name
    return in_batches(lambda batch: dict(zip(names, session.run(names, {source: np.ascontiguousarray(batch, np.float32)}))),
                      pixels)


RUNTIMES = {"litert": run_litert, "onnx": run_onnx}


def in_batches(call, pixels: np.ndarray, batch_size: int = 16) -> dict[str, np.ndarray]:
    """``call`` (pixels -> dict of arrays) over ``pixels`` a batch at a time, joined. One call on
    every held-out image at once keeps a whole eager forward pass per image alive: a ResNet-50
    at 224 px needs ~140 MB an image that way (153 images ran a 24 GiB machine out of memory)."""
    parts = [call(pixels[start:start + batch_size]) for start in range(0, len(pixels), batch_size)]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


# --- the export ------------------------------------------------------------------------------------


def export_portable(recipe, out_dir, *, format: str, quantization: str | None = None, heldout=None,
                    representative=None, model_name: str | None = None, version: int | None = None,
                    max_metric_drop: float = 0.02, allow_drop: bool = False) -> Path:
    """``recipe``'s model as a LiteRT or ONNX file in ``out_dir/<model_name>/<version>/``, checked
    in its runtime on ``heldout`` (labelled data: files or arrays) as the module docstring says."""
    if format not in QUANTIZATIONS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if quantization not in QUANTIZATIONS[format]:
        raise ValueError(f"{format} quantization must be one of {QUANTIZATIONS[format]}, got {quantization!r}")
    if heldout is None:
        raise ValueError("a portable export is checked on held-out labelled images: pass heldout= "
                         "(restransfer export RUN uses the run's validation split)")
    started = time.time()
    model, size, channels = recipe._require_model(), recipe.image_size, recipe.channels
    pixels, targets, contract_gap = _heldout_pixels(recipe, heldout)
    def keras_outputs_of(outputs):
        return in_batches(lambda batch: {k: np.asarray(v) for k, v in outputs(batch).items()}, pixels)

    # a mixed-precision model is converted as its float32 twin (same weights): the converters
    # lack 16-bit kernels or would bake the 16-bit rounding into a float32 file
    converted = float32_twin(model)
    outputs_fn = recipe._pixel_outputs(converted)
    keras_outputs = keras_outputs_of(outputs_fn)
    precision = {"trained_compute_dtypes": sorted(compute_dtypes(model)), "converted": "float32"}
    if converted is not model:
        trained = keras_outputs_of(recipe._pixel_outputs(model))
        precision.update(
            max_abs_diff_probabilities_vs_trained=float(np.abs(
                trained["probabilities"].astype(np.float64) - keras_outputs["probabilities"]).max()),
            decision_agreement_vs_trained=float(np.mean(trained["predictions"] == keras_outputs["predictions"])))
    keras_figures = recipe._portable_figures(keras_outputs, targets)
    calibration = None
    if quantization == "int8":
        calibration, _, _ = _heldout_pixels(recipe, representative if representative is not None else heldout, 64)
    blob = to_litert(outputs_fn, size, channels, quantization, calibration) if format == "litert" else \
        to_onnx(outputs_fn, size, channels)
    served = RUNTIMES[format](blob, pixels)
    diff = float(np.abs(served["probabilities"].astype(np.float64) - keras_outputs["probabilities"]).max())
    agreement = float(np.mean(served["predictions"] == keras_outputs["predictions"]))
    figures = recipe._portable_figures(served, targets)
    quantized = quantization is not None
    if not quantized and (diff > TOLERANCE or agreement < 1.0):
        raise PortableExportError(f"the {format} file disagrees with the Keras model on {len(pixels)} held-out images: "
                                  f"max|dprob| {diff:.3g} (tolerance {TOLERANCE}), decisions agree on {agreement:.1%}; "
                                  "nothing was exported")
    drop = {k: keras_figures[k] - figures[k] for k in keras_figures}
    worst = max(drop.values(), default=0.0)
    if quantized and worst > max_metric_drop:
        message = (f"{quantization} {format}: the held-out {max(drop, key=drop.get)} drops by {worst:.3f} "
                   f"(more than max_metric_drop={max_metric_drop})")
        if not allow_drop:
            raise PortableExportError(message + "; nothing was exported (allow_drop=True keeps it anyway)")
        print(f"warning: {message}")
    with staged_version(out_dir, model_name or recipe.backbone_name, version) as (staging, number):
        staging.mkdir(parents=True, exist_ok=True)
        (staging / FILE_NAMES[format]).write_bytes(blob)
        write_labels(staging, recipe.class_names)
        card = {**recipe.describe(), "model_name": model_name or recipe.backbone_name, "version": number,
                "format": format, "quantization": quantization or "none (float32)",
                "file": FILE_NAMES[format], "file_bytes": len(blob),
                "input": {"name": "pixels", "dtype": "float32", "shape": f"[N, {size}, {size}, {channels}]",
                          "range": "raw pixel values 0-255 (not normalised: the model normalises)",
                          "channels": "RGB" if channels == 3 else "one: the ITU-R 601-2 luma of RGB",
                          "resize": f"to {size}x{size}, bilinear and antialiased; the aspect ratio is not kept",
                          "reference": "restransfer.serving.portable.reference_pixels(path, "
                                       f"{size}, {channels}): NumPy + Pillow, to mirror in a client",
                          "reference_vs_restransfer_decoder": contract_gap},
                "outputs": recipe._portable_outputs_card(),
                "decision": {"description": recipe.decision_text()},
                "runtime": {"litert": "ai_edge_litert.interpreter.Interpreter",
                            "onnx": "onnxruntime.InferenceSession"}[format],
                "precision": precision,
                "parity": {"heldout_images": int(len(pixels)), "max_abs_diff_probabilities": diff,
                           "decision_agreement": agreement, "tolerance": None if quantized else TOLERANCE},
                "heldout_figures": {"keras": keras_figures, format: figures, "drop": drop}}
        write_card(staging, card)
    final = staging.parent / str(number)
    print(f"exported {final}/{FILE_NAMES[format]} ({len(blob) / 2**20:.1f} MB, {quantization or 'float32'}) in "
          f"{time.time() - started:.0f}s: max|dprob| {diff:.2e}, decisions agree {agreement:.1%}, held-out "
          + ", ".join(f"{k} {keras_figures[k]:.3f} -> {figures[k]:.3f}" for k in figures))
    return final


def _heldout_pixels(recipe, data, limit: int | None = None):
    """(pixels [N, S, S, C] through reference_pixels, the targets, and how far reference_pixels
    is from restransfer's own decoder + resize on these images)."""
    data = recipe._as_data(data, split="test") if not hasattr(data, "labels") else data
    indices = np.arange(len(data))[:limit]
    if data.paths is not None:
        pixels = np.stack([reference_pixels(data.paths[i], recipe.image_size, recipe.channels) for i in indices])
        ours = recipe._resized([recipe._load(data.paths[i]) for i in indices[:8]])
        gap = {"max_abs_pixel": float(np.abs(ours - pixels[:8]).max()),
               "mean_abs_pixel": float(np.abs(ours - pixels[:8]).mean()), "images": int(min(8, len(indices)))}
    else:
        pixels = recipe._resized(list(data.images[indices]))
        gap = "arrays: resized by restransfer itself"
    targets = recipe._portable_targets(data, indices)
    return pixels.astype(np.float32), targets, gap


__all__ = ["FORMATS", "PortableExportError", "export_portable", "reference_pixels", "run_litert", "run_onnx"]
