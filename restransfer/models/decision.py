"""The decision rule: how a model's probabilities become a decided class.

It is stored in the head (so in ``model.keras``) and compiled into the SavedModel, so that
``predict_labels``, ``restransfer predict`` and TensorFlow Serving decide alike, by this one
TensorFlow implementation:

* ``argmax``: the most probable class (single-label default);
* ``threshold``: binary models, ``positive_class`` when its probability >= ``threshold``
  (the medical recipe chooses it on validation data), else the other class;
* ``per_label``: multi-label, label j when its probability >= ``thresholds[j]`` (0.5 default).

A temperature (probability recalibration) is a variable of the head itself, applied to the
logits inside the model; ``test_time_augmentation`` averages the probabilities of the views of
:data:`restransfer.data.augmentation.TEST_TIME_VIEWS`, in Keras and in the serving graph alike.
``chosen_on`` records where a threshold was chosen (split, image count, method, the figures
there), so a model card can say what the rule was tuned for.
"""

from __future__ import annotations

import dataclasses

from restransfer.graph import plain

RULES = ("argmax", "threshold", "per_label")


@dataclasses.dataclass
class DecisionRule:
    rule: str = "argmax"
    positive_class: str | None = None
    threshold: float | None = None
    thresholds: list[float] | None = None
    test_time_augmentation: bool = False
    chosen_on: dict | None = None

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"decision rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.rule == "threshold" and (self.positive_class is None or self.threshold is None):
            raise ValueError("a 'threshold' rule needs positive_class and threshold")
        if self.rule == "per_label" and self.thresholds is None:
            raise ValueError("a 'per_label' rule needs thresholds")

    @classmethod
    def default(cls, multi_label: bool, num_classes: int, **options) -> "DecisionRule":
        if multi_label:
            return cls("per_label", thresholds=[0.5] * num_classes, **options)
        return cls("argmax", **options)

    @classmethod
    def from_config(cls, config: dict | None, multi_label: bool, num_classes: int) -> "DecisionRule":
        if not config:
            return cls.default(multi_label, num_classes)
        return cls(**config)

    def get_config(self) -> dict:
        return dataclasses.asdict(self)

    def check(self, class_names: list[str], multi_label: bool) -> None:
        """Refuses a rule that does not fit the head's classes."""
        if multi_label != (self.rule == "per_label"):
            raise ValueError(f"a {'multi' if multi_label else 'single'}-label model cannot use the "
                             f"{self.rule!r} decision rule")
        if self.rule == "threshold":
            if len(class_names) != 2:
                raise ValueError(f"a threshold rule needs 2 classes, the model has {len(class_names)}")
            if self.positive_class not in class_names:
                raise ValueError(f"positive class {self.positive_class!r} is not one of {class_names}")
        if self.rule == "per_label" and len(self.thresholds) != len(class_names):
            raise ValueError(f"{len(self.thresholds)} thresholds for {len(class_names)} labels")

    def decide(self, probabilities, class_names: list[str]):
        """Decided class ids [N] (single-label) or 0/1 [N, C] (multi-label), as a tf.Tensor;
        works eagerly on arrays and inside the serving graph."""
        import tensorflow as tf

        probabilities = tf.convert_to_tensor(probabilities, tf.float32)
        if self.rule == "per_label":
            return tf.cast(probabilities >= tf.constant(self.thresholds, tf.float32), tf.int32)
        if self.rule == "threshold":
            positive = class_names.index(self.positive_class)
            chosen = probabilities[:, positive] >= self.threshold
            return tf.where(chosen, positive, 1 - positive)
        return tf.argmax(probabilities, axis=1, output_type=tf.int32)

    def names(self, decided, class_names: list[str]) -> list:
        """Class names of :meth:`decide`'s output: a name per image, or a list per image."""
        decided = decided.numpy() if hasattr(decided, "numpy") else decided
        if self.rule == "per_label":
            return [[class_names[j] for j, on in enumerate(row) if on] for row in decided]
        return [class_names[int(i)] for i in decided]

    def describe(self) -> str:
        if self.rule == "threshold":
            text = f"'{self.positive_class}' when its probability >= {self.threshold:.4g}, else the other class"
        elif self.rule == "per_label":
            text = "each label whose probability >= its threshold " + \
                   "(" + ", ".join(f"{t:.3g}" for t in self.thresholds) + ")"
        else:
            text = "the most probable class"
        if self.chosen_on:
            where = self.chosen_on
            text += f"; chosen on {where.get('split')} ({where.get('images')} images, {where.get('method')})"
        return text


def model_probabilities(model, images, test_time_augmentation: bool = False, batch_size: int | None = None):
    """Keras probabilities of resized pixels (an array [N, H, W, C] or a tf.data dataset of
    such batches), averaged over the test-time views when asked: the reference every other
    door (the serving graph included) is checked against."""
    import numpy as np
    import tensorflow as tf

    results = []
    for view in _views(test_time_augmentation):
        if isinstance(images, tf.data.Dataset):
            results.append(model.predict(images.map(plain(view)), verbose=0))
        else:
            pixels = np.asarray(view(tf.constant(images, tf.float32)))
            results.append(model.predict(pixels, batch_size=batch_size, verbose=0))
    return results[0] if len(results) == 1 else np.mean(results, axis=0)


def graph_probabilities(model, pixels, test_time_augmentation: bool = False):
    """The same as :func:`model_probabilities`, as graph ops on one batch (the serving graph)."""
    import tensorflow as tf

    return tf.reduce_mean(tf.stack([tf.cast(model(view(pixels), training=False), tf.float32)
                                    for view in _views(test_time_augmentation)]), axis=0)


def _views(test_time_augmentation: bool):
    from restransfer.data.augmentation import TEST_TIME_VIEWS

    return TEST_TIME_VIEWS if test_time_augmentation else TEST_TIME_VIEWS[:1]
