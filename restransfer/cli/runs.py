"""Running a recipe file: one run directory holding everything the run produced.

    <output_dir>/<name>/
      recipe.resolved.yaml   the recipe after extends/--set, paths absolute
      split.csv              which file went to which split (file-based data)
      metrics.csv            per-epoch metrics of every phase (Keras CSVLogger)
      logs/                  TensorBoard
      model.keras            the final model
      metrics.json           validation/test metrics (cross-validation: per fold, mean, sd)
      report.html            curves, confusion matrix, ROC, calibration, worst mistakes
      export/<model>/<n>/    SavedModel for TensorFlow Serving (if export.enabled)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from restransfer import data as data_lib
from restransfer.cli.config import RecipeConfig, dump_recipe, load_recipe


class RunDirectoryExists(FileExistsError):
    pass


class RunLocked(RuntimeError):
    pass


class RunLock:
    """An exclusive lock on a run directory (``.lock``, holding the owner's PID).

    ``flock`` is released by the kernel when the owner dies, even by ``kill -9``, so a
    crashed run never leaves a stale lock behind.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.handle = None

    def __enter__(self):
        import fcntl

        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise RunLocked(f"run directory {self.path.parent} is in use by another run (PID {holder})") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def check_free_space(run_dir: Path, config: RecipeConfig) -> None:
    """Fails before training when checkpoints cannot fit: weights + two Adam moments, twice
    (the new checkpoint is written beside the old one), plus 100 MB for the rest."""
    from restransfer.models.registry import get_spec

    needed = get_spec(config.backbone.name).params * 4 * 3 * 2 + 100 * 2**20
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise OSError(f"only {free / 2**20:.0f} MB free in {run_dir}; checkpoints of "
                      f"{config.backbone.name} need about {needed / 2**20:.0f} MB")


def recipe_parameters(recipe_class) -> set[str]:
    """The names a recipe class's constructor takes, its base classes' included."""
    import inspect

    accepted = set()
    for cls in recipe_class.__mro__:
        if "__init__" in vars(cls):
            accepted |= set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    return accepted


def recipe_arguments(config: RecipeConfig, recipe_class) -> dict:
    """The recipe constructor's arguments, derived from the schema: a field becomes the
    argument of the same name, or the one its ``recipe_arg`` metadata names; fields with no
    such argument are run-level (data sources, export, ...). The ``medical`` section counts
    only for ``task: medical``."""
    accepted = recipe_parameters(recipe_class)
    arguments = {}

    def collect(section):
        for name, field in type(section).model_fields.items():
            value = getattr(section, name)
            extra = field.json_schema_extra or {}
            argument = extra.get("recipe_arg", name)
            if argument in accepted and not isinstance(value, BaseModel):
                arguments[argument] = value

    collect(config)
    for name in type(config).model_fields:
        section = getattr(config, name)
        if isinstance(section, BaseModel) and (name != "medical" or config.task == "medical"):
            collect(section)
    return arguments


def recipe_class(task: str):
    from restransfer.tasks.classification import ClassificationRecipe
    from restransfer.tasks.medical import MedicalImagingRecipe

    return MedicalImagingRecipe if task == "medical" else ClassificationRecipe


def recipe_from_config(config: RecipeConfig, class_names=None):
    """The Python equivalent of a recipe file (the same model for the same seed)."""
    cls = recipe_class(config.task)
    return cls(**recipe_arguments(config, cls), class_names=class_names,
               multi_label=config.task == "multilabel", phases=config.phases())


def load_splits(config: RecipeConfig, recipe=None) -> data_lib.Splits:
    """The recipe file's train / validation / test parts (see :func:`restransfer.data.resolve_splits`);
    read with the recipe's own options (channels, bad-image policy, medical decoding)."""
    recipe = recipe or recipe_from_config(config)
    return data_lib.resolve_splits(
        config.data.source, config.data.validation, config.data.test,
        val_fraction=0 if config.data.cv_folds else config.data.val_fraction, seed=config.seed,
        csv=config.data.csv.model_dump(), **recipe.read_options())


def prepare_run_dir(config: RecipeConfig, overwrite: bool, resume: bool) -> Path:
    run_dir = Path(config.output_dir) / config.name
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        if not overwrite:
            raise RunDirectoryExists(f"run directory {run_dir} exists; pass --overwrite to replace it "
                                     "or --resume to continue it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(run_dir, os.W_OK):
        raise PermissionError(f"run directory {run_dir} is not writable")
    return run_dir


def _callbacks(run_dir: Path, tag: str = ""):
    import keras

    return [keras.callbacks.CSVLogger(str(run_dir / f"metrics{tag}.csv"), append=True),
            keras.callbacks.TensorBoard(log_dir=str(run_dir / "logs" / (tag.strip("_") or "train")),
                                        write_graph=False, profile_batch=0)]


def _images_at(recipe, data, indices) -> dict:
    """index -> the (resized) image the model saw, for just these indices of ``data``."""
    wanted, found, start = set(int(i) for i in indices), {}, 0
    if not wanted:
        return found
    for batch_images, _ in recipe._pipeline(data, training=False):
        for offset in range(len(batch_images)):
            if start + offset in wanted:
                found[start + offset] = batch_images[offset].numpy()
        start += len(batch_images)
        if len(found) == len(wanted):
            break
    return found


def _headline(metrics: dict, clinical: dict | None, split_notes: dict) -> list:
    """(figure, value, split) rows for the report's summary: the test split's when there is one."""
    from restransfer.evaluation.report import with_ci

    if clinical and "binary" in clinical:
        binary = clinical["binary"]
        return [(name, with_ci(binary, key), clinical["figures_on"])
                for name, key in (("AUC", "auc"), ("sensitivity", "sensitivity"), ("specificity", "specificity"))]
    for prefix in ("test", "val"):
        if f"{prefix}_accuracy" in metrics:
            role = split_notes.get(f"{prefix}_*", prefix)
            return [("accuracy", f"{metrics[f'{prefix}_accuracy']:.3f}", role)] + \
                   ([("AUC", f"{metrics[f'{prefix}_auc']:.3f}", role)] if f"{prefix}_auc" in metrics else [])
    return []


def report_run(recipe, run_dir: Path, title: str, splits: data_lib.Splits, split_notes: dict, *,
               task: str = "classification", clinical: dict | None = None, clinical_data=None,
               extra_images=(), shown_split: str = "validation") -> dict:
    """Evaluates the validation and test parts and writes ``run_dir/report.html``; returns
    the metrics (``val_*``, ``test_*``). The page's plots are on the validation part (named
    ``shown_split``); ``clinical`` (with the data its figures are on) adds the clinical section."""
    from restransfer.evaluation import report as report_lib

    val, test = splits.val, splits.test
    metrics = {}
    for name, part in (("val", val), ("test", test)):
        if part is not None:
            metrics.update({f"{name}_{k}": v for k, v in recipe.evaluate(part).items()})
    shown = val if val is not None else test
    if shown is None:
        return metrics
    probabilities = recipe.predict_dataset(shown)
    decisions = np.asarray(recipe.decision.decide(probabilities, recipe.class_names))
    images = None
    if not recipe.multi_label:
        wrong = report_lib.most_confident_wrong(shown.labels, decisions, probabilities.max(axis=1))
        images = _images_at(recipe, shown, wrong)
    described = recipe.describe()
    summary = {"task": task, "backbone": described["backbone"], "weights": described["weights"],
               "splits": {name: len(part) for name, part in splits.items()},
               "decision": recipe.decision.describe(), "headline": _headline(metrics, clinical, split_notes)}
    plots = (None, None)
    if clinical and "binary" in clinical and clinical_data is not None:
        scores = recipe.predict_dataset(clinical_data)
        positive = recipe.class_names.index(recipe.decision.positive_class)
        truth = (np.asarray(clinical_data.labels) == positive).astype(int)
        on = clinical["figures_on"].split(":")[0]
        plots = (report_lib.operating_point_png(truth, scores[:, positive], recipe.decision.threshold, on,
                                                recipe.class_names[positive]),
                 report_lib.calibration_png(np.eye(len(recipe.class_names))[clinical_data.labels], scores,
                                            on, temperature=recipe.temperature))
    notes = [f"{len(recipe.skipped)} unusable file(s) skipped",
             *(f"{key}: {role}" for key, role in split_notes.items())]
    report_lib.write_report(run_dir / "report.html", title, recipe.history, recipe.class_names, shown.labels,
                            probabilities, images, multi_label=recipe.multi_label, metrics=metrics,
                            notes=notes, extra_images=extra_images, decisions=decisions, summary=summary,
                            clinical=clinical, clinical_plots=plots, split=shown_split)
    return metrics


def train(recipe_path, overrides=(), overwrite=False, resume=False, verbose="auto") -> Path:
    """Trains a recipe file end to end; returns the run directory.

    With ``resume`` it continues an interrupted run in place: finished steps are skipped,
    training restarts from the last complete epoch.
    """
    config, resolved = load_recipe(recipe_path, overrides)
    from restransfer.training import distribute

    # first TensorFlow work of the process: a multi-worker strategy must come before any other
    strategy = distribute.get_strategy(config.training.distribute)
    run_dir = Path(config.output_dir) / config.name
    if not distribute.worker(strategy).is_chief:
        # another worker of a multi-worker run: trains its share, resumes from the chief's
        # checkpoints (on a file system the workers share), writes nothing
        if not (resume and (run_dir / "model.keras").is_file()):  # the chief decides the same way
            recipe = recipe_from_config(config)
            _fit(recipe, load_splits(config, recipe), run_dir, resume, verbose, callbacks=())
            print(f"worker {recipe.worker.index} of {recipe.worker.count} done; the chief writes {run_dir}")
        return run_dir
    run_dir = prepare_run_dir(config, overwrite, resume)
    with RunLock(run_dir):
        check_free_space(run_dir, config)
        recipe_file = run_dir / "recipe.resolved.yaml"
        if resume and recipe_file.exists() and recipe_file.read_text() != dump_recipe(resolved):
            raise ValueError(f"the recipe differs from the one {run_dir} was started with "
                             f"({recipe_file}); resume with the same recipe and --set options")
        recipe_file.write_text(dump_recipe(resolved))
        recipe = recipe_from_config(config)
        splits = load_splits(config, recipe)
        if config.data.cv_folds:
            return _cross_validate(config, splits.train, run_dir, verbose)
        _train_single(config, recipe, splits, run_dir, resume, verbose)
    print(f"run directory: {run_dir}")
    return run_dir


def _trim_epoch_log(csv_path: Path, state_path: Path) -> None:
    """Resuming: drops metrics.csv rows of epochs after the checkpoint (a kill can land
    between the log's row and the checkpoint), so each epoch appears once."""
    if not (csv_path.is_file() and state_path.is_file()):
        return
    done = json.loads(state_path.read_text())["epoch"]
    lines = csv_path.read_text().splitlines(keepends=True)
    kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) < done]
    csv_path.write_text("".join(kept))


