"""Task heads. A head also carries what the model needs to be used as it was trained, so it
travels inside the model file: the task it was trained for, the class names, the image
contract (how files become the network's input: full-precision 16-bit decoding, the medical
window and normalisation) and the decision rule. :class:`TaskHead` is what every task's head
is; :class:`ClassifierHead` adds a temperature that recalibrates the probabilities (a
variable, so Keras, a reloaded model and the SavedModel all apply it)."""

from __future__ import annotations

import keras

from restransfer.models.decision import DecisionRule


class TaskHead(keras.layers.Layer):
    """What every task's head carries: ``task`` (its entry in :mod:`restransfer.tasks.registry`),
    ``class_names`` and ``image_contract``; the model's decision rule is the subclass's."""

    task: str = "classification"
    class_names: list[str]
    image_contract: dict


@keras.saving.register_keras_serializable(package="restransfer")
class ClassifierHead(TaskHead):
    """Dropout -> optional hidden Dense+ReLU -> Dense with softmax or sigmoid.

    Always computed in float32 (``dtype="float32"``), even under a mixed-precision policy,
    so that probabilities and the loss stay numerically sound.
    """

    def __init__(
        self,
        num_classes: int,
        multi_label: bool = False,
        dropout: float = 0.0,
        hidden_units: int | None = None,
        class_names: list[str] | None = None,
        image_contract: dict | None = None,
        decision: dict | None = None,
        task: str = "classification",
        **kwargs,
    ):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.task = task
        if num_classes < 1 or (not multi_label and num_classes < 2):
            raise ValueError(f"num_classes must be >= 2 (>= 1 for multi-label), got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"{len(class_names)} class names given for num_classes={num_classes}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_classes = int(num_classes)
        self.multi_label = bool(multi_label)
        self.dropout_rate = float(dropout)
        self.hidden_units = hidden_units
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.image_contract = dict(image_contract or {})
        self.decision = DecisionRule.from_config(decision, self.multi_label, self.num_classes)
        self.decision.check(self.class_names, self.multi_label)
        # logits are divided by it before the softmax/sigmoid; 1 until a recipe calibrates
        self.temperature = self.add_weight(shape=(), initializer="ones", trainable=False,
                                           name="temperature")
        self.dropout = keras.layers.Dropout(dropout, dtype="float32", name="dropout")
        self.hidden = (
            keras.layers.Dense(hidden_units, activation="relu", dtype="float32", name="hidden")
            if hidden_units
            else None
        )
        self.classifier = keras.layers.Dense(num_classes, dtype="float32", name="classifier")  # logits

    def build(self, input_shape):
        shape = tuple(input_shape)
        if self.hidden is not None:
            self.hidden.build(shape)
            shape = shape[:-1] + (self.hidden_units,)
        self.classifier.build(shape)

    def call(self, features, training=None):
        x = self.dropout(keras.ops.cast(features, "float32"), training=training)
        if self.hidden is not None:
            x = self.hidden(x)
        logits = self.classifier(x) / self.temperature
        return keras.ops.sigmoid(logits) if self.multi_label else keras.ops.softmax(logits)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        return {
            **config,
            "num_classes": self.num_classes,
            "multi_label": self.multi_label,
            "dropout": self.dropout_rate,
            "hidden_units": self.hidden_units,
            "class_names": self.class_names,
            "image_contract": self.image_contract,
            "decision": self.decision.get_config(),
            "task": self.task,
        }

    def set_decision(self, decision: DecisionRule) -> None:
        decision.check(self.class_names, self.multi_label)
        self.decision = decision

    def load_own_variables(self, store):
        if len(store.keys()) == 0:  # a file saved before heads had a temperature
            self.temperature.assign(1.0)
            return
        super().load_own_variables(store)


def find_head(model: keras.Model) -> TaskHead:
    """The head of a task model (the layer that carries its classes and decision rule)."""
    for layer in model.layers:
        if isinstance(layer, TaskHead):
            return layer
    raise ValueError(f"{model.name} has no restransfer task head (it was not made by a restransfer recipe)")
