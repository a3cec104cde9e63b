"""Running fine-tuning phases: schedules, per-stage learning rates, the fit loop.

Each phase sets the trainable stages, compiles a fresh optimizer (so a change of trainable
state can never meet a stale compiled step), and runs Keras ``fit`` with early stopping on
the validation metric. The schedule is a function of the optimizer's step counter, which
is saved with the optimizer, so a checkpoint carries the schedule's state.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from restransfer import stages as stages_lib
from restransfer.phases import Phase


# --- schedules -----------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="restransfer")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """fastai/Smith one-cycle: cosine warm-up from max_lr/div to max_lr over ``pct_start``
    of the steps, then cosine annealing to max_lr/final_div."""

    def __init__(self, max_lr, total_steps, pct_start=0.3, div=25.0, final_div=1e4):
        self.max_lr, self.total_steps = float(max_lr), int(total_steps)
        self.pct_start, self.div, self.final_div = float(pct_start), float(div), float(final_div)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warm = max(1.0, self.pct_start * self.total_steps)
        cool = max(1.0, self.total_steps - warm)

        def cosine(start, end, fraction):
            fraction = keras.ops.clip(fraction, 0.0, 1.0)
            return end + (start - end) * (1 + keras.ops.cos(math.pi * fraction)) / 2

        up = cosine(self.max_lr / self.div, self.max_lr, step / warm)
        down = cosine(self.max_lr, self.max_lr / self.final_div, (step - warm) / cool)
        return keras.ops.where(step < warm, up, down)

    def get_config(self):
        return {"max_lr": self.max_lr, "total_steps": self.total_steps, "pct_start": self.pct_start,
                "div": self.div, "final_div": self.final_div}


def learning_rate(phase: Phase, steps_per_epoch: int):
    """A Keras schedule (or float) for the phase's base rate."""
    total = max(1, int(phase.epochs * steps_per_epoch))
    if phase.schedule == "one_cycle":
        return OneCycle(phase.lr, total)
    if phase.schedule == "step":
        boundaries = list(range(phase.step_epochs * steps_per_epoch, total, phase.step_epochs * steps_per_epoch))
        values = [phase.lr * phase.step_gamma ** i for i in range(len(boundaries) + 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values) if boundaries else phase.lr
    warmup = min(total - 1, int(round(phase.warmup_epochs * steps_per_epoch)))
    if phase.schedule == "constant" and warmup == 0:
        return phase.lr
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else phase.lr,
        decay_steps=max(1, total - warmup),
        alpha=1.0 if phase.schedule == "constant" else 0.0,  # alpha=1: no decay
        warmup_target=phase.lr if warmup else None,
        warmup_steps=warmup,
    )


# --- per-stage learning rates --------------------------------------------------------------


