"""Recipe files: one YAML schema for every recipe, validated before anything heavy starts.

* A field that configures the recipe has the name of the recipe's constructor argument (or
  names it in ``recipe_arg``); :func:`restransfer.cli.runs.recipe_arguments` derives the
  mapping from that, so a new field needs no hand-written copy.

* Read with ``yaml.safe_load`` semantics only (no tags, no code).
* ``extends: base.yaml`` merges a parent recipe (mappings merge, lists are replaced).
* ``--set fine_tune[0].epochs=2`` overrides any field from the command line.
* Validation by pydantic; every error names file, line and field path, all at once:
  ``recipes/x.yaml:14: fine_tune[1].lr: must be > 0, got -0.001``.
* Relative paths in a recipe are relative to the file that holds them.

No TensorFlow here: ``restransfer validate`` answers at once.
"""

from __future__ import annotations

import copy
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from restransfer.models.registry import get_spec
from restransfer.paths import check_component
from restransfer.suggest import unknown_name
from restransfer.tasks.registry import TASKS
from restransfer.training.phases import PRESETS, Phase


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackboneConfig(Strict):
    name: str = Field("resnet50", json_schema_extra={"recipe_arg": "backbone"})
    weights: str | None = Field("imagenet", description="a preset ('imagenet', 'keras', 'torchvision_v2', ...), "
                                                        "null, or a weights file")

    @field_validator("name")
    @classmethod
    def _known(cls, value):
        get_spec(value)  # "Unknown backbone 'resnet05'. Did you mean 'resnet50'?"
        return value.lower()

    @model_validator(mode="after")
    def _known_preset(self):
        from restransfer.models.presets import get_preset, is_preset_name

        if is_preset_name(self.weights):
            get_preset(self.name, self.weights)  # a preset another depth has: did you mean
        return self


class InputConfig(Strict):
    image_size: int = Field(224, ge=32, le=1024)
    channels: Literal[1, 3] = 3
    stem: Literal["replicate", "sum"] = Field(
        "replicate", description="1 channel: gray replicated to RGB, or the pretrained first conv summed over RGB")
    keep_precision: Literal["auto", True, False] = Field(
        "auto", description="16-bit files at full precision (auto: when the training files have any)")


class CsvConfig(Strict):
    path_column: str = "path"
    label_column: str | None = "label"
    label_columns: list[str] | None = None
    separator: str | None = None
    group_column: str | None = None
    image_column: str = Field("image", description="segmentation: the column of image paths")
    mask_column: str = Field("mask", description="segmentation: the column of mask paths")


class DataConfig(Strict):
    source: str = Field(..., description="image folder, .csv, .npz, 'tfds:NAME[:SPLIT]' or 'sklearn:digits'")
    validation: str | None = None
    test: str | None = None
    val_fraction: float = Field(0.2, ge=0, lt=1)
    cv_folds: int | None = Field(None, ge=2, le=20)
    batch_size: int = Field(32, ge=1, le=4096)
    augmentation: str | list[dict[str, Any]] | None = Field(
        None, description="a preset or a list of albumentations transforms; null: the task's default")
    bad_images: Literal["skip", "strict"] = "skip"
    download: bool = Field(True, json_schema_extra={"recipe_arg": "download_data"},
                           description="download TFDS datasets that are not prepared yet")
    csv: CsvConfig = CsvConfig()

    @field_validator("augmentation")
    @classmethod
    def _known_augmentation(cls, value):
        from restransfer.data.augmentation import PRESET_NAMES

        if isinstance(value, str) and value not in PRESET_NAMES:
            raise ValueError(unknown_name("augmentation preset", value, PRESET_NAMES))
        if isinstance(value, list):
            for index, item in enumerate(value):
                if not isinstance(item.get("name"), str):
                    raise ValueError(f"[{index}]: each transform needs a 'name'")
        return value


