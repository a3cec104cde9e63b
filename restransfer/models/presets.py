"""Pretrained weights as data: which file a weights name means (no TensorFlow import).

Each :class:`WeightsPreset` ties one published weight file to everything needed to use it
exactly as it was trained: where it comes from (a URL, or a Hugging Face hub repository and
file), how to verify it (SHA-256, or the MD5 Keras checks for its own files), the network
layout its numbers fit, the input normalisation it was trained with, the resolution and
resize it was evaluated at, its licence and its published ImageNet top-1 with the source.

``weights="imagenet"`` means the preset with the best published top-1 for that depth;
``weights="<name>"`` selects another (``keras``, ``torchvision_v1``, ``torchvision_v2``,
``timm_a1``). Users can add their own with :func:`register`.
"""

from __future__ import annotations

import dataclasses

from restransfer.models.registry import BACKBONES, get_spec
from restransfer.suggest import unknown_name

IMAGENET = "imagenet"


@dataclasses.dataclass(frozen=True)
class WeightsPreset:
    backbone: str
    name: str
    layout: str                  # "keras" | "torchvision": which architecture the numbers fit
    preprocessing: str           # the Preprocess layer's mode: "caffe" | "tf" | "torch"
    file_name: str
    url: str | None = None       # a direct download ...
    hub_repo: str | None = None  # ... or a Hugging Face hub repository holding ``file_name``
    hub_revision: str | None = None
    # Full SHA-256, or the prefix a publisher puts in the file name (torchvision: 8 hex
    # digits, the same check torch.hub makes). Keras' own files carry an MD5 instead.
    sha256: str = ""
    md5: str = ""
    top1: float | None = None    # published ImageNet-1k top-1, %
    top1_source: str = ""
    eval_resolution: int = 224
    interpolation: str = "bilinear"
    license: str = ""

    @property
    def id(self) -> str:
        return f"{self.backbone}.{self.name}"

    @property
    def source(self) -> str:
        return self.url or f"hf://{self.hub_repo}/{self.file_name}"

    def describe(self) -> dict:
        return {**dataclasses.asdict(self), "id": self.id, "source": self.source}


_KERAS_RESNET = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
_KERAS_TOP1 = "keras.io/api/applications (ImageNet validation, 224 px)"
_TORCHVISION = "https://download.pytorch.org/models/"
_TORCHVISION_TOP1 = "torchvision ResNet*_Weights meta (ImageNet-1K acc@1)"
_TORCHVISION_LICENSE = "BSD-3-Clause (torchvision); ImageNet terms of use apply"


def _keras(backbone, md5, top1):
    v2 = backbone.endswith("v2")
    return WeightsPreset(
        backbone, "keras", "keras", "tf" if v2 else "caffe",
        f"{backbone}_weights_tf_dim_ordering_tf_kernels_notop.h5",
        url=f"{_KERAS_RESNET}{backbone}_weights_tf_dim_ordering_tf_kernels_notop.h5", md5=md5,
        top1=top1, top1_source=_KERAS_TOP1,
        license="Apache-2.0 (Keras)" if v2 else "MIT (converted from K. He's Caffe models)")


def _torchvision(backbone, version, file_name, top1, resize=None):
    return WeightsPreset(
        backbone, f"torchvision_v{version}", "torchvision", "torch", file_name,
        url=_TORCHVISION + file_name, sha256=file_name.rsplit("-", 1)[1].split(".")[0],
        top1=top1, top1_source=_TORCHVISION_TOP1 + (f", resize {resize} then crop 224" if resize else ""),
        license=_TORCHVISION_LICENSE)


_PRESETS: dict[str, dict[str, WeightsPreset]] = {name: {} for name in BACKBONES}


def register(preset: WeightsPreset) -> WeightsPreset:
    """Adds (or replaces) a preset; its backbone must be in the registry."""
    get_spec(preset.backbone)
    if preset.name == IMAGENET:
        raise ValueError(f"'{IMAGENET}' names the best preset of a depth; choose another name")
    if not (preset.url or preset.hub_repo):
        raise ValueError(f"preset {preset.id} needs a url or a hub_repo")
    _PRESETS[preset.backbone][preset.name] = preset
    return preset


