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

from pydantic import BaseModel

from restransfer import data as data_lib
from restransfer.cli.config import RecipeConfig, dump_recipe, load_recipe


class RunDirectoryExists(FileExistsError):
    pass


class RunLocked(RuntimeError):
    pass


# Written into every run directory restransfer creates: --overwrite replaces only directories
# that hold it, and only the entries a run writes (RUN_ENTRIES), so nothing a user made is lost.
MARKER = ".restransfer-run"
RUN_ENTRIES = (MARKER, "recipe.resolved.yaml", "split.csv", "checkpoints", "cache", "logs", "metrics.csv",
               "metrics_fold*.csv", "model.keras", ".saving-*.keras", "metrics.json", "report.html", "export",
               "gradcam", "fold[0-9]*")


def run_directory(config: RecipeConfig) -> Path:
    """``output_dir/name``: strictly inside ``output_dir`` (the name is one plain component)."""
    from restransfer.paths import child

    return child(config.output_dir, config.name, "run name")


class RunLock:
    """An exclusive lock on a run directory, held in ``<output_dir>/.<name>.lock`` (beside the
    directory, so replacing the directory cannot remove it; it holds the owner's PID).

    ``flock`` is released by the kernel when the owner dies, even by ``kill -9``, so a
    crashed run never leaves a stale lock behind.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir.parent / f".{self.run_dir.name}.lock"
        self.handle = None

    def __enter__(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise RunLocked(f"run directory {self.run_dir} is in use by another run (PID {holder})") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def is_run_directory(run_dir: Path) -> bool:
    """Made by restransfer: a real directory (not a symlink) holding the marker file."""
    return run_dir.is_dir() and not run_dir.is_symlink() and (run_dir / MARKER).is_file()


def has_progress(run_dir: Path) -> bool:
    """Whether a run got as far as a saved epoch (a checkpoint, a model, a finished fold)."""
    return any(next(run_dir.glob(pattern), None) is not None for pattern in (
        "model.keras", "checkpoints/last.keras", "fold*/model.keras", "fold*/checkpoints/last.keras"))


def _clear_run_entries(run_dir: Path) -> list[str]:
    """Removes what a run writes; returns the names of anything else, which is kept."""
    written = {path for pattern in RUN_ENTRIES for path in run_dir.glob(pattern)}
    for path in sorted(written):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return sorted(p.name for p in run_dir.iterdir())


def run_directory_refusal(run_dir: Path, overwrite: bool, resume: bool) -> str | None:
    """Why a run may not start in ``run_dir`` (None: it may), by the rules of :func:`prepare_run_dir`."""
    if run_dir.is_symlink():
        return f"run directory {run_dir} is a symbolic link; restransfer writes only into directories it created"
    if not (run_dir.exists() and any(run_dir.iterdir())):
        return None
    legacy = resume and (run_dir / "recipe.resolved.yaml").is_file()  # a run from before the marker
    if not is_run_directory(run_dir) and not legacy:
        return (f"{run_dir} exists and was not made by restransfer (no {MARKER} file): nothing in it is "
                "replaced; choose another name or output_dir")
    if not resume and has_progress(run_dir) and not overwrite:
        return f"run directory {run_dir} exists; pass --overwrite to replace it or --resume to continue it"
    return None


def prepare_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> Path:
    """Makes ``run_dir`` ready for a run; call it with the :class:`RunLock` held.

    * new, or empty: created and marked;
    * an earlier run's, with ``resume``: kept as it is (so is a run directory written before
      runs were marked: it is resumed, never deleted);
    * an earlier run's that never saved an epoch (a failed start): reused without asking;
    * an earlier run's with progress: refused unless ``overwrite``, which removes only the
      entries runs write (anything else in it is kept and named);
    * anything not made by restransfer (no marker, or a symlink): never written into or deleted.
    """
    refusal = run_directory_refusal(run_dir, overwrite, resume)
    if refusal:
        raise RunDirectoryExists(refusal)
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        kept = _clear_run_entries(run_dir)
        if kept:
            print(f"{run_dir}: kept {len(kept)} file(s) restransfer did not write: {', '.join(kept[:5])}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(run_dir, os.W_OK):
        raise PermissionError(f"run directory {run_dir} is not writable")
    marker = run_dir / MARKER
    if not marker.is_file():
        marker.write_text(json.dumps({"created_by": "restransfer", "pid": os.getpid()}) + "\n")
    return run_dir


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
            accepted |= {name for name, parameter in inspect.signature(cls.__init__).parameters.items()
                         if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)}
    return accepted


def recipe_arguments(config: RecipeConfig, recipe_class) -> dict:
    """The recipe constructor's arguments, derived from the schema: a field becomes the
    argument of the same name, or the one its ``recipe_arg`` metadata names; fields with no
    such argument are run-level (data sources, export, ...). A task's own section (e.g.
    ``medical``) counts only for that task (see :mod:`restransfer.tasks.registry`)."""
    from restransfer.tasks.registry import TASKS

    accepted = recipe_parameters(recipe_class)
    arguments = {}
    task_sections = {spec.section for spec in TASKS.values() if spec.section}

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
        if isinstance(section, BaseModel) and (name not in task_sections or name == TASKS[config.task].section):
            collect(section)
    return arguments


def recipe_class(task: str):
    from restransfer.tasks.registry import TASKS

    return TASKS[task].recipe_class()


def recipe_from_config(config: RecipeConfig, class_names=None):
    """The Python equivalent of a recipe file (the same model for the same seed)."""
    from restransfer.tasks.registry import TASKS

    cls = recipe_class(config.task)
    arguments = {**recipe_arguments(config, cls), **dict(TASKS[config.task].fixed), "phases": config.phases()}
    if class_names is not None:
        arguments["class_names"] = class_names
    return cls(**arguments)


def load_splits(config: RecipeConfig, recipe=None) -> data_lib.Splits:
    """The recipe file's train / validation / test parts (see :func:`restransfer.data.resolve_splits`);
    read with the recipe's own options (channels, bad-image policy, medical decoding)."""
    recipe = recipe or recipe_from_config(config)
    return recipe.splits(config.data.source, config.data.validation, config.data.test,
                         val_fraction=0 if config.data.cv_folds else config.data.val_fraction,
                         csv=config.data.csv.model_dump())


