"""restransfer: transfer learning with ResNets on Keras 3 / TensorFlow.

Heavy modules (TensorFlow, Keras) load on first use of an attribute, so that
``restransfer --help`` and recipe validation stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "list_backbones": "restransfer.registry",
    "build_backbone": "restransfer.backbones",
    "describe_backbones": "restransfer.registry",
    "ClassificationRecipe": "restransfer.recipes",
    "MedicalImagingRecipe": "restransfer.medical_recipe",
    "Phase": "restransfer.phases",
    "preset": "restransfer.phases",
    "freeze": "restransfer.stages",
    "unfreeze": "restransfer.stages",
    "stage_layers": "restransfer.stages",
    "STAGES": "restransfer.stages",
    "export_saved_model": "restransfer.export",
    "load_recipe": "restransfer.config",
    "find_lr": "restransfer.lr_finder",
}
_SUBMODULES = ("registry", "data", "augmentation", "backbones", "weights", "stages", "heads", "training", "phases",
               "recipes", "export", "preprocessing", "config", "runs", "caching", "lr_finder", "report",
               "cli", "medical", "medical_recipe", "metrics", "gradcam")

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"restransfer.{name}")
    raise AttributeError(f"module 'restransfer' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
