"""Training on several devices or machines with TensorFlow's tf.distribute.

``distribute``:
  * ``none``: the default device.
  * ``mirrored``: MirroredStrategy over this machine's GPUs (or its logical CPU devices
    when it has no GPU and several were configured); Keras ``fit`` runs it.
  * ``multi_worker``: MultiWorkerMirroredStrategy over the machines named by ``TF_CONFIG``
    (or by SLURM's environment under ``srun``). Keras 3's ``fit`` fails under it
    (keras-team/keras#20585), so :func:`fit_multi_worker` is restransfer's own loop:
    ``strategy.run`` in a ``tf.function``, the loss divided by the global batch, metrics
    computed on predictions gathered from every replica, Keras callbacks driven as ``fit``
    drives them.
  * ``auto``: ``mirrored`` when more than one GPU is visible, else ``none``.

Batch size and learning rate: ``batch_size`` is per replica, so the global batch is
``batch_size x replicas``; with ``lr_scaling: linear`` every learning rate is multiplied by
the number of replicas (Goyal et al. 2017), with ``none`` it is left as written.

BatchNorm: by default each replica normalises with its own batch's statistics (as Keras
``fit`` under a strategy does; cheap, but not what one device with the global batch
computes), and the moving averages are averaged over all replicas at the end of every
epoch, so every worker holds the same weights when they are checkpointed, validated or
saved. ``sync_batchnorm=True`` normalises with the global batch's statistics instead
(Keras' ``synchronized`` BatchNormalization: one all-reduce per BatchNorm layer and step),
which matches single-device training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import keras
import numpy as np

from restransfer import devices
from restransfer.graph import traced

STRATEGIES = ("auto", "none", "mirrored", "multi_worker")
LR_SCALING = ("linear", "none")

# A process can create MultiWorkerMirroredStrategy once, before any other TensorFlow op runs
# (it configures the collective runtime); later calls must get the same object.
_STRATEGIES: dict[str, object] = {}


def cluster_resolver():
    """TF_CONFIG's cluster, else SLURM's (under ``srun``); an error that says how otherwise."""
    import tensorflow as tf

    if os.environ.get("TF_CONFIG"):
        try:
            json.loads(os.environ["TF_CONFIG"])
        except ValueError as error:
            raise ValueError(f"TF_CONFIG is not valid JSON: {error}") from None
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if "SLURM_PROCID" in os.environ:
        return tf.distribute.cluster_resolver.SlurmClusterResolver(
            port_base=int(os.environ.get("RESTRANSFER_PORT_BASE", "8888")))
    raise RuntimeError("distribute: multi_worker needs a cluster: set TF_CONFIG on every worker "
                       "(see README, 'Several machines') or launch the workers with srun under SLURM")


def get_strategy(name: str = "auto"):
    """The tf.distribute strategy for ``name``, or None for a single device."""
    import tensorflow as tf

    if name not in STRATEGIES:
        raise ValueError(f"distribute must be one of {', '.join(STRATEGIES)}; got {name!r}")
    if name == "auto":
        name = "mirrored" if devices.gpu_count() > 1 else "none"
    if name == "none":
        return None
    if name not in _STRATEGIES:
        if name == "mirrored":
            # this machine's GPUs; without GPUs, the logical CPU devices someone configured
            # (tf.config.set_logical_device_configuration; how the tests simulate two GPUs)
            cpus = None
            if not devices.gpu_count() and len(tf.config.list_logical_devices("CPU")) > 1:
                cpus = [device.name for device in tf.config.list_logical_devices("CPU")]
            _STRATEGIES[name] = tf.distribute.MirroredStrategy(cpus)
        else:
            _STRATEGIES[name] = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=cluster_resolver())
    return _STRATEGIES[name]


def scope(strategy):
    """The strategy's scope, or a no-op context for a single device (None)."""
    import contextlib

    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def is_multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


@dataclasses.dataclass(frozen=True)
class Worker:
    """Where this process stands in the cluster."""

    index: int = 0          # 0 is the chief
    count: int = 1
    replicas: int = 1       # in the whole cluster

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    @property
    def local_replicas(self) -> int:
        return self.replicas // self.count


