"""Learning-rate range test (Smith 2015; fastai's ``lr_find``).

Trains the phase's trainable set for a few hundred steps while the rate grows
exponentially, records the loss, and suggests a rate. The model's weights are restored
afterwards, so the test leaves no trace.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from restransfer.models import stages as stages_lib
from restransfer.training.loop import build_before_tracing
from restransfer.training.phases import Phase
from restransfer.training.objectives import Objective
from restransfer.training.optimizers import make_optimizer


@dataclasses.dataclass
class LRFinderResult:
    learning_rates: list[float]
    losses: list[float]
    smoothed: list[float]
    steepest: float  # rate where the smoothed loss falls fastest
    valley: float    # fastai-style: a tenth of the rate at the smoothed minimum

    def plot(self, path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6, 4))
        axes.plot(self.learning_rates, self.losses, alpha=0.3, label="loss")
        axes.plot(self.learning_rates, self.smoothed, label="smoothed")
        for rate, name, colour in ((self.steepest, "steepest", "C2"), (self.valley, "valley", "C3")):
            axes.axvline(rate, color=colour, linestyle="--", label=f"{name} {rate:.1e}")
        axes.set_xscale("log")
        axes.set_xlabel("learning rate")
        axes.set_ylabel("training loss")
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)


class _ExponentialRate(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, start, end, steps):
        self.start, self.factor = start, (end / start) ** (1.0 / max(1, steps - 1))

    def __call__(self, step):
        return self.start * keras.ops.power(self.factor, keras.ops.cast(step, "float32"))


class _RecordLoss(keras.callbacks.Callback):
    def __init__(self, stop_factor):
        super().__init__()
        self.losses, self.best, self.stop_factor = [], math.inf, stop_factor

    def on_train_batch_end(self, batch, logs=None):
        # Keras reports the running mean over the epoch; we need each batch's own loss.
        mean = float(logs["loss"])
        count = len(self.losses) + 1
        loss = mean * count - sum(self.losses) if self.losses else mean
        self.losses.append(loss)
        self.best = min(self.best, loss)
        if not np.isfinite(loss) or loss > self.stop_factor * self.best:
            self.model.stop_training = True


def smooth(values, beta=0.98):
    """Bias-corrected exponential moving average (as in fastai)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta ** i))
    return out


def find_lr(model, train_ds, phase: Phase, objective: Objective, min_lr: float = 1e-7, max_lr: float = 1.0,
            steps: int = 200, stop_factor: float = 4.0) -> LRFinderResult:
    """Runs the range test on ``phase.trainable`` with the task's ``objective`` (its targets
    and loss) and restores the model's weights."""
    saved = [np.copy(w) for w in model.get_weights()]
    trainable_before = [layer.trainable for layer in stages_lib.iter_layers(model)]
    try:
        stages_lib.set_trainable_stages(model, stages_lib.parse_stages(phase.trainable),
                                        train_bn=phase.train_bn)
        sweep = phase.model_copy(update={"schedule": "constant", "lr": 1.0, "ema": False})
        optimizer = make_optimizer(model, sweep, steps_per_epoch=steps)
        optimizer.learning_rate = _ExponentialRate(min_lr, max_lr, steps)
        objective.compile(model, optimizer, sweep, steps_per_execution=1)  # one loss per batch
        data = objective.targets(train_ds).repeat()
        build_before_tracing(model, data)  # the sweep's step is traced once, not twice
        recorder = _RecordLoss(stop_factor)
        model.fit(data, steps_per_epoch=steps, epochs=1, callbacks=[recorder],
                  verbose=0, shuffle=False)
    finally:
        model.set_weights(saved)
        for layer, flag in zip(stages_lib.iter_layers(model), trainable_before):
            layer.trainable = flag
    losses = recorder.losses
    rates = [min_lr * (max_lr / min_lr) ** (i / max(1, steps - 1)) for i in range(len(losses))]
    smoothed = smooth(losses)
    steepest, valley = suggestions(rates, smoothed)
    return LRFinderResult(rates, losses, smoothed, steepest=steepest, valley=valley)


def suggestions(rates, smoothed) -> tuple[float, float]:
    """(steepest, valley) from a smoothed loss curve: the rate where the loss falls fastest
    (per decade of rate) before its minimum, and a tenth of the rate at the minimum."""
    finite = [i for i, v in enumerate(smoothed) if np.isfinite(v)]
    lowest = min(finite, key=lambda i: smoothed[i])
    gradients = np.gradient(np.asarray([smoothed[i] for i in finite]), np.log([rates[i] for i in finite]))
    steepest = rates[finite[int(np.argmin(gradients[: max(1, finite.index(lowest) + 1)]))]]
    return steepest, rates[lowest] / 10
