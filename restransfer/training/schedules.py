"""Learning-rate schedules for a phase; each is a function of the optimizer's step counter,
which is saved with the optimizer, so a checkpoint carries the schedule's state."""

from __future__ import annotations

import math

import keras

from restransfer.training.phases import Phase


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