class HeadConfig(Strict):
    dropout: float = Field(0.2, ge=0, lt=1, json_schema_extra={"recipe_arg": "head_dropout"})
    hidden_units: int | None = Field(None, ge=1, le=65536, json_schema_extra={"recipe_arg": "head_hidden_units"})


class TrainingConfig(Strict):
    early_stopping_patience: int | None = Field(3, ge=1)
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = "auto"
    deterministic: bool = Field(False, description="TF op determinism: identical weights run to run")
    cache_features: Literal["auto", True, False] = "auto"
    cache_views: int = Field(1, ge=1, le=100)
    distribute: Literal["auto", "none", "mirrored", "multi_worker"] = Field(
        "auto", description="auto: all GPUs of this machine when it has several; multi_worker: TF_CONFIG or SLURM")
    lr_scaling: Literal["linear", "none"] = Field(
        "linear", description="linear: learning rates x replicas (batch_size is per replica)")
    sync_batchnorm: bool = Field(False, description="BatchNorm statistics over the global batch")


class MedicalConfig(Strict):
    """Used when ``task: medical``."""

    class_weight: Literal["balanced"] | None = "balanced"
    focal_gamma: float | None = Field(None, gt=0, le=10)
    window: str | tuple[float, float] = Field("file", description="'file', a preset, or [centre, width]")
    normalize: Literal["auto", "percentile", "minmax", "zscore"] = Field(
        "auto", description="how DICOM (without a window), NIfTI and 16-bit PNG/TIFF intensities map to 0-255; "
                            "auto: percentile; 8-bit files are used as stored")
    threshold_method: Literal["youden", "sensitivity"] = "youden"
    target_sensitivity: float = Field(0.9, gt=0, le=1)
    positive_class: str | None = None
    tta: bool = False
    temperature_scaling: bool = False
    gradcam_images: int = Field(6, ge=0, le=100)
    threshold_val_fraction: float = Field(0.15, gt=0, lt=1, description="cross-validation: share of each fold's training part held out to choose the threshold")

    @field_validator("window")
    @classmethod
    def _known_window(cls, value):
        from restransfer.data.medical import WINDOW_PRESETS

        if isinstance(value, str) and value != "file" and value not in WINDOW_PRESETS:
            raise ValueError(unknown_name("window preset", value, ["file", *WINDOW_PRESETS]))
        if isinstance(value, tuple) and not value[1] > 0:
            raise ValueError(f"window width must be > 0, got {value[1]}")
        return value


class SegmentationConfig(Strict):
    """Used when ``task: segmentation``."""

    classes: list[str] | None = Field(None, min_length=2, json_schema_extra={"recipe_arg": "class_names"},
                                      description="class names by mask value (0 first); default: from the masks")
    decoder_widths: list[int] = Field([256, 128, 64, 32, 16], min_length=5, max_length=5)
    ignore_index: int | None = Field(None, ge=0, le=255, description="mask value of pixels without truth")
    mask_values: dict[int, int] | None = Field(None, description="stored mask value -> class id, e.g. {0: 0, 255: 1}")
    class_weights: list[float] | None = None
    loss: Literal["ce+dice", "ce", "dice"] = "ce+dice"
    threshold: float | Literal["tune"] = Field(0.5, description="binary: the foreground threshold, or tune it on validation")

    @field_validator("decoder_widths")
    @classmethod
    def _positive(cls, value):
        if min(value) < 1:
            raise ValueError(f"every width must be >= 1, got {value}")
        return value

    @field_validator("threshold")
    @classmethod
    def _in_range(cls, value):
        if value != "tune" and not 0 < value < 1:
            raise ValueError(f"must be in (0, 1) or 'tune', got {value}")
        return value


class ExportConfig(Strict):
    enabled: bool = True
    model_name: str | None = Field(None, description="the export's folder name (TF Serving --model_name)")

    @field_validator("model_name")
    @classmethod
    def _plain_name(cls, value):
        return value if value is None else check_component(value, "export model name")
    top_k: int = Field(5, ge=1)