def worker(strategy) -> Worker:
    """This process's place: with a ``chief`` task it is the chief, else worker 0 is."""
    if strategy is None:
        return Worker()
    if not is_multi_worker(strategy):
        return Worker(replicas=strategy.num_replicas_in_sync)
    resolver = strategy.cluster_resolver
    jobs = resolver.cluster_spec().as_dict()
    chiefs, workers = len(jobs.get("chief", [])), len(jobs.get("worker", []))
    index = resolver.task_id + (chiefs if resolver.task_type == "worker" else 0)
    return Worker(index=index, count=chiefs + workers, replicas=strategy.num_replicas_in_sync)


def scale_learning_rates(phases, factor: float):
    """Phases with every rate (base and explicit per-stage) multiplied by ``factor``."""
    if factor == 1:
        return list(phases)
    return [phase.model_copy(update={
        "lr": phase.lr * factor,
        "stage_lrs": {k: v * factor for k, v in phase.stage_lrs.items()} if phase.stage_lrs else None,
    }) for phase in phases]


# --- BatchNorm statistics -------------------------------------------------------------------


def _batchnorm_layers(model):
    from restransfer.models.stages import iter_layers

    return [layer for layer in iter_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]


def synchronize_batchnorm(model, synchronized: bool) -> None:
    """Global-batch (True) or per-replica (False) BatchNorm statistics in training mode."""
    for layer in _batchnorm_layers(model):
        layer.synchronized = synchronized


def _batchnorm_statistics(model):
    return [v for layer in _batchnorm_layers(model) for v in (layer.moving_mean, layer.moving_variance)]


def batchnorm_averager(model, strategy):
    """A function that replaces every replica's BatchNorm moving statistics by their mean
    over all replicas (one all-reduce; every worker must call it at the same point)."""
    import tensorflow as tf

    statistics = _batchnorm_statistics(model)

    def average():
        context = tf.distribute.get_replica_context()
        means = context.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in statistics])
        for variable, mean in zip(statistics, means):
            variable.assign(mean)

    run = traced(lambda: strategy.run(average))
    return run if statistics else (lambda: None)


class AverageBatchNormStatistics(keras.callbacks.Callback):
    """For Keras ``fit`` under MirroredStrategy: the same averaging, before validation (as
    in :func:`fit_multi_worker`) and at the end of the epoch (when there is none)."""

    def __init__(self, model, strategy):
        super().__init__()
        self.average = batchnorm_averager(model, strategy)

    def on_test_begin(self, logs=None):
        self.average()

    def on_epoch_end(self, epoch, logs=None):
        self.average()


# --- the multi-worker training loop ---------------------------------------------------------


class WorkerLost(RuntimeError):
    """A collective operation failed: a worker died or became unreachable."""


def _class_weight_table(class_weight, num_classes):
    if not class_weight:
        return None
    return np.array([float(class_weight.get(i, 1.0)) for i in range(num_classes)], "float32")


