"""The phase loop: each phase sets the trainable stages, compiles a fresh optimizer (so a
change of trainable state can never meet a stale compiled step), and runs Keras ``fit`` with
early stopping on the validation metric, checkpointing after every epoch."""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from restransfer.models import stages as stages_lib
from restransfer.training.checkpoints import Checkpointer
from restransfer.training.interrupts import RaisePendingInterrupt
from restransfer.training.losses import apply_mixup
from restransfer.training.objectives import Objective
from restransfer.training.optimizers import ema_weights, make_optimizer
from restransfer.training.phases import Phase
from restransfer.training.progress import SILENT, BAR, RunProgress, progress_mode


@dataclasses.dataclass
class TrainingHistory:
    """Per-epoch metrics across all phases, with where each phase started."""

    history: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    phase_starts: list[int] = dataclasses.field(default_factory=list)
    phases: list[Phase] = dataclasses.field(default_factory=list)
    # per phase with early stopping: which epoch's weights it kept, and whether it stopped early
    kept: list[dict] = dataclasses.field(default_factory=list)

    def add(self, phase: Phase, epoch_logs: dict[str, list[float]]) -> None:
        epochs_so_far = self.epochs
        self.phase_starts.append(epochs_so_far)
        self.phases.append(phase)
        added = len(next(iter(epoch_logs.values()), []))
        for key, values in epoch_logs.items():
            column = self.history.setdefault(key, [math.nan] * epochs_so_far)
            column.extend(float(v) for v in values)
        for column in self.history.values():  # metrics absent in this phase
            column.extend([math.nan] * (epochs_so_far + added - len(column)))

    @property
    def epochs(self) -> int:
        return len(next(iter(self.history.values()), []))

    def to_dict(self) -> dict:
        return {"history": self.history, "phase_starts": self.phase_starts,
                "phases": [p.model_dump() for p in self.phases], "kept": self.kept}

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainingHistory":
        return cls(saved["history"], saved["phase_starts"], [Phase(**p) for p in saved["phases"]],
                   list(saved.get("kept", [])))


class BestEpoch(keras.callbacks.EarlyStopping):
    """Early stopping on the validation metric that keeps the best epoch's weights, with two
    additions: with EMA (``ema: true``) the kept weights are the EMA weights the epoch was
    validated with (Keras would keep the raw ones), and its memory (best value, patience
    count, best weights) can be checkpointed and restored, so a resumed phase stops and
    restores exactly as an uninterrupted one."""

    def __init__(self, monitor: str, patience: int, resume: dict | None = None, resume_weights=None,
                 mode: str = "max"):
        super().__init__(monitor=monitor, mode=mode, patience=patience, restore_best_weights=True)
        self._resume, self._resume_weights = resume, resume_weights

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._resume:
            self.best, self.wait = self._resume["best"], self._resume["wait"]
            self.best_epoch, self.best_weights = self._resume["best_epoch"], self._resume_weights

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.best_epoch == epoch:
            averaged = ema_weights(self.model)  # through a mixed-precision LossScaleOptimizer too
            if averaged is not None:
                self.best_weights = averaged

    def state(self, epoch: int) -> dict:
        return {"best": float(self.best), "wait": int(self.wait), "best_epoch": int(self.best_epoch),
                "best_weights_file": f"best-{self.best_epoch}.npz" if self.best_weights is not None else None}


class _SaveEachEpoch(keras.callbacks.Callback):
    def __init__(self, checkpointer, phase_index, phase_start, history, phases, full_model,
                 stopping: BestEpoch | None = None):
        super().__init__()
        self.checkpointer, self.phase_index, self.phase_start = checkpointer, phase_index, phase_start
        self.full_model = full_model  # fit may run on a head-only model (cached features)
        self.history, self.phases = history, phases
        self.stopping = stopping  # runs before this callback: its state includes this epoch
        self.logs: dict[str, list[float]] = {}

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if not all(np.isfinite(v) for v in logs.values() if isinstance(v, (int, float))):
            return  # keep the last good checkpoint
        for key, value in logs.items():
            self.logs.setdefault(key, []).append(float(value))
        partial = TrainingHistory({k: list(v) for k, v in self.history.history.items()},
                                  list(self.history.phase_starts), list(self.history.phases), list(self.history.kept))
        partial.add(self.phases[self.phase_index], self.logs)
        state = {"phase": self.phase_index, "phase_start_epoch": self.phase_start, "epoch": epoch + 1,
                 "phase_complete": False, "history": partial.to_dict()}
        best = None
        if self.stopping is not None:
            state["early_stopping"] = self.stopping.state(epoch)
            if self.stopping.best_epoch == epoch and self.stopping.best_weights is not None:
                best = self.stopping.best_weights
        self.checkpointer.save(self.full_model, state, best_weights=best)


def _features_of(backbone, dataset):
    """Runs a finite (images, labels) dataset through the frozen backbone once."""
    import tensorflow as tf

    from restransfer.training.caching import compiled_forward

    extract = compiled_forward(backbone)
    features, labels = [], []
    for images, batch_labels in dataset:
        features.append(extract(images))
        labels.append(batch_labels)
    return tf.data.Dataset.from_tensor_slices((tf.concat(features, 0), tf.concat(labels, 0))) \
        .batch(int(tf.shape(features[0])[0])).cache()


