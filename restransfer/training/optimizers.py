"""Optimizers with per-stage (discriminative) learning rates, built for a phase."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from restransfer.models import stages as stages_lib
from restransfer.training.phases import Phase
from restransfer.training.schedules import learning_rate

# No decay on BatchNorm scale/offset or biases (the usual AdamW practice).
NO_DECAY_NAMES = ("bias", "gamma", "beta")


def _with_lr_multipliers(base):
    """An optimizer class whose update of each variable uses ``lr * multiplier[variable]``.

    Keras 3 has no per-layer learning rates (keras-team/keras#21741). Scaling the rate
    inside ``update_step`` is exact for every optimizer (Adam's update is linear in the
    rate; scaling gradients instead would be undone by Adam's normalisation). Decoupled
    weight decay (AdamW) still uses the base rate.

    ``no_decay_names``: variables whose name contains one of these get no weight decay. It
    is part of the optimizer's config (Keras' ``exclude_from_weight_decay`` is not), so a
    checkpoint reloads with the same exclusions.
    """

    class StageRateOptimizer(base):
        def __init__(self, *args, lr_multipliers=None, no_decay_names=(), **kwargs):
            super().__init__(*args, **kwargs)
            self.lr_multipliers = dict(lr_multipliers or {})
            self.no_decay_names = list(no_decay_names)
            if self.no_decay_names:
                self.exclude_from_weight_decay(var_names=self.no_decay_names)

        def build(self, variables):
            super().build(variables)
            self._multiplier_by_index = [float(self.lr_multipliers.get(v.path, 1.0)) for v in variables]

        def update_step(self, gradient, variable, learning_rate):
            multiplier = self._multiplier_by_index[self._get_variable_index(variable)]
            if multiplier != 1.0:
                learning_rate = learning_rate * multiplier
            if fused_adam_step(self, gradient, variable, learning_rate):
                return None
            return super().update_step(gradient, variable, learning_rate)

        def get_config(self):
            return {**super().get_config(), "lr_multipliers": self.lr_multipliers,
                    "no_decay_names": self.no_decay_names}

    StageRateOptimizer.__name__ = f"StageRate{base.__name__}"
    return keras.saving.register_keras_serializable(package="restransfer")(StageRateOptimizer)


def fused_adam_step(optimizer, gradient, variable, learning_rate) -> bool:
    """Adam's update of one variable as TensorFlow's one fused kernel (``ResourceApplyAdam``);
    False where it does not apply (not Adam, AMSGrad, sparse gradients, a non-float variable).

    Keras 3 writes the update as ~40 graph ops per variable: half of a ResNet-18 training
    step's graph, which every phase traces and optimises anew, and as many small kernel
    launches every step. The kernel computes Keras' own formula (alpha = lr * sqrt(1 - b2^t) /
    (1 - b1^t); m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2); var -= m * alpha / (sqrt(v) +
    eps)); AdamW's decoupled decay and EMA stay with Keras, outside the update step.
    """
    if (not isinstance(optimizer, keras.optimizers.Adam) or optimizer.amsgrad
            or isinstance(gradient, tf.IndexedSlices) or variable.dtype not in (tf.float32, tf.float64)):
        return False
    dtype = variable.dtype
    beta_1, beta_2, beta_1_power, beta_2_power, epsilon = _adam_scalars(optimizer, dtype)
    index = optimizer._get_variable_index(variable)
    tf.raw_ops.ResourceApplyAdam(
        var=variable.handle, m=optimizer._momentums[index].value.handle,
        v=optimizer._velocities[index].value.handle, beta1_power=beta_1_power, beta2_power=beta_2_power,
        lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2, epsilon=epsilon,
        grad=tf.cast(gradient, dtype), use_locking=False)
    return True


def _adam_scalars(optimizer, dtype):
    """beta_1, beta_2, their powers at this step and epsilon: made once per traced graph (not
    once per variable); made anew on every eager call, where a kept tensor would be stale."""
    graph = tf.compat.v1.get_default_graph() if tf.inside_function() else None
    kept = getattr(optimizer, "_restransfer_adam_scalars", None)
    if graph is not None and kept is not None and kept[0] is graph and dtype in kept[1]:
        return kept[1][dtype]
    step = tf.cast(optimizer.iterations + 1, dtype)
    beta_1, beta_2 = tf.cast(optimizer.beta_1, dtype), tf.cast(optimizer.beta_2, dtype)
    scalars = (beta_1, beta_2, tf.pow(beta_1, step), tf.pow(beta_2, step), tf.cast(optimizer.epsilon, dtype))
    if graph is not None:
        by_dtype = kept[1] if kept is not None and kept[0] is graph else {}
        by_dtype[dtype] = scalars
        optimizer._restransfer_adam_scalars = (graph, by_dtype)
    return scalars


StageRateAdam = _with_lr_multipliers(keras.optimizers.Adam)
StageRateAdamW = _with_lr_multipliers(keras.optimizers.AdamW)
StageRateSGD = _with_lr_multipliers(keras.optimizers.SGD)


def unwrapped(optimizer):
    """The optimizer itself: under ``mixed_float16`` Keras wraps it in a ``LossScaleOptimizer``,
    whose own ``use_ema`` is False and which holds no EMA weights; read optimizer state here."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def ema_weights(model) -> list | None:
    """The model's weights with each trained variable's exponential moving average in place of
    its raw value (None when its optimizer keeps no EMA)."""
    optimizer = unwrapped(model.optimizer)
    if not getattr(optimizer, "use_ema", False) or not getattr(optimizer, "_model_variables_moving_average", None):
        return None
    averages = {id(v): a for v, a in zip(optimizer._trainable_variables, optimizer._model_variables_moving_average)}
    return [np.asarray(averages[id(w)]) if id(w) in averages else np.asarray(w) for w in model.weights]


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
                  global_clipnorm=phase.gradient_clip,
                  no_decay_names=NO_DECAY_NAMES if phase.weight_decay else ())
    if phase.optimizer == "sgd":
        optimizer = StageRateSGD(momentum=0.9, nesterov=True,
                                 weight_decay=phase.weight_decay or None, **common)
    elif phase.optimizer == "adamw":
        optimizer = StageRateAdamW(weight_decay=phase.weight_decay, **common)
    else:
        optimizer = StageRateAdam(**common)
    return optimizer
