"""Labels, losses, metrics and compiling a model for a phase."""

from __future__ import annotations

import keras

from restransfer import devices


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
                  focal_gamma: float | None = None, steps_per_execution: int | None = None) -> None:
    """``steps_per_execution``: default 8 on a GPU (several steps per call keep it fed), 1
    elsewhere; Keras' jit_compile="auto" turns XLA on there and leaves it off on CPUs (where
    it measured ~2x slower here)."""
    loss, metrics = loss_and_metrics(multi_label, label_smoothing, focal_gamma)
    if steps_per_execution is None:
        steps_per_execution = 8 if devices.gpu_count() else 1
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics, steps_per_execution=steps_per_execution)


def apply_mixup(ds, alpha: float, seed: int, phase_index: int = 0, first_step: int = 0):
    """MixUp (Zhang et al. 2018) on batched (images, one-hot labels): each batch mixed with a
    permutation of itself, lambda ~ Beta(alpha, alpha) per image.

    The draws of batch ``first_step + i`` come from (seed, phase, step) alone, so a resumed
    epoch sees exactly the mixes an uninterrupted run saw. (Keras' ``MixUp`` layer draws from
    a stateful generator that a new phase or a resumed process would restart.)"""
    if not alpha:
        return ds
    import tensorflow as tf

    def mix(step, batch):
        images, labels = batch
        key = tf.stack([tf.constant(seed * 1009 + phase_index, tf.int64), step])
        keys = tf.random.experimental.stateless_split(key, 3)
        count = tf.shape(images)[0]
        a = tf.random.stateless_gamma([count], keys[0], alpha)
        b = tf.random.stateless_gamma([count], keys[1], alpha)
        share = a / (a + b)
        partner = tf.argsort(tf.random.stateless_uniform([count], keys[2]))
        images = tf.cast(images, tf.float32)
        labels = tf.cast(labels, tf.float32)
        image_share = tf.reshape(share, [-1, 1, 1, 1])
        return (images * image_share + tf.gather(images, partner) * (1 - image_share),
                labels * share[:, None] + tf.gather(labels, partner) * (1 - share[:, None]))

    return ds.enumerate(start=first_step).map(mix, num_parallel_calls=tf.data.AUTOTUNE)