def build_before_tracing(model, dataset) -> None:
    """Creates the compiled metrics', loss's and optimizer's variables before ``fit`` traces its
    step. Without a distribution strategy Keras creates them while tracing, and a tf.function
    that creates variables is traced twice: this halves each phase's start (measured: a
    ResNet-18 phase starts ~4 s sooner on this CPU). Keras does the same itself under a strategy."""
    build = getattr(model, "_symbolic_build", None)
    if build is None or getattr(model, "_distribute_strategy", None) is not None:
        return
    build(data_batch=dataset.element_spec)


def describe_kept(kept: dict, patience: int | None = None) -> str:
    """One line: where early stopping stopped a phase and which epoch's weights it kept."""
    stopped = (f"early stopping after epoch {kept['stopped_after_epoch']} ({kept['monitor']} did not improve"
               + (f" for {patience} epoch(s))" if patience else ")") + "; ") if kept.get("stopped_after_epoch") else ""
    return (f"phase {kept['phase']}: {stopped}kept epoch {kept['kept_epoch']}'s weights "
            f"({kept['monitor']} {kept['value']:.4g}, the phase's best)")


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/Inf loss; the phase was stopped."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops at the first non-finite batch loss and remembers where it happened."""

    def __init__(self):
        super().__init__()
        self.where = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            self.where = (self._epoch + 1, batch + 1)
            self.model.stop_training = True