class RecipeConfig(Strict):
    """The whole recipe. ``fine_tune`` is a list of phases or a preset name."""

    name: str | None = Field(None, description="the run directory's name inside output_dir")
    task: Literal[tuple(TASKS)] = Field("classification", description="a task of restransfer.tasks.registry")
    backbone: BackboneConfig = BackboneConfig()
    input: InputConfig = InputConfig()
    data: DataConfig
    head: HeadConfig = HeadConfig()
    fine_tune: list[Phase] | str = "two_phase"
    fine_tune_epochs: int = Field(6, ge=1, description="epoch budget when fine_tune is a preset")
    training: TrainingConfig = TrainingConfig()
    medical: MedicalConfig = MedicalConfig()
    segmentation: SegmentationConfig = SegmentationConfig()
    export: ExportConfig = ExportConfig()
    seed: int = Field(0, ge=0)
    output_dir: str = "runs"

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value):
        return value if value is None else check_component(value, "run name")

    @field_validator("fine_tune")
    @classmethod
    def _known_preset(cls, value):
        if isinstance(value, str) and value not in PRESETS:
            raise ValueError(unknown_name("preset", value, PRESETS))
        if isinstance(value, list) and not value:
            raise ValueError("needs at least one phase")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        task = TASKS[self.task]
        if self.data.augmentation is None:  # the task's own default, written into the resolved recipe
            self.data.augmentation = task.augmentation
        if not task.has_head and "head" in self.model_fields_set:
            raise ValueError(f"head: configures a classifier's head; a {self.task} model has none (its own "
                             f"options, the decoder's included, are in the recipe's {task.section}: section)")
        if not task.cross_validation and self.data.cv_folds:
            raise ValueError(f"cross-validation (data.cv_folds) is for single-label tasks, not {self.task}")
        if self.training.distribute == "multi_worker" and self.data.cv_folds:
            raise ValueError("training.distribute: multi_worker trains one model; cross-validation "
                             "(data.cv_folds) runs on one machine (use mirrored or none)")
        return self

    def phases(self) -> list[Phase]:
        from restransfer.tasks.registry import default_lr_mult
        from restransfer.training.phases import preset

        if isinstance(self.fine_tune, str):
            return preset(self.fine_tune, epochs=self.fine_tune_epochs, lr_mult=default_lr_mult(self.task))
        return list(self.fine_tune)


# --- errors with file:line ---------------------------------------------------------------