def split_roles(config, tuned_val: bool, test: bool) -> dict:
    """Which split each reported figure comes from and what was tuned on it."""
    tuned = [what for what, on in (("early stopping kept its best epoch", bool(config.training.early_stopping_patience)),
                                   ("the decision threshold was chosen", config.task == "medical")) if on]
    roles = {"val_*": "validation split" + (f": {' and '.join(tuned)} on it, so its figures are optimistic"
                                            if tuned and tuned_val else ": nothing was tuned on it")}
    if test:
        roles["test_*"] = "test split: nothing was tuned on it"
    return roles


def _fit(recipe, splits: data_lib.Splits, run_dir: Path, resume: bool, verbose, callbacks) -> None:
    if resume:
        _trim_epoch_log(run_dir / "metrics.csv", run_dir / "checkpoints" / "state.json")
    recipe.fit(splits.train, validation_data=splits.val, callbacks=list(callbacks), verbose=verbose,
               checkpoint_dir=run_dir / "checkpoints", resume=resume)


def _train_single(config, recipe, splits: data_lib.Splits, run_dir: Path, resume: bool, verbose) -> None:
    val, test = splits.val, splits.test
    if all(part.paths for _, part in splits.items()):
        data_lib.write_split(run_dir / "split.csv", dict(splits.items()))
    model_path = run_dir / "model.keras"
    if resume and model_path.is_file():  # training had finished; only the rest is redone
        recipe = type(recipe).load(model_path, **recipe_arguments(config, type(recipe)))
        recipe.history = _saved_history(run_dir)
    else:
        _fit(recipe, splits, run_dir, resume, verbose, callbacks=_callbacks(run_dir))
        recipe.save(model_path)
    clinical = None
    if config.task == "medical":
        scored_on = ("test" if test is not None else
                     "val: the split the threshold was chosen on (no test split), so optimistic")
        clinical = _clinical(recipe, config, val, test if test is not None else val, run_dir,
                             tuned_on="val", scored_on=scored_on)
        recipe.save(model_path)  # the chosen threshold/temperature travel with the model
    metrics = report_run(recipe, run_dir, f"restransfer run: {config.name}", splits,
                         split_roles(config, tuned_val=True, test=test is not None), task=config.task,
                         clinical=clinical, clinical_data=test if test is not None else val,
                         extra_images=sorted((run_dir / "gradcam").glob("*.png")))
    if clinical is not None:
        metrics["clinical"] = clinical
    metrics["splits"] = split_roles(config, tuned_val=True, test=test is not None)
    metrics["skipped_files"] = [{"path": s.path, "reason": s.reason} for s in recipe.skipped]
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if config.export.enabled:
        model_dir = run_dir / "export" / (config.export.model_name or config.name)
        for stale in model_dir.glob(".partial-*"):  # an export killed mid-way (run dir is locked)
            shutil.rmtree(stale)
        if not any(p.name.isdigit() for p in model_dir.glob("*")):
            recipe.export(run_dir / "export", model_name=model_dir.name, top_k=config.export.top_k,
                          warmup_images=val or splits.train)