def _with_lr_multipliers(base):
    """An optimizer class whose update of each variable uses ``lr * multiplier[variable]``.

    Keras 3 has no per-layer learning rates (keras-team/keras#21741). Scaling the rate
    inside ``update_step`` is exact for every optimizer (Adam's update is linear in the
    rate; scaling gradients instead would be undone by Adam's normalisation). Decoupled
    weight decay (AdamW) still uses the base rate.
    """

    class StageRateOptimizer(base):
        def __init__(self, *args, lr_multipliers=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.lr_multipliers = dict(lr_multipliers or {})

        def build(self, variables):
            super().build(variables)
            self._multiplier_by_index = [float(self.lr_multipliers.get(v.path, 1.0)) for v in variables]

        def update_step(self, gradient, variable, learning_rate):
            multiplier = self._multiplier_by_index[self._get_variable_index(variable)]
            if multiplier != 1.0:
                learning_rate = learning_rate * multiplier
            return super().update_step(gradient, variable, learning_rate)

        def get_config(self):
            return {**super().get_config(), "lr_multipliers": self.lr_multipliers}

    StageRateOptimizer.__name__ = f"StageRate{base.__name__}"
    return keras.saving.register_keras_serializable(package="restransfer")(StageRateOptimizer)


StageRateAdam = _with_lr_multipliers(keras.optimizers.Adam)
StageRateAdamW = _with_lr_multipliers(keras.optimizers.AdamW)
StageRateSGD = _with_lr_multipliers(keras.optimizers.SGD)


def lr_multipliers(model: keras.Model, phase: Phase) -> dict[str, float]:
    """variable path -> rate relative to the head, for the phase's trainable stages."""
    rates = phase.stage_learning_rates()
    multipliers = {}
    for stage, layers in stages_lib.stage_layers(model).items():
        if stage in rates and rates[stage] != phase.lr:
            for layer in layers:
                for variable in layer.trainable_weights:
                    multipliers[variable.path] = rates[stage] / phase.lr
    return multipliers


def make_optimizer(model: keras.Model, phase: Phase, steps_per_epoch: int):
    lr = learning_rate(phase, steps_per_epoch)
    common = dict(learning_rate=lr, lr_multipliers=lr_multipliers(model, phase), use_ema=phase.ema,
                  global_clipnorm=phase.gradient_clip)
    if phase.optimizer == "sgd":
        optimizer = StageRateSGD(momentum=0.9, nesterov=True,
                                 weight_decay=phase.weight_decay or None, **common)
    elif phase.optimizer == "adamw":
        optimizer = StageRateAdamW(weight_decay=phase.weight_decay, **common)
    else:
        optimizer = StageRateAdam(**common)
    if phase.weight_decay:
        # No decay on BatchNorm scale/offset or biases (the usual AdamW practice).
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


# --- labels, metrics, compile --------------------------------------------------------------


def one_hot_labels(ds, num_classes: int):
    """Batched (images, class ids) -> (images, one-hot); already one-hot data is unchanged.
    Single-label training always uses one-hot targets so smoothing and MixUp apply."""
    import tensorflow as tf

    label_shape = ds.element_spec[1].shape
    if label_shape.rank == 2 and label_shape[-1] == num_classes and num_classes > 1:
        return ds
    return ds.map(lambda x, y: (x, tf.one_hot(tf.reshape(tf.cast(y, tf.int32), [-1]), num_classes)))


def loss_and_metrics(multi_label: bool, label_smoothing: float = 0.0, focal_gamma: float | None = None):
    """Cross-entropy (softmax or per-label sigmoid), or focal loss when ``focal_gamma`` is
    set (down-weights easy examples; for imbalanced data); and the metrics to report."""
    if multi_label:
        loss = (keras.losses.BinaryFocalCrossentropy(gamma=focal_gamma) if focal_gamma
                else keras.losses.BinaryCrossentropy())
        metrics = [keras.metrics.BinaryAccuracy(name="accuracy"),
                   keras.metrics.AUC(multi_label=True, name="auc")]
    else:
        loss = (keras.losses.CategoricalFocalCrossentropy(gamma=focal_gamma, label_smoothing=label_smoothing)
                if focal_gamma else keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing))
        metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    return loss, metrics


def compile_model(model, optimizer, multi_label: bool, label_smoothing: float = 0.0,
                  focal_gamma: float | None = None) -> None:
    loss, metrics = loss_and_metrics(multi_label, label_smoothing, focal_gamma)
    # On a GPU, run several steps per call to keep it fed; Keras' jit_compile="auto" turns
    # XLA on there and leaves it off on CPUs (where it measured ~2x slower here).
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics,
                  steps_per_execution=8 if _has_gpu() else 1)


def _has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def apply_mixup(ds, alpha: float, seed: int):
    if not alpha:
        return ds
    mix = keras.layers.MixUp(alpha=alpha, seed=seed)
    return ds.map(lambda x, y: tuple(mix({"images": x, "labels": y}, training=True).values()))


# --- history and the loop ------------------------------------------------------------------


@dataclasses.dataclass
class TrainingHistory:
    """Per-epoch metrics across all phases, with where each phase started."""

    history: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    phase_starts: list[int] = dataclasses.field(default_factory=list)
    phases: list[Phase] = dataclasses.field(default_factory=list)

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
                "phases": [p.model_dump() for p in self.phases]}