def fit_multi_worker(strategy, model, train_ds, *, loss, metrics, epochs, initial_epoch,
                     steps_per_epoch, validation_data=None, val_metrics=None, callbacks=(),
                     class_weight=None, verbose="auto"):
    """``model.fit`` for MultiWorkerMirroredStrategy; returns a Keras ``History``.

    ``train_ds``: this worker's (already sharded) endless dataset of per-replica batches;
    ``loss``: a Keras loss whose ``call`` gives per-example values; ``metrics`` and
    ``val_metrics``: fresh Keras metrics, created outside the strategy's scope (they are
    updated with values already gathered from every replica, so every worker computes the
    same numbers). Validation runs on each worker over the whole validation set (the
    weights are identical everywhere, so the numbers are too); early stopping therefore
    decides the same on every worker.
    """
    import tensorflow as tf

    # One input pipeline per worker, already sharded (by file) and batched per replica; the
    # worker's replicas take consecutive batches. (experimental_distribute_dataset would
    # treat the batch as global and split it again.)
    iterator = iter(strategy.distribute_datasets_from_function(lambda context: train_ds))
    optimizer = model.optimizer
    if not optimizer.built:  # its variables now, not while the step is traced (which would trace it twice)
        with strategy.scope():
            optimizer.build(model.trainable_variables)
    weights_by_class = _class_weight_table(class_weight, model.output_shape[-1])
    loss_mean, val_loss_mean = keras.metrics.Mean(name="loss"), keras.metrics.Mean(name="loss")
    average_statistics = batchnorm_averager(model, strategy)

    def replica_step(images, labels):
        context = tf.distribute.get_replica_context()
        labels = tf.cast(labels, "float32")
        global_count = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(tf.shape(images)[0], "float32"))
        with tf.GradientTape() as tape:
            probabilities = tf.cast(model(images, training=True), "float32")
            per_example = loss.call(labels, probabilities)
            if weights_by_class is not None:
                per_example = per_example * tf.gather(weights_by_class, tf.argmax(labels, axis=-1))
            # Divided by the global count, the all-reduced (summed) gradients are the mean
            # gradient over the global batch: what one device with that batch would compute.
            value = tf.reduce_sum(per_example) / tf.maximum(global_count, 1.0)
            if model.losses:
                value += tf.add_n(model.losses) / strategy.num_replicas_in_sync
            scaled = optimizer.scale_loss(value) if hasattr(optimizer, "scale_loss") else value
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return value, global_count, labels, probabilities

    @traced
    def train_step(iterator):
        value, count, labels, probabilities = strategy.run(replica_step, args=next(iterator))
        value = strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
        count = strategy.experimental_local_results(count)[0]
        labels, probabilities = strategy.gather(labels, axis=0), strategy.gather(probabilities, axis=0)
        loss_mean.update_state(value, sample_weight=count)
        for metric in metrics:
            metric.update_state(labels, probabilities)

    @traced
    def val_step(images, labels):
        labels = tf.cast(labels, "float32")
        probabilities = tf.cast(model(images, training=False), "float32")
        val_loss_mean.update_state(loss.call(labels, probabilities))
        for metric in val_metrics:
            metric.update_state(labels, probabilities)

    def results(loss_metric, metric_list, prefix=""):
        return {prefix + m.name: float(m.result()) for m in [loss_metric, *metric_list]}

    callback_list = keras.callbacks.CallbackList(
        list(callbacks), add_history=True, add_progbar=verbose != 0, model=model,
        verbose=1 if verbose == "auto" else verbose, epochs=epochs, steps=steps_per_epoch)
    model.stop_training = False
    callback_list.on_train_begin()
    logs = {}
    for epoch in range(initial_epoch, epochs):
        for metric in [loss_mean, *metrics]:
            metric.reset_state()
        callback_list.on_epoch_begin(epoch)
        try:
            for step in range(steps_per_epoch):
                callback_list.on_train_batch_begin(step)
                train_step(iterator)
                logs = results(loss_mean, metrics)
                callback_list.on_train_batch_end(step, logs)
                if model.stop_training:
                    break
            average_statistics()
        except tf.errors.OpError as error:  # a collective failed: another worker is gone
            raise WorkerLost(
                f"epoch {epoch + 1}: lost contact with another worker ({type(error).__name__}: "
                f"{str(error).strip().splitlines()[0]}). Restart every worker with the same "
                f"command and --resume: training continues from the last saved epoch.") from error
        if validation_data is not None:
            for metric in [val_loss_mean, *val_metrics]:
                metric.reset_state()
            callback_list.on_test_begin()  # as fit: SwapEMAWeights validates the EMA weights
            for images, labels in validation_data:
                val_step(images, labels)
            val_logs = results(val_loss_mean, val_metrics, "val_")
            callback_list.on_test_end(val_logs)
            logs = {**logs, **val_logs}
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    optimizer.finalize_variable_values(model.trainable_weights)  # EMA weights swapped in, as fit does
    callback_list.on_train_end(logs)
    return next(c for c in callback_list.callbacks if isinstance(c, keras.callbacks.History))


def copy_model(model, strategy=None):
    """The model rebuilt with the same weights, under ``strategy`` or (None) on one device:
    after distributed training, evaluation, prediction, saving and export use the latter."""
    with scope(strategy):
        copy = keras.Model.from_config(model.get_config())
        copy.set_weights(model.get_weights())
    return copy


def steps_per_epoch(examples: int, batch_size: int, worker_info: Worker) -> int:
    """Steps per epoch, the same on every worker: each worker's shard has ``examples //
    workers`` images per epoch (the few left over differ from epoch to epoch)."""
    per_worker = examples // worker_info.count
    return max(1, math.ceil(per_worker / (batch_size * worker_info.local_replicas)))
