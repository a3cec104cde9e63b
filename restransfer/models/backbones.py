"""ResNet backbones: one registry, one contract.

Every backbone is a functional ``keras.Model`` that takes raw 0-255 pixels, holds its
preprocessing as a layer, and names its layers the keras.applications way
(``conv1_*``/``pool1_*`` = stem, ``conv2_*`` .. ``conv5_*`` = stage1..stage4), which is what
:mod:`restransfer.models.stages` uses to freeze and unfreeze stages.

Two families of architecture are built:
  * keras.applications ResNet50/101/152 (v1, stride on the first 1x1 conv) and the v2
    variants, used for ``weights=None`` and ``weights="imagenet"``;
  * torchvision-layout ResNets (BasicBlock for 18/34; "v1.5" bottlenecks, stride on the 3x3
    conv, for 50/101/152), used for ResNet-18/34 always and for weights imported from
    torchvision ``.pth``/``.safetensors`` files, whose numbers only fit that layout.
"""

from __future__ import annotations

import contextlib
import os

import keras
from keras import layers

from restransfer.models import presets as presets_lib
from restransfer.models.batchnorm import FusedBatchNormalization
from restransfer.models.preprocessing import Preprocess
from restransfer.models.registry import BACKBONES, BackboneSpec, get_spec, list_backbones
from restransfer.models.stages import layers_by_name


def build_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    input_shape: tuple[int, int, int] = (224, 224, 3),
    pooling: str | None = "avg",
    preprocessing: str | None = None,
    layout: str | None = None,
    stem: str = "replicate",
) -> keras.Model:
    """Builds a ResNet feature extractor that takes raw 0-255 images.

    Args:
        name: one of :func:`list_backbones`.
        weights: ``None`` (random init), a preset name (``"imagenet"``: the best published
            weights for the depth; or ``"keras"``, ``"torchvision_v1"``, ``"torchvision_v2"``,
            ``"timm_a1"``; see :mod:`restransfer.models.presets`), or a path:
            ``.pth``/``.pt``/``.safetensors`` torchvision state dicts, or
            ``.weights.h5``/``.h5``/``.keras`` Keras files.
        input_shape: (height, width, channels); 1-channel inputs are replicated to RGB.
        pooling: ``"avg"``, ``"max"`` or ``None`` (feature map output).
        preprocessing: override the preprocessing the weights expect (see
            :mod:`restransfer.models.preprocessing`); normally the preset's own.
        layout: ``"keras"`` or ``"torchvision"``; chosen from the weights when omitted.
        stem: for 1-channel inputs: ``"replicate"`` the gray channel to RGB, or ``"sum"`` the
            pretrained first-conv kernels over RGB into one input channel (fastai's way;
            exactly equivalent on gray images, a third of the first conv's cost).
    """
    from restransfer.models import weights as weights_lib

    spec = get_spec(name)
    if stem not in ("replicate", "sum"):
        raise ValueError(f"stem must be 'replicate' or 'sum', got {stem!r}")
    if stem == "sum" and input_shape[-1] == 1:
        return _one_channel_stem(name, weights, input_shape, pooling, preprocessing, layout)
    if pooling not in ("avg", "max", None):
        raise ValueError(f"pooling must be 'avg', 'max' or None, got {pooling!r}")
    source = weights_lib.classify_weights(weights)
    preset = presets_lib.get_preset(spec.name, weights) if source == "preset" else None
    if layout is None:
        layout = (preset.layout if preset else
                  "torchvision" if source == "torchvision" or not spec.has_keras_application else "keras")
    if layout not in ("keras", "torchvision"):
        raise ValueError(f"layout must be 'keras' or 'torchvision', got {layout!r}")
    if layout == "torchvision" and not spec.torchvision_importable:
        raise ValueError(f"{spec.name} has no torchvision layout (torchvision has no ResNet v2)")
    if (source == "torchvision" or preset) and layout != (preset.layout if preset else "torchvision"):
        raise ValueError(f"{preset.id if preset else 'torchvision'} weights need layout="
                         f"'{preset.layout if preset else 'torchvision'}'")
    weights_file = weights
    if preset is not None and preset.layout == "torchvision":
        weights_file = weights_lib.preset_file(preset)  # before building: fail fast when offline

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    default = preset.preprocessing if preset else spec.default_preprocessing(layout)
    x = Preprocess(preprocessing or default, name="preprocess")(inputs)
    if layout == "keras":
        app = getattr(keras.applications, spec.keras_application)
        with weights_lib.explain_imagenet_failure(preset) if preset else contextlib.nullcontext():
            # Building on our tensor keeps preprocessing and network in one flat model;
            # keras.applications then runs its own download/cache/md5 logic for its weights.
            model = app(include_top=False, weights="imagenet" if preset else None, input_tensor=x,
                        pooling=pooling)
        model = keras.Model(inputs, model.output, name=spec.name)
    else:
        features = _torchvision_layout(x, spec)
        model = keras.Model(inputs, _pool(features, pooling), name=spec.name)

    if source == "torchvision" or (preset and preset.layout == "torchvision"):
        weights_lib.load_torchvision_weights(model, weights_file)
    elif source == "keras_file":
        weights_lib.load_keras_weights(model, weights)
    return model


