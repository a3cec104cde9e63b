"""The backbone registry as plain data (no TensorFlow import), so that the CLI and recipe
validation can name and check backbones instantly: specs, stage names, stage specs."""

from __future__ import annotations

import dataclasses

from restransfer.suggest import unknown_name


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    name: str
    block: str  # "basic" | "bottleneck" | "preact"
    depths: tuple[int, int, int, int]
    feature_dim: int
    keras_application: str | None  # keras.applications constructor name, if Keras has the net
    params: int  # feature extractor (no head) as built by default; checked by a test

    @property
    def has_keras_application(self) -> bool:
        return self.keras_application is not None

    @property
    def torchvision_importable(self) -> bool:
        return self.block != "preact"

    def default_preprocessing(self, layout: str) -> str:
        if layout == "torchvision":
            return "torch"
        return "tf" if self.block == "preact" else "caffe"


_SPECS = [
    BackboneSpec("resnet18", "basic", (2, 2, 2, 2), 512, None, 11_186_112),
    BackboneSpec("resnet34", "basic", (3, 4, 6, 3), 512, None, 21_301_696),
    BackboneSpec("resnet50", "bottleneck", (3, 4, 6, 3), 2048, "ResNet50", 23_587_712),
    BackboneSpec("resnet101", "bottleneck", (3, 4, 23, 3), 2048, "ResNet101", 42_658_176),
    BackboneSpec("resnet152", "bottleneck", (3, 8, 36, 3), 2048, "ResNet152", 58_370_944),
    BackboneSpec("resnet50v2", "preact", (3, 4, 6, 3), 2048, "ResNet50V2", 23_564_800),
    BackboneSpec("resnet101v2", "preact", (3, 4, 23, 3), 2048, "ResNet101V2", 42_626_560),
    BackboneSpec("resnet152v2", "preact", (3, 8, 36, 3), 2048, "ResNet152V2", 58_331_648),
]
BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in _SPECS}
STAGES = ("stem", "stage1", "stage2", "stage3", "stage4")

def list_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`, shallowest first."""
    return list(BACKBONES)


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name.lower()]
    except KeyError:
        raise ValueError(unknown_name("backbone", name, BACKBONES)
                         + f" (available: {', '.join(BACKBONES)})") from None


def parse_stages(spec: str) -> list[str]:
    """Which backbone stages a trainable-spec makes trainable.

    ``"head"`` or ``"none"`` -> none; ``"all"`` -> every stage; ``"stage4"`` -> that stage;
    ``"stage3+"`` -> stage3 and everything above it.
    """
    spec = spec.strip().lower()
    if spec in ("head", "none"):
        return []
    if spec == "all":
        return list(STAGES)
    upward = spec.endswith("+")
    name = spec.rstrip("+")
    if name not in STAGES:
        raise ValueError(
            f"Unknown stage spec {spec!r}: use 'head', 'all', one of {', '.join(STAGES)}, "
            f"or a stage followed by '+' (e.g. 'stage3+')"
        )
    index = STAGES.index(name)
    return list(STAGES[index:]) if upward else [name]
