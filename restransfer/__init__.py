"""restransfer: transfer learning with ResNets on Keras 3 / TensorFlow.

Packages, lowest layer first (each imports only from those before it):
``data`` (files -> pixels -> batches), ``models`` (backbones, weights, stages, heads),
``training`` (phases, optimizers, the loop, checkpoints, distribution), ``evaluation``
(metrics, report, Grad-CAM), ``serving`` (SavedModel export), ``tasks`` (the recipes), and
``cli`` (the command, recipe files, run directories).

Heavy modules (TensorFlow, Keras) load on first use of an attribute, so that
``restransfer --help`` and recipe validation stay fast.
"""

from __future__ import annotations

import importlib
import os

# TensorFlow turns its oneDNN CPU kernels on by itself only on some x86 CPUs (not on AMD EPYC,
# for one); with them a ResNet-18 training step ran ~3.8x faster on one such core
# (bench/cpu_training.py). TensorFlow reads this once, when it is imported, so it takes effect
# only where restransfer is imported first; TF_ENABLE_ONEDNN_OPTS=0 in the environment wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"

_LAZY = {
    "list_backbones": "restransfer.models.registry",
    "describe_backbones": "restransfer.models.presets",
    "build_backbone": "restransfer.models.backbones",
    "freeze": "restransfer.models.stages",
    "unfreeze": "restransfer.models.stages",
    "stage_layers": "restransfer.models.stages",
    "STAGES": "restransfer.models.registry",
    "Phase": "restransfer.training.phases",
    "preset": "restransfer.training.phases",
    "find_lr": "restransfer.training.lr_finder",
    "ClassificationRecipe": "restransfer.tasks.classification",
    "MedicalImagingRecipe": "restransfer.tasks.medical",
    "SegmentationRecipe": "restransfer.tasks.segmentation",
    "load": "restransfer.tasks.base",
    "export_saved_model": "restransfer.serving.export",
    "load_recipe": "restransfer.cli.config",
}
_SUBMODULES = ("data", "models", "training", "tasks", "evaluation", "serving", "cli", "devices")
__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"restransfer.{name}")
    raise AttributeError(f"module 'restransfer' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
