"""The numeric precision a built model computes in, and its float32 twin.

A model trained under a mixed policy (``mixed_float16`` on a GPU, ``mixed_bfloat16``) keeps
float32 weights but computes in 16 bits. LiteRT's and ONNX's converters take the graph as it
computes: 16-bit ops they do not have, or float32 files that differ from it by the 16-bit
rounding. :func:`float32_twin` is the same architecture and weights computing in float32,
which is what a portable file is made from.
"""

from __future__ import annotations

import keras

from restransfer.models.stages import iter_layers


def compute_dtypes(model: keras.Model) -> set[str]:
    """The compute dtypes of a model's layers that hold weights (``{"float32"}`` for a float32 model)."""
    return {layer.compute_dtype for layer in iter_layers(model)
            if layer.weights and not isinstance(layer, keras.Model)}


def _as_float32(config):
    """``config`` (a serialized Keras object) with every dtype policy replaced by float32."""
    if isinstance(config, dict):
        if str(config.get("class_name", "")).endswith("DTypePolicy") and isinstance(config.get("config"), dict):
            return {**config, "config": {**config["config"], "name": "float32"}}
        return {key: ("float32" if key == "dtype" and isinstance(value, str) and value.startswith("mixed_")
                      else _as_float32(value)) for key, value in config.items()}
    if isinstance(config, list):
        return [_as_float32(value) for value in config]
    return config


def float32_twin(model: keras.Model) -> keras.Model:
    """``model`` itself when it computes in float32; else the same architecture, rebuilt with
    every layer's policy float32, holding the same weights."""
    if compute_dtypes(model) <= {"float32"}:
        return model
    config = _as_float32(keras.saving.serialize_keras_object(model))
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        twin = keras.saving.deserialize_keras_object(config)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    twin.set_weights(model.get_weights())
    if compute_dtypes(twin) != {"float32"}:
        raise RuntimeError(f"the float32 twin still computes in {sorted(compute_dtypes(twin))}")
    return twin


__all__ = ["compute_dtypes", "float32_twin"]