class Checkpointer:
    """Saves the model (with optimizer, schedule step and RNG state) and where training
    stands after every epoch, so an interrupted run continues where it stopped.

    ``last.keras`` and ``state.json`` are each written to a temporary file and renamed, and
    the state is written after the model, so the state never points past the model.

    In multi-worker training every worker reads the checkpoint (the directory must be on a
    file system they share) and only the chief (``writer=True``) writes it.
    """

    def __init__(self, directory, writer: bool = True):
        from pathlib import Path

        self.directory = Path(directory)
        self.writer = writer
        if writer:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.model_path = self.directory / "last.keras"
        self.state_path = self.directory / "state.json"

    @staticmethod
    def _seed_generators(model):
        """Dropout's random streams; Keras does not restore them from a .keras file."""
        found, stack = {}, [model]
        while stack:
            layer = stack.pop()
            generator = getattr(layer, "seed_generator", None)
            if generator is not None:  # keyed by walk order: layer paths can be empty here
                found[f"{len(found)}:{layer.name}"] = generator
            stack.extend(getattr(layer, "_layers", []))
        return found

    def save(self, model, state: dict) -> None:
        import json
        import os

        if not self.writer:
            return
        state = {**state, "rng": {path: np.asarray(g.state.value).tolist()
                                  for path, g in self._seed_generators(model).items()}}
        temporary = self.directory / ".last.keras.partial.keras"
        model.save(temporary)
        os.replace(temporary, self.model_path)
        temporary_state = self.directory / ".state.json.partial"
        temporary_state.write_text(json.dumps(state))
        os.replace(temporary_state, self.state_path)

    def load(self):
        """(model, state) of the last complete epoch, or (None, None)."""
        import json

        if not (self.model_path.is_file() and self.state_path.is_file()):
            return None, None
        state = json.loads(self.state_path.read_text())
        model = keras.saving.load_model(self.model_path, safe_mode=True)
        for path, generator in self._seed_generators(model).items():
            if path in state.get("rng", {}):
                generator.state.assign(np.asarray(state["rng"][path], dtype=generator.state.dtype))
        return model, state


class _SaveEachEpoch(keras.callbacks.Callback):
    def __init__(self, checkpointer, phase_index, phase_start, history, phases, full_model):
        super().__init__()
        self.checkpointer, self.phase_index, self.phase_start = checkpointer, phase_index, phase_start
        self.full_model = full_model  # fit may run on a head-only model (cached features)
        self.history, self.phases = history, phases
        self.logs: dict[str, list[float]] = {}

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if not all(np.isfinite(v) for v in logs.values() if isinstance(v, (int, float))):
            return  # keep the last good checkpoint
        for key, value in logs.items():
            self.logs.setdefault(key, []).append(float(value))
        partial = TrainingHistory({k: list(v) for k, v in self.history.history.items()},
                                  list(self.history.phase_starts), list(self.history.phases))
        partial.add(self.phases[self.phase_index], self.logs)
        self.checkpointer.save(self.full_model, {
            "phase": self.phase_index, "phase_start_epoch": self.phase_start, "epoch": epoch + 1,
            "phase_complete": False, "history": partial.to_dict()})


def _head_model(model):
    """features -> head: the same head layer (shared weights) without the backbone."""
    from restransfer.heads import find_head

    backbone = stages_lib.find_backbone(model)
    features = keras.Input(shape=backbone.output_shape[1:], name="features")
    return keras.Model(features, find_head(model)(features), name="head_on_features")