def _clinical(recipe, config, val, test, out_dir: Path, tuned_on: str, scored_on: str) -> dict:
    """Threshold (and temperature) chosen on ``val``, stored in the model, then applied
    unchanged to ``test``; Grad-CAM overlays of the first test images. The report names both."""
    if val is not None:
        recipe.calibrate(val, split=tuned_on)
    report = {"decision_rule": recipe.decision.describe(), "threshold_chosen_on": tuned_on,
              "figures_on": scored_on, **recipe.evaluate_clinical(test)}
    if config.medical.gradcam_images:
        recipe.grad_cam_overlays(test, out_dir / "gradcam", count=config.medical.gradcam_images)
    return report


def _saved_history(run_dir: Path):
    from restransfer.training.phases import Phase
    from restransfer.training.loop import TrainingHistory

    state_file = run_dir / "checkpoints" / "state.json"
    if not state_file.is_file():
        return None
    saved = json.loads(state_file.read_text())["history"]
    return TrainingHistory(saved["history"], saved["phase_starts"], [Phase(**p) for p in saved["phases"]])


def _cross_validate(config: RecipeConfig, everything, run_dir: Path, verbose) -> Path:
    """Stratified (group-aware) k-fold: a fresh model per fold, metrics per fold + mean/sd."""
    from sklearn.metrics import roc_auc_score

    from restransfer.training.progress import RunProgress, progress_mode

    clock = RunProgress(config.data.cv_folds * sum(p.epochs for p in recipe_from_config(config).phases),
                        progress_mode(verbose))
    folds = []
    for index, (train_part, val_part) in enumerate(data_lib.kfold(everything, config.data.cv_folds, config.seed)):
        print(f"fold {index + 1}/{config.data.cv_folds}: {len(train_part)} train, {len(val_part)} val")
        fold_dir = run_dir / f"fold{index + 1}"
        fold_dir.mkdir(exist_ok=True)
        if train_part.paths:
            data_lib.write_split(fold_dir / "split.csv", {"train": train_part, "val": val_part})
        import keras

        keras.backend.clear_session()
        recipe = recipe_from_config(config, class_names=everything.class_names)
        # the held-out fold is the test set; a slice of the training part drives early
        # stopping (and chooses a medical threshold), so nothing is tuned on the held-out fold
        inner = config.medical.threshold_val_fraction if config.task == "medical" else config.data.val_fraction
        fit_part, threshold_part = data_lib.stratified_split(train_part, inner, config.seed)
        clock.label = f"fold {index + 1}/{config.data.cv_folds}"
        recipe.fit(fit_part, validation_data=threshold_part,
                   callbacks=[*_callbacks(run_dir, f"_fold{index + 1}"), clock], verbose=verbose)
        clinical = _clinical(recipe, config, threshold_part, val_part, fold_dir,
                             tuned_on=f"{config.medical.threshold_val_fraction:.0%} of fold {index + 1}'s training part",
                             scored_on=f"fold {index + 1} (held out)") if config.task == "medical" else None
        recipe.save(fold_dir / "model.keras")
        metrics = report_run(recipe, fold_dir, f"{config.name}: fold {index + 1}/{config.data.cv_folds}",
                             data_lib.Splits(fit_part, val_part),
                             {"val_*": f"fold {index + 1}, held out: nothing was tuned on it"},
                             task=config.task, clinical=clinical, clinical_data=val_part,
                             extra_images=sorted((fold_dir / "gradcam").glob("*.png")),
                             shown_split=f"fold {index + 1}, held out")
        if clinical is not None:
            binary = clinical.get("binary", {})
            metrics.update({f"test_{k}": binary[k] for k in ("auc", "sensitivity", "specificity", "accuracy")
                            if k in binary})
            (fold_dir / "clinical.json").write_text(json.dumps(clinical, indent=2))
        elif len(everything.class_names) == 2:
            probabilities = recipe.predict_dataset(val_part)
            metrics["val_auc"] = float(roc_auc_score(val_part.labels, probabilities[:, 1]))
        folds.append(metrics)
    keys = sorted(set.intersection(*(set(f) for f in folds)))
    summary = {k: {"mean": statistics.mean(f[k] for f in folds), "sd": statistics.stdev(f[k] for f in folds)}
               for k in keys}
    roles = {"val_*, test_*": "each fold's held-out part: nothing was tuned on it (early stopping and "
                              "thresholds used a slice of that fold's training part)"}
    (run_dir / "metrics.json").write_text(json.dumps({"folds": folds, "summary": summary, "splits": roles},
                                                     indent=2))
    from restransfer.evaluation.report import folds_section, write_page

    write_page(run_dir / "report.html", f"restransfer run: {config.name} ({config.data.cv_folds}-fold)",
               folds_section(folds, summary) + f"<p>{roles['val_*, test_*']}</p>")
    for key, value in summary.items():
        print(f"{key}: {value['mean']:.4f} ± {value['sd']:.4f}")
    print(f"run directory: {run_dir}")
    return run_dir
