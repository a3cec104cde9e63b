"""Named stages and freezing.

Layers are assigned to stages by their keras.applications-style names, so the same rules
serve every backbone in the registry. Freezing sets ``trainable=False`` layer by layer;
Keras 3 runs a non-trainable BatchNormalization in inference mode (moving statistics are
used and never updated), which is exactly the behaviour fine-tuning needs
(keras-team/keras#9214). ``train_bn=True`` keeps BatchNorm layers trainable in frozen
stages instead (fastai's default).
"""

from __future__ import annotations

import re

import keras

from restransfer.models.registry import STAGES, parse_stages

_STAGE_OF_PREFIX = {"conv1": "stem", "pool1": "stem", "conv2": "stage1", "conv3": "stage2",
                    "conv4": "stage3", "conv5": "stage4", "post": "stage4"}
_PREFIX = re.compile(r"^(conv\d|pool\d|post)_")


def stage_of(layer_name: str) -> str | None:
    """The stage a backbone layer belongs to, or None (input, preprocessing, pooling)."""
    match = _PREFIX.match(layer_name)
    return _STAGE_OF_PREFIX.get(match.group(1)) if match else None


def iter_layers(model: keras.Model):
    """Every layer of a model, nested models' layers included, in network order: the one
    walk over a model's layers (public Keras API only)."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer)


def layers_by_name(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """Layers that hold weights, by name, nested models flattened (weight transfer by name)."""
    return {layer.name: layer for layer in iter_layers(model)
            if layer.weights and not isinstance(layer, keras.Model)}


def find_backbone(model: keras.Model) -> keras.Model:
    """The backbone inside a task model (or the model itself if it is a backbone)."""
    if any(stage_of(layer.name) for layer in model.layers):
        return model
    for layer in model.layers:
        if isinstance(layer, keras.Model) and any(stage_of(sub.name) for sub in layer.layers):
            return layer
    raise ValueError(f"{model.name} holds no ResNet backbone with named stages")


def stage_layers(model: keras.Model) -> dict[str, list[keras.layers.Layer]]:
    """Maps each stage name to its layers, in network order."""
    stages = {name: [] for name in STAGES}
    for layer in find_backbone(model).layers:
        stage = stage_of(layer.name)
        if stage:
            stages[stage].append(layer)
    return stages


def set_trainable_stages(model: keras.Model, trainable: list[str], train_bn: bool = False) -> None:
    """Makes exactly the given stages trainable; the rest are frozen (BN in inference mode)."""
    backbone = find_backbone(model)
    backbone.trainable = True  # per-layer flags below decide; a frozen parent would override
    for stage, stage_members in stage_layers(backbone).items():
        for layer in stage_members:
            is_bn = isinstance(layer, keras.layers.BatchNormalization)
            layer.trainable = stage in trainable or (train_bn and is_bn)


def freeze(model: keras.Model, up_to: str = "stage4", train_bn: bool = False) -> None:
    """Freezes the stem and every stage up to and including ``up_to``."""
    if up_to == "all":
        up_to = "stage4"
    if up_to not in STAGES:
        raise ValueError(f"freeze(up_to=...) takes one of {STAGES} or 'all', got {up_to!r}")
    trainable = list(STAGES[STAGES.index(up_to) + 1:])
    set_trainable_stages(model, trainable, train_bn=train_bn)


def unfreeze(model: keras.Model, stages: str = "all", train_bn: bool = False) -> None:
    """Makes ``stages`` (a spec such as ``"stage4"``, ``"stage3+"``, ``"all"``) trainable,
    keeping whatever else is already trainable."""
    wanted = set(parse_stages(stages)) | set(trainable_stages(model))
    set_trainable_stages(model, [s for s in STAGES if s in wanted], train_bn=train_bn)


def trainable_stages(model: keras.Model) -> list[str]:
    """Stages whose convolution weights are currently trainable."""
    result = []
    for stage, members in stage_layers(model).items():
        convs = [layer for layer in members if isinstance(layer, keras.layers.Conv2D)]
        if convs and all(layer.trainable for layer in convs):
            result.append(stage)
    return result