def _features_of(backbone, dataset):
    """Runs a finite (images, labels) dataset through the frozen backbone once."""
    import tensorflow as tf

    from restransfer.caching import _compiled

    extract = _compiled(backbone)
    features, labels = [], []
    for images, batch_labels in dataset:
        features.append(extract(images))
        labels.append(batch_labels)
    return tf.data.Dataset.from_tensor_slices((tf.concat(features, 0), tf.concat(labels, 0))) \
        .batch(int(tf.shape(features[0])[0])).cache()


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
    multi_label: bool,
    num_classes: int,
    patience: int | None = 3,
    callbacks=None,
    verbose="auto",
    seed: int = 0,
    checkpointer: Checkpointer | None = None,
    resume_state: dict | None = None,
    feature_cache=None,
    class_weight: dict | None = None,
    focal_gamma: float | None = None,
    strategy=None,
) -> TrainingHistory:
    """Runs the phases; with a ``checkpointer`` saves after every epoch and phase, and with
    ``resume_state`` (from :meth:`Checkpointer.load`, the model already loaded) continues
    from the last complete epoch with the saved optimizer and schedule. With a
    ``feature_cache`` (:class:`restransfer.caching.FeatureCache`), head-only phases train
    the head on cached backbone features instead of running the backbone every step.

    ``train_ds``: a dataset (used as given, one pass per epoch), or a function
    ``start_epoch -> endless dataset`` (restransfer's own pipelines), run for
    ``steps_per_epoch`` steps per epoch.

    ``strategy``: a tf.distribute strategy the model was built under (see
    :mod:`restransfer.distribute`); optimizers are then made in its scope, and under
    MultiWorkerMirroredStrategy restransfer's own loop replaces ``fit``. ``train_ds`` is
    then this worker's shard.
    """
    from restransfer import distribute

    multi_worker = distribute.is_multi_worker(strategy)
    history = TrainingHistory()
    start_phase, resume_epoch, resumed_logs = 0, None, {}
    if resume_state:
        saved = resume_state["history"]
        history = TrainingHistory(saved["history"], saved["phase_starts"],
                                  [Phase(**p) for p in saved["phases"]])
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

    def labelled(ds):
        return ds if multi_label or ds is None else one_hot_labels(ds, num_classes)

    val_ds = labelled(val_ds)
    monitor = "val_auc" if multi_label else "val_accuracy"
    for index in range(start_phase, len(phases)):
        phase = phases[index]
        if phase.epochs == 0:
            continue
        phase_start = history.epochs
        resuming = index == start_phase and resume_epoch is not None
        cached = (feature_cache is not None and phase.trainable == "head" and not phase.train_bn
                  and not phase.mixup and not resuming)
        if not resuming:  # a resumed phase keeps its loaded optimizer, schedule and step
            stages_lib.set_trainable_stages(
                model, stages_lib.parse_stages(phase.trainable), train_bn=phase.train_bn
            )
        fit_model = _head_model(model) if cached else model
        smoothing = phase.label_smoothing if not multi_label else 0.0
        if not resuming:
            with distribute.scope(strategy):
                compile_model(fit_model, make_optimizer(model, phase, steps_per_epoch), multi_label,
                              smoothing, focal_gamma)
        guard = StopOnNonFiniteLoss()
        phase_callbacks = list(callbacks or []) + [guard]
        if strategy is not None and not multi_worker:
            phase_callbacks.append(distribute.AverageBatchNormStatistics(model, strategy))
        saver = None
        if checkpointer is not None:
            saver = _SaveEachEpoch(checkpointer, index, phase_start, history, phases, model)
            if resuming:
                saver.logs = {k: list(v) for k, v in resumed_logs.items()}
            phase_callbacks.append(saver)
        if patience and val_ds is not None:
            phase_callbacks.append(
                keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=patience,
                                              restore_best_weights=True)
            )
        if verbose:
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
            phase_train = apply_mixup(labelled(train_for(epoch)), phase.mixup, seed)
            phase_val = val_ds
        if verbose and cached:
            print(f"  training the head on cached backbone features ({feature_cache.views} view(s))")
        if multi_worker:
            loss, metrics = loss_and_metrics(multi_label, smoothing, focal_gamma)
            result = distribute.fit_multi_worker(
                strategy, fit_model, phase_train, loss=loss, metrics=metrics,
                validation_data=phase_val, val_metrics=loss_and_metrics(multi_label)[1],
                epochs=phase_start + phase.epochs, initial_epoch=epoch,
                steps_per_epoch=steps_per_epoch, callbacks=phase_callbacks,
                class_weight=class_weight, verbose=verbose)
        else:
            result = fit_model.fit(
                phase_train,
                validation_data=phase_val,
                steps_per_epoch=steps_per_epoch if endless else None,
                epochs=phase_start + phase.epochs,
                initial_epoch=epoch,
                callbacks=phase_callbacks,
                class_weight=class_weight,
                shuffle=False,  # pipelines shuffle themselves, seeded
                verbose=verbose,
            )
        if guard.where is not None:
            raise NonFiniteLoss(
                f"phase {index + 1} ({phase.trainable}): the loss became NaN/Inf at epoch "
                f"{guard.where[0]}, step {guard.where[1]}. The learning rate ({phase.lr:g}) is "
                f"the usual cause: lower it (try `restransfer lr-find`) or set gradient_clip."
            )
        logs = result.history
        if resuming:
            logs = {k: resumed_logs.get(k, []) + list(v) for k, v in result.history.items()}
        history.add(phase, logs)
        if cached:  # the full model's compiled state must describe the full model
            compile_model(model, make_optimizer(model, phase, steps_per_epoch), multi_label,
                          focal_gamma=focal_gamma)
        if checkpointer is not None:
            checkpointer.save(model, {"phase": index + 1, "phase_start_epoch": history.epochs,
                                      "epoch": history.epochs, "phase_complete": True,
                                      "history": history.to_dict()})
    return history
