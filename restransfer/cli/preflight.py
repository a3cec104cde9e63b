"""Every check of a recipe that needs no TensorFlow and no training, run by ``restransfer
validate`` and by ``restransfer train`` before TensorFlow loads and before anything is
written: the run directory, the classes the data has (a folder's class folders, a CSV's
labels), a binary medical task's positive class, a medical normalisation that would act on
nothing, and whether pretrained weights can be had (cached, or their host reachable). What
only decoding can tell (each image, each mask) is checked by ``train`` before its first epoch;
:data:`NOT_CHECKED` says so."""

from __future__ import annotations

import csv
from pathlib import Path

from restransfer.cli.config import RecipeConfig
from restransfer.tasks.registry import TASKS

NOT_CHECKED = ("not checked without TensorFlow: that each image (and mask) decodes and fits; "
               "`restransfer train` checks them before its first epoch, before training anything")


def _class_folders(source: Path) -> tuple[Path, list[str]]:
    from restransfer.data.splits import find_split_dir

    root = find_split_dir(source, "train") or source
    return root, sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _csv_classes(path: Path, config: RecipeConfig) -> list[str] | None:
    options = config.data.csv
    if options.label_columns:
        return list(options.label_columns)
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if options.label_column not in (reader.fieldnames or []):
            return None  # the reader names the missing column when the data is read
        labels = {row[options.label_column].strip() for row in reader}
    if options.separator:
        labels = {t.strip() for value in labels for t in value.split(options.separator) if t.strip()}
    return sorted(labels)


def _mask_layout_problems(path: Path) -> list[str]:
    from restransfer.data.masks import IMAGE_DIRS, MASK_DIRS
    from restransfer.data.splits import find_split_dir

    if not path.is_dir():
        return []
    root = find_split_dir(path, "train") or path
    names = {d.name for d in root.iterdir() if d.is_dir()}
    if not (names & set(IMAGE_DIRS) and names & set(MASK_DIRS)):
        return [f"data.source: {root} needs images/ and masks/ sub-folders for masks beside the images "
                f"(images/<id>.jpg + masks/<id>.png); it has {sorted(names)}"]
    return []


def data_problems(config: RecipeConfig) -> list[str]:
    """What the data's layout and classes already say is wrong for the task (what the task
    needs of its data: its entry in :mod:`restransfer.tasks.registry`)."""
    task = TASKS[config.task]
    source = config.data.source
    if ":" in source and source.split(":", 1)[0] in ("tfds", "sklearn"):
        return []
    path = Path(source)
    if task.targets == "masks":
        return _mask_layout_problems(path)
    if path.is_dir():
        root, classes = _class_folders(path)
        where = f"{root}"
    elif path.suffix.lower() == ".csv" and path.is_file():
        classes, where = _csv_classes(path, config), f"{path}'s labels"
        if classes is None:
            return []
    else:
        return []
    if len(classes) < task.min_classes:
        found = f"one class ({classes[0]!r})" if classes else "no class folders"
        return [f"data.source: {where} has {found}: a classifier needs at least {task.min_classes} "
                f"(expected {root if path.is_dir() else path}/<class>/<image>)"]
    problems = []
    if task.positive_class and len(classes) == 2:
        section = task.section
        positive = getattr(config, section).positive_class
        if positive is None:
            problems.append(f"{section}.positive_class: a binary {config.task} task needs its positive class, one of "
                            f"{classes} (the class whose detection sensitivity measures)")
        elif positive not in classes:
            problems.append(f"{section}.positive_class: {positive!r} is not one of the classes {classes} ({where})")
    return problems


def weights_problems(config: RecipeConfig, check_network: bool = True) -> list[str]:
    from restransfer.models.presets import get_preset, is_preset_name

    if not check_network or not is_preset_name(config.backbone.weights):
        return []
    from restransfer.models.download import unavailable

    reason = unavailable(get_preset(config.backbone.name, config.backbone.weights))
    return [f"backbone.weights: {reason}"] if reason else []


def run_directory_problems(config: RecipeConfig, overwrite: bool, resume: bool) -> list[str]:
    from restransfer.cli.runs import run_directory, run_directory_refusal

    refusal = run_directory_refusal(run_directory(config), overwrite, resume)
    return [refusal] if refusal else []


def preflight(config: RecipeConfig, overwrite: bool = False, resume: bool = False,
              check_network: bool = True) -> list[str]:
    """Every problem the checks above find (an empty list: the recipe may start)."""
    return (run_directory_problems(config, overwrite, resume) + data_problems(config)
            + weights_problems(config, check_network))
