"""The tasks a recipe file can name, as plain data (no TensorFlow): which recipe class runs
each, which section of the recipe file holds its own options, and the defaults that are the
task's to choose. The recipe classes and the recipe-file schema both read their defaults
here, so each is decided once."""

from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    recipe: str                 # "module:Class" of the recipe that runs it
    augmentation: str           # the default augmentation preset
    section: str | None = None  # the recipe file's section of options only this task reads
    fixed: tuple = ()           # (argument, value) pairs the task name implies
    # the presets' discriminative rate factor (stage4 at lr * lr_mult, the stem at lr * lr_mult**5).
    # Segmentation: one rate for every stage, +0.054 per-image Dice over 0.4 on a held-out part of
    # Kvasir-SEG's train, 2 seeds (bench/RESULTS.md); mask boundaries need the early stages to move.
    lr_mult: float = 0.4
    # what the recipe file's checks need to know of the task, so that they name no task:
    targets: str = "class labels"  # beside the images: "class labels" (class folders, a CSV's labels) or "masks"
    min_classes: int = 2           # classes the data must have (multi-label: any number of tags)
    has_head: bool = True          # the recipe file's `head:` applies (a U-Net's decoder has its own section)
    cross_validation: bool = True  # data.cv_folds applies (its folds are stratified by one label per image)
    positive_class: bool = False   # a binary task names its positive class in its section

    def recipe_class(self):
        module, _, name = self.recipe.partition(":")
        return getattr(importlib.import_module(module), name)


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("classification", "restransfer.tasks.classification:ClassificationRecipe", "light"),
    TaskSpec("multilabel", "restransfer.tasks.classification:ClassificationRecipe", "light",
             fixed=(("multi_label", True),), min_classes=0, cross_validation=False),
    TaskSpec("medical", "restransfer.tasks.medical:MedicalImagingRecipe", "medical", section="medical",
             positive_class=True),
    TaskSpec("segmentation", "restransfer.tasks.segmentation:SegmentationRecipe", "segmentation",
             section="segmentation", lr_mult=1.0, targets="masks", has_head=False),
)}


def default_augmentation(task: str) -> str:
    return TASKS[task].augmentation


def default_lr_mult(task: str) -> float:
    return TASKS[task].lr_mult