def _callbacks(run_dir: Path, tag: str = ""):
    import keras

    return [keras.callbacks.CSVLogger(str(run_dir / f"metrics{tag}.csv"), append=True),
            keras.callbacks.TensorBoard(log_dir=str(run_dir / "logs" / (tag.strip("_") or "train")),
                                        write_graph=False, profile_batch=0)]


def train(recipe_path, overrides=(), overwrite=False, resume=False, verbose="auto") -> Path:
    """Trains a recipe file end to end; returns the run directory.

    With ``resume`` it continues an interrupted run in place: finished steps are skipped,
    training restarts from the last complete epoch.
    """
    config, resolved = load_recipe(recipe_path, overrides)
    from restransfer.training import distribute

    # first TensorFlow work of the process: a multi-worker strategy must come before any other
    strategy = distribute.get_strategy(config.training.distribute)
    run_dir = run_directory(config)
    if not distribute.worker(strategy).is_chief:
        # another worker of a multi-worker run: trains its share, resumes from the chief's
        # checkpoints (on a file system the workers share), writes nothing
        if not (resume and (run_dir / "model.keras").is_file()):  # the chief decides the same way
            recipe = recipe_from_config(config)
            _fit(recipe, load_splits(config, recipe), run_dir, resume, verbose, callbacks=())
            print(f"worker {recipe.worker.index} of {recipe.worker.count} done; the chief writes {run_dir}")
        return run_dir
    with RunLock(run_dir):  # before anything in the run directory is touched
        if resume and said_complete(config, run_dir):
            return run_dir
        prepare_run_dir(run_dir, overwrite, resume)
        check_free_space(run_dir, config)
        recipe_file = run_dir / "recipe.resolved.yaml"
        if resume and recipe_file.exists() and recipe_file.read_text() != dump_recipe(resolved):
            raise ValueError(f"the recipe differs from the one {run_dir} was started with "
                             f"({recipe_file}); resume with the same recipe and --set options")
        recipe_file.write_text(dump_recipe(resolved))
        recipe = recipe_from_config(config)
        splits = load_splits(config, recipe)
        recipe.skipped = list(splits.skipped)  # every file left out, named in metrics.json and the report
        if config.data.cv_folds:
            return _cross_validate(config, splits, run_dir, verbose, resume=resume)
        _train_single(config, recipe, splits, run_dir, resume, verbose)
    print(f"run directory: {run_dir}")
    return run_dir