def _pool(features, pooling):
    if pooling == "avg":
        return layers.GlobalAveragePooling2D(name="avg_pool")(features)
    if pooling == "max":
        return layers.GlobalMaxPooling2D(name="max_pool")(features)
    return features


def _one_channel_stem(name, weights, input_shape, pooling, preprocessing, layout) -> keras.Model:
    """A 1-channel network whose first conv holds the RGB weights' kernels summed over RGB."""
    rgb = build_backbone(name, weights, tuple(input_shape[:2]) + (3,), pooling, preprocessing, layout)
    mode = rgb.get_layer("preprocess").mode
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = Preprocess(mode, keep_channels=True, name="preprocess")(inputs)
    layout = "keras" if rgb.get_layer("conv1_conv").use_bias else "torchvision"
    spec = get_spec(name)
    if layout == "keras":
        app = getattr(keras.applications, spec.keras_application)
        model = keras.Model(inputs, app(include_top=False, weights=None, input_tensor=x, pooling=pooling).output,
                            name=spec.name)
    else:
        features = _torchvision_layout(x, spec)
        model = keras.Model(inputs, _pool(features, pooling), name=spec.name)
    _load_rgb_weights_summed(model, rgb)
    return model


def _load_rgb_weights_summed(one_channel, rgb) -> None:
    """Copies every weight from an RGB backbone into a 1-channel one of the same network,
    summing the first conv's kernels over the RGB axis."""
    source = layers_by_name(rgb)
    for layer in one_channel.layers:
        if not layer.weights:
            continue
        weights = source[layer.name].get_weights()
        if layer.name == "conv1_conv":
            weights = [weights[0].sum(axis=2, keepdims=True), *weights[1:]]
        layer.set_weights(weights)


# --- torchvision-layout network, named the keras.applications way ------------------------

_BN_EPSILON = 1e-5  # torchvision's BatchNorm2d default


def _conv(x, filters, kernel, stride, name, padding):
    # At stride 1 Keras' "same" pads (kernel - 1) / 2 on each side, as torchvision does, inside
    # the convolution (a separate pad would copy the activation forward and slice its gradient
    # backward). At stride 2 "same" pads asymmetrically while torchvision pads both sides: only
    # an explicit symmetric pad matches imported weights exactly.
    if padding and stride != 1:
        x = layers.ZeroPadding2D(padding, name=f"{name}_pad")(x)
    inside = "same" if padding and stride == 1 else "valid"
    return layers.Conv2D(filters, kernel, strides=stride, padding=inside, use_bias=False, name=f"{name}_conv")(x)


def _bn(x, name):
    return FusedBatchNormalization(epsilon=_BN_EPSILON, momentum=0.9, name=f"{name}_bn")(x)


def _basic_block(x, filters, stride, name):
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _bn(_conv(x, filters, 1, stride, f"{name}_0", 0), f"{name}_0")
    y = _conv(x, filters, 3, stride, f"{name}_1", 1)
    y = layers.ReLU(name=f"{name}_1_relu")(_bn(y, f"{name}_1"))
    y = _bn(_conv(y, filters, 3, 1, f"{name}_2", 1), f"{name}_2")
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.ReLU(name=f"{name}_out")(y)


def _bottleneck_block(x, filters, stride, name):
    shortcut = x
    if stride != 1 or x.shape[-1] != 4 * filters:
        shortcut = _bn(_conv(x, 4 * filters, 1, stride, f"{name}_0", 0), f"{name}_0")
    y = layers.ReLU(name=f"{name}_1_relu")(_bn(_conv(x, filters, 1, 1, f"{name}_1", 0), f"{name}_1"))
    y = _conv(y, filters, 3, stride, f"{name}_2", 1)  # v1.5: the stride sits on the 3x3
    y = layers.ReLU(name=f"{name}_2_relu")(_bn(y, f"{name}_2"))
    y = _bn(_conv(y, 4 * filters, 1, 1, f"{name}_3", 0), f"{name}_3")
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.ReLU(name=f"{name}_out")(y)


def _torchvision_layout(x, spec: BackboneSpec):
    x = _conv(x, 64, 7, 2, "conv1", 3)
    x = layers.ReLU(name="conv1_relu")(_bn(x, "conv1"))
    # Zero padding equals torchvision's -inf padding here because inputs are post-ReLU.
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    block = _basic_block if spec.block == "basic" else _bottleneck_block
    for stage, (depth, filters) in enumerate(zip(spec.depths, (64, 128, 256, 512))):
        for index in range(depth):
            stride = 2 if index == 0 and stage > 0 else 1
            x = block(x, filters, stride, f"conv{stage + 2}_block{index + 1}")
    return x


__all__ = ["BACKBONES", "BackboneSpec", "build_backbone", "get_spec",
           "list_backbones"]
