"""Fine-tuning phases: what is trainable, for how long, at which learning rate.

A recipe is a list of :class:`Phase`. Each phase sets the trainable stages, compiles a fresh
optimizer (so a change of trainable state can never meet a stale compiled step), and runs
Keras ``fit`` with early stopping on the validation metric.
"""

from __future__ import annotations

import dataclasses
import math

import keras

from restransfer import stages as stages_lib

SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass
class Phase:
    """One fine-tuning phase.

    Attributes:
        trainable: ``"head"``, ``"all"``, a stage (``"stage4"``) or ``"stage3+"``.
        epochs: epochs in this phase (early stopping may end it sooner).
        lr: peak learning rate.
        schedule: ``"constant"`` or ``"cosine"`` (decay to 0 over the phase, after warmup).
        warmup_epochs: linear warmup from 0 to ``lr``.
        train_bn: keep BatchNorm of frozen stages trainable (default: inference mode).
    """

    trainable: str = "head"
    epochs: int = 3
    lr: float = 1e-3
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    train_bn: bool = False

    def __post_init__(self):
        stages_lib.parse_stages(self.trainable)  # raises on a bad spec
        if self.epochs < 0:
            raise ValueError(f"Phase.epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"Phase.lr must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Phase.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup_epochs < 0:
            raise ValueError(f"Phase.warmup_epochs must be >= 0, got {self.warmup_epochs}")


def default_phases(epochs: int = 3) -> list[Phase]:
    """Head only with the backbone frozen, then everything at a 10x lower rate."""
    return [
        Phase(trainable="head", epochs=epochs, lr=1e-3, schedule="cosine"),
        Phase(trainable="all", epochs=epochs, lr=1e-4, schedule="cosine", warmup_epochs=0.5),
    ]


def learning_rate(phase: Phase, steps_per_epoch: int):
    """A Keras schedule (or float) for the phase."""
    total = max(1, int(phase.epochs * steps_per_epoch))
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


@dataclasses.dataclass
class TrainingHistory:
    """Per-epoch metrics across all phases, with where each phase started."""

    history: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    phase_starts: list[int] = dataclasses.field(default_factory=list)
    phases: list[Phase] = dataclasses.field(default_factory=list)

    def add(self, phase: Phase, keras_history: keras.callbacks.History) -> None:
        epochs_so_far = len(next(iter(self.history.values()), []))
        self.phase_starts.append(epochs_so_far)
        self.phases.append(phase)
        for key, values in keras_history.history.items():
            column = self.history.setdefault(key, [math.nan] * epochs_so_far)
            column.extend(float(v) for v in values)
        for column in self.history.values():  # metrics absent in this phase
            column.extend([math.nan] * (epochs_so_far + len(keras_history.epoch) - len(column)))

    @property
    def epochs(self) -> int:
        return len(next(iter(self.history.values()), []))


def compile_model(model: keras.Model, lr, multi_label: bool, jit_compile=False) -> None:
    if multi_label:
        loss = keras.losses.BinaryCrossentropy()
        metrics = [keras.metrics.BinaryAccuracy(name="accuracy"),
                   keras.metrics.AUC(multi_label=True, name="auc")]
    else:
        loss = keras.losses.SparseCategoricalCrossentropy()
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss=loss,
                  metrics=metrics, jit_compile=jit_compile)


def run_phases(
    model: keras.Model,
    phases: list[Phase],
    train_ds,
    val_ds,
    steps_per_epoch: int,
    multi_label: bool,
    patience: int | None = 3,
    callbacks=None,
    verbose="auto",
) -> TrainingHistory:
    history = TrainingHistory()
    epoch = 0
    monitor = "val_auc" if multi_label else "val_accuracy"
    for index, phase in enumerate(phases):
        if phase.epochs == 0:
            continue
        stages_lib.set_trainable_stages(
            model, stages_lib.parse_stages(phase.trainable), train_bn=phase.train_bn
        )
        compile_model(model, learning_rate(phase, steps_per_epoch), multi_label)
        phase_callbacks = list(callbacks or [])
        if patience and val_ds is not None:
            phase_callbacks.append(
                keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=patience,
                                              restore_best_weights=True)
            )
        if verbose:
            print(f"phase {index + 1}/{len(phases)}: trainable={phase.trainable} "
                  f"epochs={phase.epochs} lr={phase.lr:g} schedule={phase.schedule}")
        result = model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=epoch + phase.epochs,
            initial_epoch=epoch,
            callbacks=phase_callbacks,
            shuffle=False,  # pipelines shuffle themselves, seeded
            verbose=verbose,
        )
        history.add(phase, result)
        epoch += len(result.epoch)
    return history