for _preset in (
    _torchvision("resnet18", 1, "resnet18-f37072fd.pth", 69.758),
    _torchvision("resnet34", 1, "resnet34-b627a593.pth", 73.314),
    _torchvision("resnet50", 1, "resnet50-0676ba61.pth", 76.130),
    _torchvision("resnet50", 2, "resnet50-11ad3fa6.pth", 80.858, resize=232),
    _torchvision("resnet101", 1, "resnet101-63fe2227.pth", 77.374),
    _torchvision("resnet101", 2, "resnet101-cd907fc2.pth", 81.886, resize=232),
    _torchvision("resnet152", 1, "resnet152-394f9c45.pth", 78.312),
    _torchvision("resnet152", 2, "resnet152-f82ba261.pth", 82.284, resize=232),
    _keras("resnet50", "4d473c1dd8becc155b73f8504c6f6626", 74.9),
    _keras("resnet101", "88cf7a10940856eca736dc7b7e228a21", 76.4),
    _keras("resnet152", "ee4c566cf9a93f14d82f913c2dc6dd0c", 76.6),
    _keras("resnet50v2", "fac2f116257151a9d068a22e544a4917", 76.0),
    _keras("resnet101v2", "c0ed64b8031c3730f411d2eb4eea35b5", 77.2),
    _keras("resnet152v2", "ed17cf2e0169df9d443503ef94b23b33", 78.0),
    # timm's "ResNet strikes back" A1 recipe; same architecture and key names as torchvision
    WeightsPreset("resnet50", "timm_a1", "torchvision", "torch", "model.safetensors",
                  hub_repo="timm/resnet50.a1_in1k", hub_revision="73aa6788a8e5470e708bb3408c7f6eed24ceeb35",
                  top1=81.22, top1_source="timm model card, huggingface.co/timm/resnet50.a1_in1k (288 px test size)",
                  eval_resolution=288, interpolation="bicubic", license="Apache-2.0"),
):
    register(_preset)


def presets_for(backbone: str) -> dict[str, WeightsPreset]:
    return dict(_PRESETS[get_spec(backbone).name])


def all_presets() -> list[WeightsPreset]:
    return [preset for by_name in _PRESETS.values() for preset in by_name.values()]


def best_preset(backbone: str) -> WeightsPreset:
    """What ``weights="imagenet"`` means: the highest published top-1 for this depth."""
    candidates = presets_for(backbone)
    if not candidates:
        raise ValueError(f"{backbone} has no pretrained weights presets")
    return max(candidates.values(), key=lambda p: p.top1 or 0.0)


def is_preset_name(weights) -> bool:
    """Whether a ``weights`` value is a preset name (of any backbone) rather than a path."""
    return isinstance(weights, str) and (weights == IMAGENET or any(
        weights in by_name for by_name in _PRESETS.values()))


def get_preset(backbone: str, name: str = IMAGENET) -> WeightsPreset:
    """``name`` for ``backbone``: ``"imagenet"`` (the best), or one of its preset names."""
    if name == IMAGENET:
        return best_preset(backbone)
    candidates = presets_for(backbone)
    if name not in candidates:
        raise ValueError(unknown_name(f"weights preset for {get_spec(backbone).name}", name,
                                      [IMAGENET, *candidates]))
    return candidates[name]


def find_preset(identifier: str) -> WeightsPreset:
    """``resnet50`` (its best), ``resnet50.imagenet`` or ``resnet50.torchvision_v2``."""
    backbone, _, name = identifier.partition(".")
    return get_preset(backbone, name or IMAGENET)


def describe_backbones() -> list[dict]:
    """One row per backbone for tables: name, block, depths, width, and its weights presets
    (``imagenet`` names the best; ``cached`` says whether it loads offline)."""
    from restransfer.models.download import cached_path
    from restransfer.models.registry import _SPECS

    rows = []
    for spec in _SPECS:
        presets = presets_for(spec.name)
        rows.append({
            "name": spec.name,
            "block": spec.block,
            "blocks_per_stage": "-".join(map(str, spec.depths)),
            "feature_dim": spec.feature_dim,
            "params": spec.params,
            "imagenet": best_preset(spec.name).name if presets else None,
            "presets": [{**p.describe(), "cached": cached_path(p).is_file()} for p in presets.values()],
            "torchvision_import": spec.torchvision_importable,
        })
    return rows