def run_phases(
    model: keras.Model,
    phases: list[Phase],
    train_ds,
    val_ds,
    steps_per_epoch: int,
    objective: Objective,
    patience: int | None = 3,
    callbacks=None,
    verbose="auto",
    seed: int = 0,
    checkpointer: Checkpointer | None = None,
    resume_state: dict | None = None,
    feature_cache=None,
    strategy=None,
) -> TrainingHistory:
    """Runs the phases; with a ``checkpointer`` saves after every epoch and phase, and with
    ``resume_state`` (from :meth:`Checkpointer.load`, the model already loaded) continues
    from the last complete epoch with the saved optimizer and schedule. With a
    ``feature_cache`` (:class:`restransfer.training.caching.FeatureCache`), head-only phases train
    the head on cached backbone features instead of running the backbone every step.
    ``objective`` (:mod:`restransfer.training.objectives`): the task's targets, loss, metrics
    and the validation figure early stopping follows.

    ``train_ds``: a dataset (used as given, one pass per epoch), or a function
    ``start_epoch -> endless dataset`` (restransfer's own pipelines), run for
    ``steps_per_epoch`` steps per epoch.

    ``strategy``: a tf.distribute strategy the model was built under (see
    :mod:`restransfer.training.distribute`); optimizers are then made in its scope, and under
    MultiWorkerMirroredStrategy restransfer's own loop replaces ``fit``. ``train_ds`` is
    then this worker's shard.
    """
    from restransfer.training import distribute

    multi_worker = distribute.is_multi_worker(strategy)
    mode = progress_mode(verbose)
    verbose = 1 if mode == BAR else 0  # Keras' own output: the live bar, or nothing
    callbacks = list(callbacks or [])
    if not any(isinstance(c, RunProgress) for c in callbacks):
        callbacks.append(RunProgress(sum(p.epochs for p in phases), mode))
    if resume_state:  # the run's count goes on from the epochs already done
        for progress in callbacks:
            if isinstance(progress, RunProgress):
                progress.done += int(resume_state["epoch"])
    history = TrainingHistory()
    start_phase, resume_epoch, resumed_logs = 0, None, {}
    if resume_state:
        saved = resume_state["history"]
        history = TrainingHistory.from_dict(saved)
        start_phase = resume_state["phase"]
        if not resume_state["phase_complete"]:
            # mid-phase: drop the partial phase from the history, re-add it when it ends
            resume_epoch = resume_state["epoch"]
            history.phase_starts.pop()
            history.phases.pop()
            history.history = {k: v[: resume_state["phase_start_epoch"]] for k, v in history.history.items()}
            resumed_logs = {k: v[resume_state["phase_start_epoch"]:] for k, v in saved["history"].items()}
    endless = callable(train_ds) and not hasattr(train_ds, "element_spec")
    train_for = train_ds if endless else (lambda start_epoch: train_ds)

    labelled = objective.targets
    val_ds = labelled(val_ds)
    for index in range(start_phase, len(phases)):
        phase = phases[index]
        if phase.epochs == 0:
            continue
        phase_start = history.epochs
        resuming = index == start_phase and resume_epoch is not None
        if phase.mixup and not objective.supports_mixup:
            raise ValueError(f"phase {index + 1}: MixUp mixes one-hot targets; this task's targets cannot be mixed")
        head_model = objective.head_model(model) if (
            feature_cache is not None and phase.trainable == "head" and not phase.train_bn and not phase.mixup) else None
        cached = head_model is not None
        fit_model = head_model if cached else model
        if resuming:  # the loaded optimizer: its step, schedule and moments
            if cached:
                objective.compile(fit_model, model.optimizer, phase)
        else:
            stages_lib.set_trainable_stages(
                model, stages_lib.parse_stages(phase.trainable), train_bn=phase.train_bn
            )
            with distribute.scope(strategy):
                optimizer = make_optimizer(model, phase, steps_per_epoch)
                objective.compile(fit_model, optimizer, phase)
                if cached:
                    # The checkpoint is the full model: compiled with the head model's very
                    # optimizer (in a head phase both train the same variables), it carries the
                    # phase's optimizer state, so a resumed cached phase continues exactly.
                    objective.compile(model, optimizer, phase)
        guard = StopOnNonFiniteLoss()
        phase_callbacks = list(callbacks or []) + [guard, RaisePendingInterrupt()]
        if strategy is not None and not multi_worker:
            phase_callbacks.append(distribute.AverageBatchNormStatistics(model, strategy))
        if phase.ema and val_ds is not None:
            # validate the EMA weights (the weights a phase with EMA keeps and exports)
            phase_callbacks.append(keras.callbacks.SwapEMAWeights())
        stopping = None
        if patience and val_ds is not None:
            memory = resume_state.get("early_stopping") if resuming else None
            stopping = BestEpoch(objective.monitor, patience, resume=memory, mode=objective.monitor_mode,
                                 resume_weights=checkpointer.best_weights(resume_state) if memory else None)
            phase_callbacks.append(stopping)
        if checkpointer is not None:  # after early stopping: its state then includes the epoch
            saver = _SaveEachEpoch(checkpointer, index, phase_start, history, phases, model, stopping)
            if resuming:
                saver.logs = {k: list(v) for k, v in resumed_logs.items()}
            phase_callbacks.append(saver)
        if mode != SILENT:
            rates = phase.stage_learning_rates()
            spread = f" stages {min(rates.values()):.2g}..{max(rates.values()):.2g}" if rates else ""
            print(f"phase {index + 1}/{len(phases)}: trainable={phase.trainable} epochs={phase.epochs} "
                  f"lr={phase.lr:g}{spread} schedule={phase.schedule}")
        epoch = resume_epoch if resuming else phase_start
        if cached:
            backbone = stages_lib.find_backbone(model)
            phase_train = labelled(feature_cache.train_dataset(backbone, epoch))
            phase_val = _features_of(backbone, val_ds) if val_ds is not None else None
        else:
            phase_train = apply_mixup(labelled(train_for(epoch)), phase.mixup, seed, index,
                                      first_step=(epoch - phase_start) * steps_per_epoch if endless else 0)
            phase_val = val_ds
        if mode != SILENT and cached:
            print(f"  training the head on cached backbone features ({feature_cache.views} view(s))")
        if not multi_worker:
            build_before_tracing(fit_model, phase_train)
        if multi_worker:
            loss, metrics = objective.loss_and_metrics(phase)
            result = distribute.fit_multi_worker(
                strategy, fit_model, phase_train, loss=loss, metrics=metrics,
                validation_data=phase_val, val_metrics=objective.loss_and_metrics()[1],
                epochs=phase_start + phase.epochs, initial_epoch=epoch,
                steps_per_epoch=steps_per_epoch, callbacks=phase_callbacks,
                class_weight=objective.class_weight, verbose=verbose)
        else:
            result = fit_model.fit(
                phase_train,
                validation_data=phase_val,
                steps_per_epoch=steps_per_epoch if endless else None,
                epochs=phase_start + phase.epochs,
                initial_epoch=epoch,
                callbacks=phase_callbacks,
                class_weight=objective.class_weight,
                shuffle=False,  # pipelines shuffle themselves, seeded
                verbose=verbose,
            )
        if guard.where is not None:
            raise NonFiniteLoss(
                f"phase {index + 1} ({phase.trainable}): the loss became NaN/Inf at epoch "
                f"{guard.where[0]}, step {guard.where[1]}. The learning rate ({phase.lr:g}) is "
                f"the usual cause: lower it (try `restransfer lr-find`) or set gradient_clip."
            )
        if stopping is not None and stopping.best_epoch is not None and stopping.best_weights is not None:
            kept = {"phase": index + 1, "kept_epoch": int(stopping.best_epoch) + 1, "monitor": objective.monitor,
                    "value": float(stopping.best),
                    "stopped_after_epoch": int(stopping.stopped_epoch) + 1 if stopping.stopped_epoch else None}
            history.kept.append(kept)
            if mode != SILENT:
                print(describe_kept(kept, patience))
        logs = result.history
        if resuming:  # killed after the phase's last epoch, fit runs no epoch and logs nothing
            logs = {k: resumed_logs.get(k, []) + list(result.history.get(k, []))
                    for k in {**resumed_logs, **result.history}}
        history.add(phase, logs)
        if checkpointer is not None:
            checkpointer.save(model, {"phase": index + 1, "phase_start_epoch": history.epochs,
                                      "epoch": history.epochs, "phase_complete": True,
                                      "history": history.to_dict()})
    return history