def said_complete(config: RecipeConfig, run_dir: Path) -> bool:
    """--resume of a run whose files are all there: says so (nothing is redone or rewritten)."""
    if not run_is_complete(config, run_dir):
        return False
    print(f"run {run_dir} is complete: model.keras, metrics.json, report.html"
          + (" and the export" if config.export.enabled and not config.data.cv_folds else "")
          + " are there; nothing to resume (--overwrite starts it again)")
    return True


def run_is_complete(config: RecipeConfig, run_dir: Path) -> bool:
    """Everything a run writes is there: its metrics (written after the model and the report)
    and, when exporting, a version of the export."""
    if not (run_dir / "metrics.json").is_file():
        return False
    if config.data.cv_folds or not config.export.enabled:
        return True
    model_dir = run_dir / "export" / (config.export.model_name or config.name)
    return any(p.name.isdigit() for p in model_dir.glob("*"))


def _trim_epoch_log(csv_path: Path, checkpoint_dir: Path) -> None:
    """Resuming: drops metrics.csv rows of epochs after the checkpoint (a kill can land
    between the log's row and the checkpoint), so each epoch appears once."""
    from restransfer.training.checkpoints import read_state

    state = read_state(checkpoint_dir)
    if not (csv_path.is_file() and state is not None):
        return
    done = state["epoch"]
    lines = csv_path.read_text().splitlines(keepends=True)
    kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) < done]
    csv_path.write_text("".join(kept))


def split_roles(recipe, tuned_val: bool, test: bool) -> dict:
    """Which split each reported figure comes from and what was tuned on it."""
    tuned = recipe.tuned_on_validation()
    roles = {"val_*": "validation split" + (f": {' and '.join(tuned)} on it, so its figures are optimistic"
                                            if tuned and tuned_val else ": nothing was tuned on it")}
    if test:
        roles["test_*"] = "test split: nothing was tuned on it"
    return roles


def _fit(recipe, splits: data_lib.Splits, run_dir: Path, resume: bool, verbose, callbacks) -> None:
    if resume:
        _trim_epoch_log(run_dir / "metrics.csv", run_dir / "checkpoints")
    recipe.fit(splits.train, validation_data=splits.val, callbacks=list(callbacks), verbose=verbose,
               checkpoint_dir=run_dir / "checkpoints", resume=resume)


def _train_single(config, recipe, splits: data_lib.Splits, run_dir: Path, resume: bool, verbose) -> None:
    val, test = splits.val, splits.test
    if all(part.paths for _, part in splits.items()):
        data_lib.write_split(run_dir / "split.csv", dict(splits.items()))
    model_path = run_dir / "model.keras"
    if resume and model_path.is_file():  # training had finished; only the rest is redone
        skipped = recipe.skipped
        recipe = type(recipe).load(model_path, **recipe_arguments(config, type(recipe)))
        recipe.history, recipe.skipped = _saved_history(run_dir), skipped
    else:
        _fit(recipe, splits, run_dir, resume, verbose, callbacks=_callbacks(run_dir))
        recipe.save(model_path)
    scored_on = "test" if test is not None else "val: the split the threshold was chosen on (no test split), so optimistic"
    findings = recipe.after_training(val, test if test is not None else val, run_dir, tuned_on="val",
                                     scored_on=scored_on)
    if findings:
        recipe.save(model_path)  # what it chose (a threshold, a temperature) travels with the model
    roles = split_roles(recipe, tuned_val=True, test=test is not None)
    metrics = recipe.report(run_dir, f"restransfer run: {config.name}", splits, roles)
    metrics.update(findings)
    metrics["splits"] = roles
    metrics["skipped_files"] = [{"path": s.path, "reason": s.reason} for s in recipe.skipped]
    metrics["early_stopping"] = recipe.history.kept if recipe.history else []
    _write_json(run_dir / "metrics.json", metrics)
    if config.export.enabled:
        model_dir = run_dir / "export" / (config.export.model_name or config.name)
        for stale in model_dir.glob(".partial-*"):  # an export killed mid-way (run dir is locked)
            shutil.rmtree(stale)
        if not any(p.name.isdigit() for p in model_dir.glob("*")):
            recipe.export(run_dir / "export", model_name=model_dir.name, top_k=config.export.top_k,
                          warmup_images=val or splits.train)


def _write_json(path: Path, value) -> None:
    """Written whole or not at all (a temporary file, then renamed)."""
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(json.dumps(value, indent=2))
    os.replace(temporary, path)