class RecipeError(ValueError):
    """One or more problems with a recipe; ``str()`` lists them one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def field_path(loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


class _Positions:
    """Where each field path was written: (file, line) from YAML nodes."""

    def __init__(self, default: str = "recipe"):
        self.lines: dict[tuple, tuple[str, int]] = {}
        self.default = default  # for fields nobody wrote (e.g. a missing required one)

    def record(self, node, source: str, prefix: tuple = ()):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = prefix + (key_node.value,)
                self.lines[path] = (source, key_node.start_mark.line + 1)
                self.record(value_node, source, path)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.lines[prefix + (index,)] = (source, item.start_mark.line + 1)
                self.record(item, source, prefix + (index,))

    def where(self, loc) -> str:
        loc = tuple(loc)
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.lines:
                source, line = self.lines[loc[:end]]
                return f"{source}:{line}" if line else source
        return self.default


def _model_at(loc) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at ``loc`` (for 'did you mean')."""
    model: Any = RecipeConfig
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        model = _unwrap(model.model_fields[part].annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(annotation):
    for arg in typing.get_args(annotation) or (annotation,):
        inner = typing.get_args(arg)
        for candidate in (inner or (arg,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                return candidate
    return annotation


def _describe(error: dict) -> str:
    kind, loc, value = error["type"], error["loc"], error.get("input")
    if kind == "extra_forbidden":
        holder = _model_at(loc[:-1])
        options = list(holder.model_fields) if holder else []
        if not options:
            return "unknown key"
        hint = unknown_name("key", loc[-1], options).split("; ", 1)[1]
        return f"unknown key; {hint.replace('choices:', 'allowed:')}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        symbol = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
                  "less_than_equal": "<="}[kind]
        limit = next(iter(error["ctx"].values()))
        return f"must be {symbol} {limit}, got {value!r}"
    if kind == "value_error":
        return error["msg"].removeprefix("Value error, ")
    message = error["msg"]
    if kind in ("missing",):
        return "required field is missing"
    if not isinstance(value, (dict, list)) and value is not None:
        message += f", got {value!r}"
    return message


def _dedupe_union_errors(errors: list[dict], data: dict) -> list[dict]:
    # A field typed `A | B` reports one error per branch; for fine_tune (list of phases or
    # a preset name) keep the branch that matches what was written.
    written_list = isinstance(data.get("fine_tune"), list)
    kept = []
    for error in errors:
        loc = error["loc"]
        if loc and loc[0] == "fine_tune" and len(loc) > 1 and isinstance(loc[1], str):
            if (loc[1] == "str") == written_list:
                continue
            error = {**error, "loc": (loc[0],) + tuple(loc[2:])}
        kept.append(error)
    return kept


# --- loading -------------------------------------------------------------------------------


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_yaml(path: Path, positions: _Positions, prefix_paths: bool = False) -> dict:
    try:
        text = path.read_text()
    except OSError as error:
        raise RecipeError([f"{path}: cannot read recipe: {error.strerror or error}"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError([f"{where}: not valid YAML: {getattr(error, 'problem', error)}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"{path}:1: a recipe is a mapping of fields, got {type(data).__name__}"])
    if node is not None:
        positions.record(node, str(path))
    _relative_paths_to_absolute(data, path.parent)
    return data


# Fields holding paths, resolved against the directory of the file that sets them.
_PATH_FIELDS = (("data", "source"), ("data", "validation"), ("data", "test"),
                ("backbone", "weights"), ("output_dir",))


def _is_pathlike(value) -> bool:
    from restransfer.models.presets import is_preset_name

    return (isinstance(value, str) and value and not re.match(r"^(tfds|sklearn):", value)
            and not is_preset_name(value))


def _relative_paths_to_absolute(data: dict, base: Path) -> None:
    for path in _PATH_FIELDS:
        holder = data
        for key in path[:-1]:
            holder = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and _is_pathlike(holder.get(path[-1])):
            value = os.path.expanduser(holder[path[-1]])
            holder[path[-1]] = os.path.normpath(value if os.path.isabs(value) else base / value)


def _load_with_extends(path: Path, positions: _Positions, seen: tuple = ()) -> dict:
    path = path.resolve() if path.is_absolute() else path
    if path.resolve() in seen:
        raise RecipeError([f"{path}: 'extends' loops back to itself"])
    data = _read_yaml(path, positions)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError([f"{positions.where(('extends',))}: extends: must be a file name"])
    parent_path = Path(os.path.normpath(path.parent / parent))
    child_positions = dict(positions.lines)
    base = _load_with_extends(parent_path, positions, seen + (path.resolve(),))
    positions.lines.update(child_positions)  # the child's lines win where it sets a field
    return _merge(base, data)


_SET = re.compile(r"^([A-Za-z_][\w]*(?:\[\d+\]|\.[A-Za-z_][\w]*)*)=(.*)$", re.S)


def apply_override(data: dict, assignment: str, positions: _Positions) -> None:
    """``fine_tune[0].epochs=2``: the value is parsed as YAML (safe_load)."""
    match = _SET.match(assignment.strip())
    if not match:
        raise RecipeError([f"--set {assignment}: expected FIELD.PATH=VALUE, e.g. fine_tune[0].epochs=2"])
    keys = [int(k[1:-1]) if k.startswith("[") else k
            for k in re.findall(r"\[\d+\]|[A-Za-z_]\w*", match.group(1))]
    try:
        value = yaml.safe_load(match.group(2)) if match.group(2) else None
    except yaml.YAMLError:
        value = match.group(2)
    holder: Any = data
    for index, key in enumerate(keys[:-1]):
        following = keys[index + 1]
        if isinstance(key, int):
            if isinstance(holder, str) and keys[0] == "fine_tune":  # a preset's name, not a list
                raise RecipeError([f"--set {assignment}: fine_tune is the preset {holder!r} in this recipe, not a list "
                                   "of phases: set fine_tune_epochs=N for its budget, or write the phases out "
                                   "(see recipes/hymenoptera.yaml)"])
            if not isinstance(holder, list) or key >= len(holder):
                raise RecipeError([f"--set {assignment}: {field_path(keys[:index + 1])} does not exist"])
            holder = holder[key]
        else:
            if not isinstance(holder, dict):
                raise RecipeError([f"--set {assignment}: {field_path(keys[:index])} is not a mapping"])
            holder = holder.setdefault(key, [] if isinstance(following, int) else {})
    last = keys[-1]
    if isinstance(last, int):
        if not isinstance(holder, list) or last > len(holder):
            raise RecipeError([f"--set {assignment}: {field_path(keys)} does not exist"])
        holder[last:last + 1] = [value]
    else:
        if not isinstance(holder, dict):
            raise RecipeError([f"--set {assignment}: {field_path(keys[:-1])} is not a mapping"])
        holder[last] = value
    positions.lines[tuple(keys)] = (f"--set {assignment}", 0)


def _path_problems(data: dict, positions: _Positions) -> list[str]:
    problems = []
    for field in _PATH_FIELDS:
        value: Any = data
        for key in field:
            value = value.get(key) if isinstance(value, dict) else None
        if field == ("output_dir",) or not _is_pathlike(value):
            continue
        if not os.path.exists(value):
            problems.append(f"{positions.where(field)}: {field_path(field)}: no such file or directory: {value}")
    return problems


def _augmentation_problems(data: dict, positions: _Positions) -> list[str]:
    section = data.get("data") if isinstance(data.get("data"), dict) else {}
    augmentation = section.get("augmentation")
    if not isinstance(augmentation, list) or not all(isinstance(i, dict) for i in augmentation):
        return []
    from restransfer.data.augmentation import build_transform  # imports albumentations (~1.7 s)

    problems = []
    for index, item in enumerate(augmentation):
        try:
            build_transform([item], 224)
        except ValueError as error:
            loc = ("data", "augmentation", index)
            detail = re.sub(r"^augmentation\[\d+\]:?\s*", "", str(error))
            problems.append(f"{positions.where(loc)}: {field_path(loc)}: {detail}")
    return problems


def load_recipe(path: str | os.PathLike, overrides: list[str] = (), check_paths: bool = True
                ) -> tuple[RecipeConfig, dict]:
    """Reads, merges, overrides and validates a recipe; returns (config, resolved dict).

    Raises :class:`RecipeError` listing every problem found (schema, missing paths,
    unknown transforms), each with file:line.
    """
    path = Path(path)
    positions = _Positions(str(path))
    data = _load_with_extends(path, positions)
    for assignment in overrides:
        apply_override(data, assignment, positions)
    if data.get("name") is None:  # unset (or --set name=): the recipe file's name
        data["name"] = path.stem
    problems = []
    config = None
    try:
        config = RecipeConfig.model_validate(data)
    except ValidationError as error:
        problems += [f"{positions.where(e['loc'])}: {field_path(e['loc'])}: {_describe(e)}"
                     for e in _dedupe_union_errors(error.errors(), data)]
    problems += _augmentation_problems(data, positions)
    if check_paths:
        problems += _path_problems(data, positions)
    if problems:
        raise RecipeError(problems)
    return config, config.model_dump(mode="json", exclude_none=True)


def dump_recipe(resolved: dict) -> str:
    return yaml.safe_dump(resolved, sort_keys=False)
