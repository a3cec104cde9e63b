"""Labels, losses and metrics of classification and segmentation, and MixUp."""

from __future__ import annotations

import keras

from restransfer.graph import plain


def one_hot_labels(ds, num_classes: int):
    """Batched (images, class ids) -> (images, one-hot); already one-hot data is unchanged.
    Single-label training always uses one-hot targets so smoothing and MixUp apply."""
    import tensorflow as tf

    label_shape = ds.element_spec[1].shape
    if label_shape.rank == 2 and label_shape[-1] == num_classes and num_classes > 1:
        return ds
    return ds.map(plain(lambda x, y: (x, tf.one_hot(tf.reshape(tf.cast(y, tf.int32), [-1]), num_classes))))


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

    return ds.enumerate(start=first_step).map(plain(mix), num_parallel_calls=tf.data.AUTOTUNE)


# --- segmentation ---------------------------------------------------------------------------


def _valid_pixels(y_true, ignore_index):
    import tensorflow as tf

    y_true = tf.cast(y_true, tf.int32)
    if ignore_index is None:
        return y_true, tf.ones_like(y_true, tf.float32)
    valid = tf.not_equal(y_true, ignore_index)
    return tf.where(valid, y_true, 0), tf.cast(valid, tf.float32)


@keras.saving.register_keras_serializable(package="restransfer")
class SegmentationLoss(keras.losses.Loss):
    """Per-pixel cross-entropy (binary: on the one foreground map; multi-class: softmax) plus
    soft Dice, per image (each image's loss is one value, so Keras' mean and the multi-worker
    step's global-batch division both apply). ``class_weights`` weigh the cross-entropy of
    each true class's pixels; ``ignore_index`` pixels count in neither term.

    ``mode``: ``"ce+dice"`` (the default: segmentation_models' and MONAI's DiceCE), ``"ce"`` or
    ``"dice"``. Soft Dice is 1 - (2 sum p t + 1) / (sum p + sum t + 1) per class over an image's
    valid pixels (the +1 keeps an empty mask predicted empty at ~0), averaged over the
    foreground classes (binary: the one foreground class)."""

    def __init__(self, num_classes: int, ignore_index: int | None = None, class_weights=None,
                 mode: str = "ce+dice", name="segmentation_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        if mode not in ("ce+dice", "ce", "dice"):
            raise ValueError(f"segmentation loss must be 'ce+dice', 'ce' or 'dice', got {mode!r}")
        self.num_classes, self.ignore_index, self.mode = int(num_classes), ignore_index, mode
        self.class_weights = [float(w) for w in class_weights] if class_weights is not None else None

    def call(self, y_true, y_pred):
        import tensorflow as tf

        y_true, valid = _valid_pixels(y_true, self.ignore_index)
        probabilities = tf.clip_by_value(tf.cast(y_pred, tf.float32), 1e-7, 1.0 - 1e-7)
        count = tf.maximum(tf.reduce_sum(valid, axis=[1, 2]), 1.0)
        if self.num_classes == 2:  # one sigmoid map
            target = tf.cast(y_true, tf.float32)
            foreground = probabilities[..., 0]
            cross_entropy = -(target * tf.math.log(foreground) + (1 - target) * tf.math.log(1 - foreground))
            truths, predictions = target[..., None], foreground[..., None]
        else:
            onehot = tf.one_hot(y_true, self.num_classes)
            cross_entropy = -tf.reduce_sum(onehot * tf.math.log(probabilities), axis=-1)
            truths, predictions = onehot[..., 1:], probabilities[..., 1:]
        if self.class_weights is not None:
            cross_entropy *= tf.gather(tf.constant(self.class_weights, tf.float32), y_true)
        terms = []
        if "ce" in self.mode:
            terms.append(tf.reduce_sum(cross_entropy * valid, axis=[1, 2]) / count)
        if "dice" in self.mode:
            mask = valid[..., None]
            intersection = tf.reduce_sum(truths * predictions * mask, axis=[1, 2])
            total = tf.reduce_sum((truths + predictions) * mask, axis=[1, 2])
            terms.append(tf.reduce_mean(1.0 - (2.0 * intersection + 1.0) / (total + 1.0), axis=-1))
        return tf.add_n(terms)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "ignore_index": self.ignore_index,
                "class_weights": self.class_weights, "mode": self.mode}


@keras.saving.register_keras_serializable(package="restransfer")
class DiceScore(keras.metrics.Metric):
    """The foreground Dice of the decided masks over all images seen (the split's pixels
    pooled: 2 sum(I) / (sum(P) + sum(T)) per foreground class, averaged), at threshold 0.5
    (binary) or argmax; ``ignore_index`` pixels left out. What early stopping follows."""

    def __init__(self, num_classes: int, ignore_index: int | None = None, name="dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes, self.ignore_index = int(num_classes), ignore_index
        foreground = 1 if self.num_classes == 2 else self.num_classes - 1
        self.intersection = self.add_weight(shape=(foreground,), initializer="zeros", name="intersection")
        self.total = self.add_weight(shape=(foreground,), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        import tensorflow as tf

        y_true, valid = _valid_pixels(y_true, self.ignore_index)
        y_pred = tf.cast(y_pred, tf.float32)
        if self.num_classes == 2:
            decided = tf.cast(y_pred[..., 0] >= 0.5, tf.int32)
        else:
            decided = tf.argmax(y_pred, axis=-1, output_type=tf.int32)
        classes = tf.range(1, self.num_classes)
        truth = tf.cast(tf.equal(y_true[..., None], classes), tf.float32) * valid[..., None]
        predicted = tf.cast(tf.equal(decided[..., None], classes), tf.float32) * valid[..., None]
        self.intersection.assign_add(tf.reduce_sum(truth * predicted, axis=[0, 1, 2]))
        self.total.assign_add(tf.reduce_sum(truth + predicted, axis=[0, 1, 2]))

    def result(self):
        import tensorflow as tf

        # a class absent from truth and prediction alike scores 1 (nothing to find, nothing found)
        return tf.reduce_mean(tf.where(self.total > 0, 2.0 * self.intersection / tf.maximum(self.total, 1e-7), 1.0))

    def reset_state(self):
        self.intersection.assign(keras.ops.zeros_like(self.intersection))
        self.total.assign(keras.ops.zeros_like(self.total))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "ignore_index": self.ignore_index}