def _saved_history(run_dir: Path):
    from restransfer.training.checkpoints import read_state
    from restransfer.training.loop import TrainingHistory

    state = read_state(run_dir / "checkpoints")
    if state is None:
        return None
    return TrainingHistory.from_dict(state["history"])


def _cross_validate(config: RecipeConfig, splits: data_lib.Splits, run_dir: Path, verbose, resume: bool = False) -> Path:
    """Stratified (group-aware) k-fold: a fresh model per fold, metrics per fold + mean/sd.

    Each fold checkpoints every epoch in ``foldN/checkpoints`` like a single run; with
    ``resume``, finished folds (their ``metrics.json``) are read back, not retrained, and an
    interrupted fold continues from its last epoch."""
    from restransfer.training.progress import RunProgress, progress_mode

    everything, skipped = splits.train, splits.skipped
    clock = RunProgress(config.data.cv_folds * sum(p.epochs for p in recipe_from_config(config).phases),
                        progress_mode(verbose))
    folds = []
    for index, (train_part, val_part) in enumerate(data_lib.kfold(everything, config.data.cv_folds, config.seed)):
        print(f"fold {index + 1}/{config.data.cv_folds}: {len(train_part)} train, {len(val_part)} val")
        fold_dir = run_dir / f"fold{index + 1}"
        fold_dir.mkdir(exist_ok=True)
        finished = fold_dir / "metrics.json"
        if resume and finished.is_file():
            print(f"fold {index + 1} was finished: its figures are read back ({finished})")
            folds.append(json.loads(finished.read_text()))
            clock.done += sum(p.epochs for p in recipe_from_config(config).phases)
            continue
        if train_part.paths:
            data_lib.write_split(fold_dir / "split.csv", {"train": train_part, "val": val_part})
        import keras

        keras.backend.clear_session()
        recipe = recipe_from_config(config, class_names=everything.class_names)
        recipe.skipped = list(skipped)
        # the held-out fold is the test set; a slice of the training part drives early
        # stopping (and chooses a medical threshold), so nothing is tuned on the held-out fold
        fit_part, threshold_part = data_lib.stratified_split(train_part, recipe.inner_validation_fraction(),
                                                             config.seed)
        clock.label = f"fold {index + 1}/{config.data.cv_folds}"
        if resume:
            _trim_epoch_log(run_dir / f"metrics_fold{index + 1}.csv", fold_dir / "checkpoints")
        recipe.fit(fit_part, validation_data=threshold_part,
                   callbacks=[*_callbacks(run_dir, f"_fold{index + 1}"), clock], verbose=verbose,
                   checkpoint_dir=fold_dir / "checkpoints", resume=resume)
        findings = recipe.after_training(
            threshold_part, val_part, fold_dir,
            tuned_on=f"{recipe.inner_validation_fraction():.0%} of fold {index + 1}'s training part",
            scored_on=f"fold {index + 1} (held out)")
        recipe.save(fold_dir / "model.keras")
        metrics = recipe.report(fold_dir, f"{config.name}: fold {index + 1}/{config.data.cv_folds}",
                                data_lib.Splits(fit_part, val_part),
                                {"val_*": f"fold {index + 1}, held out: nothing was tuned on it"},
                                shown_split=f"fold {index + 1}, held out")
        metrics.update(recipe.fold_figures(findings))
        for key, value in findings.items():  # e.g. clinical.json: the full clinical report
            _write_json(fold_dir / f"{key}.json", value)
        _write_json(finished, metrics)  # last: its presence says the fold is done
        folds.append(metrics)
    keys = sorted(k for k in set.intersection(*(set(f) for f in folds)) if isinstance(folds[0][k], (int, float)))
    summary = {k: {"mean": statistics.mean(f[k] for f in folds), "sd": statistics.stdev(f[k] for f in folds)}
               for k in keys}
    roles = {"val_*, test_*": "each fold's held-out part: nothing was tuned on it (early stopping and "
                              "thresholds used a slice of that fold's training part)"}
    _write_json(run_dir / "metrics.json", {"folds": folds, "summary": summary, "splits": roles})
    from restransfer.evaluation.report import folds_section, write_page

    write_page(run_dir / "report.html", f"restransfer run: {config.name} ({config.data.cv_folds}-fold)",
               folds_section(folds, summary) + f"<p>{roles['val_*, test_*']}</p>")
    for key, value in summary.items():
        print(f"{key}: {value['mean']:.4f} ± {value['sd']:.4f}")
    print(f"run directory: {run_dir}")
    return run_dir
