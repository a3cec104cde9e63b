"""What the phase loop needs from a task, and nothing more: an :class:`Objective` says what
a batch's targets become, which loss and metrics a phase compiles, which validation figure
early stopping follows, and whether head-only phases can train on cached features.

Tasks (:mod:`restransfer.tasks`) make one per fit; the loop, the multi-worker step and the
LR finder only ever talk to it, so they hold no task branches.
"""

from __future__ import annotations

from restransfer import devices
from restransfer.training.losses import DiceScore, SegmentationLoss, loss_and_metrics, one_hot_labels
from restransfer.training.phases import Phase


class Objective:
    """The training side of a task. Subclasses set ``monitor`` (a validation figure that
    early stopping maximises) and implement :meth:`loss_and_metrics`."""

    monitor: str = "val_loss"
    monitor_mode: str = "max"
    supports_mixup: bool = False  # MixUp mixes targets: only where they can be mixed (one-hot)
    class_weight: dict | None = None  # per-class weights of the examples (Keras' class_weight)

    def targets(self, ds):
        """Batched (images, targets) as the data gives them -> as the loss takes them."""
        return ds

    def loss_and_metrics(self, phase: Phase | None = None):
        raise NotImplementedError

    def head_model(self, model):
        """features -> outputs (the head alone), when a head-only phase can train on cached
        backbone features; None when it cannot."""
        return None

    def compile(self, model, optimizer, phase: Phase | None = None, steps_per_execution: int | None = None):
        """``steps_per_execution``: default 8 on a GPU (several steps per call keep it fed), 1
        elsewhere; Keras' jit_compile="auto" turns XLA on there and leaves it off on CPUs
        (where it measured ~2x slower here)."""
        loss, metrics = self.loss_and_metrics(phase)
        if steps_per_execution is None:
            steps_per_execution = 8 if devices.gpu_count() else 1
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics, steps_per_execution=steps_per_execution)


class ClassificationObjective(Objective):
    """Softmax cross-entropy on one-hot targets (label smoothing, MixUp), or per-label sigmoid
    cross-entropy; focal loss when ``focal_gamma`` is set; accuracy (and AUC) metrics."""

    def __init__(self, num_classes: int, multi_label: bool = False, focal_gamma: float | None = None,
                 class_weight: dict | None = None):
        self.num_classes, self.multi_label, self.focal_gamma = num_classes, multi_label, focal_gamma
        self.class_weight = class_weight
        self.monitor = "val_auc" if multi_label else "val_accuracy"
        self.supports_mixup = not multi_label

    def targets(self, ds):
        return ds if self.multi_label or ds is None else one_hot_labels(ds, self.num_classes)

    def loss_and_metrics(self, phase: Phase | None = None):
        smoothing = phase.label_smoothing if phase is not None and not self.multi_label else 0.0
        return loss_and_metrics(self.multi_label, smoothing, self.focal_gamma)

    def head_model(self, model):
        import keras

        from restransfer.models import stages as stages_lib
        from restransfer.models.heads import find_head

        backbone = stages_lib.find_backbone(model)
        features = keras.Input(shape=backbone.output_shape[1:], name="features")
        return keras.Model(features, find_head(model)(features), name="head_on_features")


class SegmentationObjective(Objective):
    """Per-pixel cross-entropy + soft Dice on class-index masks (``ignore_index`` left out,
    ``class_weights`` on the cross-entropy); early stopping follows the validation Dice."""

    monitor = "val_dice"

    def __init__(self, num_classes: int, ignore_index: int | None = None, class_weights=None, loss: str = "ce+dice"):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_weights, self.loss = class_weights, loss

    def loss_and_metrics(self, phase: Phase | None = None):
        return (SegmentationLoss(self.num_classes, self.ignore_index, self.class_weights, self.loss),
                [DiceScore(self.num_classes, self.ignore_index)])


def compile_model(model, optimizer, multi_label: bool, label_smoothing: float = 0.0,
                  focal_gamma: float | None = None, steps_per_execution: int | None = None) -> None:
    """A classifier compiled as a phase compiles it (for tests and scripts)."""
    phase = Phase("all", label_smoothing=label_smoothing) if label_smoothing else None
    ClassificationObjective(int(model.output_shape[-1]), multi_label, focal_gamma).compile(
        model, optimizer, phase, steps_per_execution)
