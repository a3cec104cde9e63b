"""ClassificationRecipe: a label per image (single-label softmax or multi-label sigmoid).

What the task contributes to the shared :class:`~restransfer.tasks.base.Recipe`: the
classifier head on pooled features, the classification objective, the decision rule
(:mod:`restransfer.models.decision`) behind ``predict_labels``, ``evaluate`` and the served
``predictions``, the SavedModel's outputs, and the run report's sections.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from restransfer import data as data_lib
from restransfer.graph import plain
from restransfer.models.decision import DecisionRule, model_probabilities
from restransfer.models.heads import ClassifierHead, find_head
from restransfer.tasks.base import COMMON_ARGUMENTS, Recipe, is_tf_dataset


class ClassificationRecipe(Recipe):
    __doc__ = """Single-label (softmax) or multi-label (sigmoid) image classification by fine-tuning.

    Example::

        recipe = ClassificationRecipe(backbone="resnet50", weights="imagenet", image_size=224)
        history = recipe.fit("data/hymenoptera")         # train/ and val/ sub-folders
        recipe.evaluate("data/hymenoptera/val")          # {'loss': ..., 'accuracy': ...}
        probabilities = recipe.predict(["ant.jpg"])
        recipe.predict_labels(["ant.jpg"])               # ['ants']
        recipe.save("run/model.keras")

    Arguments of the task:
        multi_label: a sigmoid per class (per-label thresholds) instead of one softmax.
        head_dropout: dropout before the classifier.
        head_hidden_units: a hidden Dense + ReLU layer of this width before the classifier.
    """ + COMMON_ARGUMENTS

    task = "classification"

    def __init__(self, backbone: str = "resnet50", weights="imagenet", *, multi_label: bool = False,
                 head_dropout: float = 0.2, head_hidden_units: int | None = None, **options):
        super().__init__(backbone, weights, **options)
        self.multi_label = multi_label
        self.head_dropout = head_dropout
        self.head_hidden_units = head_hidden_units

    # --- the task's part ---------------------------------------------------------------------

    def _head_outputs(self, backbone, inputs):
        head = ClassifierHead(
            self.num_classes,
            multi_label=self.multi_label,
            dropout=self.head_dropout,
            hidden_units=self.head_hidden_units,
            class_names=self.class_names,
            image_contract=self.image_contract(),
            decision=DecisionRule.default(self.multi_label, self.num_classes, **self._decision_options()).get_config(),
            task=self.task,
            name="head",
        )
        return head(backbone(inputs))

    def _decision_options(self) -> dict:
        """Options of the decision rule a new model starts with (subclasses: test-time views)."""
        return {}

    def _adopt_data(self, train) -> None:
        self.multi_label = self.multi_label or train.multi_label

    def objective(self, train):
        from restransfer.training.objectives import ClassificationObjective

        return ClassificationObjective(self.num_classes, self.multi_label)

    @classmethod
    def _arguments_saved_in(cls, model, head) -> dict:
        return {"multi_label": head.multi_label, "head_dropout": head.dropout_rate,
                "head_hidden_units": head.hidden_units}

    @property
    def decision(self) -> DecisionRule:
        """The model's decision rule (stored in its head): what ``predict_labels``, the CLI and
        the SavedModel's ``predictions`` apply."""
        return find_head(self._require_model()).decision

    # --- figures and predictions -----------------------------------------------------------

    def evaluate(self, data, verbose=0) -> dict[str, float]:
        """Figures of the model's own decisions on labelled data (the same kinds of input as
        ``fit``): ``loss`` (cross-entropy of its probabilities), ``accuracy`` of the classes its
        decision rule decides (argmax, a medical threshold, per-label thresholds: what
        ``predict_labels``, the CLI and TF Serving answer), and ``auc`` for multi-label data."""
        return self._figures(*self._probabilities_and_labels(data))

    def _figures(self, probabilities, labels) -> dict[str, float]:
        from restransfer.evaluation.metrics import classification_figures

        decided = np.asarray(self.decision.decide(probabilities, self.class_names))
        return classification_figures(labels, probabilities, decided, self.multi_label)

    def _probabilities_and_labels(self, data):
        """The model's probabilities (its test-time views and temperature applied) and the
        labels of labelled data, in order."""
        if not is_tf_dataset(data):
            source = self._as_data(data, split="test")
            return self.predict_dataset(source), source.labels
        model, views = self._require_model(), self.decision.test_time_augmentation
        probabilities, labels = [], []
        for images, batch_labels in data:
            probabilities.append(model_probabilities(model, images.numpy(), views))
            labels.append(batch_labels.numpy())
        labels = np.concatenate(labels)
        if not self.multi_label and labels.ndim == 2:  # one-hot rows -> class ids
            labels = labels.argmax(axis=1)
        return np.concatenate(probabilities), labels.reshape(-1) if not self.multi_label else labels

    def predict(self, images, batch_size: int | None = None) -> np.ndarray:
        """Class probabilities for images: an array (N, H, W, C) of raw 0-255 pixels (any size;
        channels converted as files are), a list of image file paths or arrays, or one path."""
        return model_probabilities(self._require_model(), self._resized(self._input_pixels(images)),
                                   self.decision.test_time_augmentation, batch_size=batch_size or self.batch_size)

    def predict_dataset(self, data) -> np.ndarray:
        """Probabilities for every image of labelled data (folder, ImageData, ...), in order."""
        source = data if is_tf_dataset(data) else self._as_data(data, split="test")
        images_only = self._pipeline(source, training=False).map(plain(lambda x, *_: x))
        return model_probabilities(self._require_model(), images_only, self.decision.test_time_augmentation)

    def decide(self, probabilities) -> list:
        """The model's decision (its :attr:`decision` rule) for rows of probabilities: a class
        name per image (single-label) or a list of names per image (multi-label)."""
        rule = self.decision
        return rule.names(rule.decide(probabilities, self.class_names), self.class_names)

    def predict_labels(self, images) -> list:
        """Decided class names for images (see :meth:`decide`): argmax, a binary threshold
        chosen by a medical recipe, or per-label thresholds (0.5 unless chosen)."""
        return self.decide(self.predict(images))

    def decision_text(self) -> str:
        return self.decision.describe()

    def prediction_record(self, path, index: int, top_k: int = 3, out_dir=None) -> dict:
        """The answer for one file, as ``restransfer predict`` reports it."""
        probabilities = self.predict([path])
        decided = self.decide(probabilities)[0]
        probabilities = probabilities[0]
        order = probabilities.argsort()[::-1][:top_k]
        return {"image": str(path), "decision": decided,
                "top": [{"class": self.class_names[i], "probability": float(probabilities[i])} for i in order],
                "probabilities": {name: float(p) for name, p in zip(self.class_names, probabilities)}}

    @staticmethod
    def record_line(record: dict) -> str:
        best = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in record["top"])
        decided = record["decision"] if isinstance(record["decision"], str) else ",".join(record["decision"]) or "-"
        return f"{record['image']}: {decided}  ({best})"

    # --- export -----------------------------------------------------------------------------

    def export(self, out_dir, model_name: str | None = None, version: int | None = None,
               top_k: int = 5, warmup_images=None, thresholds=None, format: str = "saved_model",
               quantization: str | None = None, heldout=None, representative=None,
               max_metric_drop: float = 0.02, allow_drop: bool = False) -> Path:
        """The model for deployment, in ``out_dir/<model_name>/<version>/``.

        ``format="saved_model"`` (TensorFlow Serving; see :mod:`restransfer.serving.export`):
        ``warmup_images`` (image files, raw pixel arrays, or ImageData: its first 4 images) are
        the warm-up requests and the parity check; ``thresholds``: per-label thresholds for
        this export only (multi-label).

        ``format="litert"`` or ``"onnx"`` (see :mod:`restransfer.serving.portable`): decoded
        pixels in, checked in the format's own runtime on ``heldout`` (labelled images);
        ``quantization`` (LiteRT: ``"float16"`` or ``"int8"``, calibrated on ``representative``
        training images) is refused when the held-out figure drops by more than
        ``max_metric_drop`` unless ``allow_drop``."""
        from restransfer.serving.export import export_saved_model

        if format != "saved_model":
            return self._export_portable(out_dir, format, model_name, version, quantization, heldout, representative,
                                         max_metric_drop, allow_drop)

        if not self.worker.is_chief:
            print(f"worker {self.worker.index}: only the chief exports; nothing written")
            return Path(out_dir)
        decoded, encoded = self._export_samples(warmup_images)
        decision = self.decision
        if thresholds is not None:
            decision = DecisionRule("per_label", thresholds=[float(t) for t in thresholds],
                                    test_time_augmentation=decision.test_time_augmentation)
            decision.check(self.class_names, self.multi_label)
        return export_saved_model(
            self._require_model(), out_dir, class_names=self.class_names,
            image_size=self.image_size, model_name=model_name or self.backbone_name,
            version=version, top_k=top_k, decision=decision,
            warmup_images=decoded, encoded_images=encoded, keep_precision=bool(self.keep_precision),
            decode_options=self.decode_options, metadata=self.describe(),
        )

    # --- portable exports: what the task's pixel graph computes and scores -----------------

    def _pixel_outputs(self, model):
        from restransfer.models.decision import graph_probabilities

        decision, names = self.decision, list(self.class_names)

        def outputs(pixels):
            probabilities = graph_probabilities(model, pixels, decision.test_time_augmentation)
            return {"probabilities": probabilities, "predictions": decision.decide(probabilities, names)}

        return outputs

    def _portable_targets(self, data, indices):
        return np.asarray(data.labels)[indices]

    def _portable_figures(self, outputs: dict, targets) -> dict:
        figures = {"accuracy": float(np.mean(np.asarray(outputs["predictions"]) == targets))}
        if len(self.class_names) == 2 and not self.multi_label and len(np.unique(targets)) == 2:
            from sklearn.metrics import roc_auc_score

            figures["auc"] = float(roc_auc_score(targets, np.asarray(outputs["probabilities"])[:, 1]))
        return figures

    def _portable_outputs_card(self) -> dict:
        return {"probabilities": f"float32 [N, {len(self.class_names)}] (temperature and test-time views applied)",
                "predictions": ("int32 [N, C]: 0/1 per label" if self.multi_label else "int32 [N]: the decided class id")
                + f" by the decision rule; class ids index labels.txt {self.class_names}"}

    # --- the run's report ---------------------------------------------------------------------

    def tuned_on_validation(self) -> list[str]:
        """What fitting this recipe tunes on its validation data (the split roles say so)."""
        return ["early stopping kept its best epoch"] if self.early_stopping_patience else []

    def inner_validation_fraction(self) -> float:
        """Cross-validation: the share of each fold's training part that early stopping watches."""
        return self.val_fraction

    def after_training(self, val, scored, out_dir: Path, tuned_on: str, scored_on: str) -> dict:
        """What the task chooses on ``val`` after training and scores on ``scored`` (subclasses:
        a medical threshold and its clinical figures); the findings go into metrics.json."""
        return {}

    def fold_figures(self, findings: dict) -> dict:
        """Figures of a cross-validation fold's held-out part taken from ``findings`` (subclasses)."""
        return {}

    def report(self, run_dir: Path, title: str, splits: data_lib.Splits, split_notes: dict,
               shown_split: str = "validation") -> dict:
        """Scores the validation and test parts and writes ``run_dir/report.html``; returns the
        figures (``val_*``, ``test_*``, AUC for two classes). The page's plots are on the
        validation part (named ``shown_split``)."""
        from restransfer.evaluation import report as report_lib

        metrics, scored = {}, {}
        for name, part in (("val", splits.val), ("test", splits.test)):
            if part is not None:
                probabilities, labels = self._probabilities_and_labels(part)
                scored[name] = probabilities
                metrics.update({f"{name}_{k}": v for k, v in self._figures(probabilities, labels).items()})
                if len(self.class_names) == 2 and not self.multi_label and len(np.unique(labels)) == 2:
                    from sklearn.metrics import roc_auc_score

                    metrics[f"{name}_auc"] = float(roc_auc_score(labels, probabilities[:, 1]))
        shown_name = "val" if splits.val is not None else "test"
        shown = splits.val if splits.val is not None else splits.test
        if shown is None:
            return metrics
        probabilities = scored[shown_name]
        decisions = np.asarray(self.decision.decide(probabilities, self.class_names))
        images = None
        if not self.multi_label:
            wrong = report_lib.most_confident_wrong(shown.labels, decisions, probabilities.max(axis=1))
            images = self._images_at(shown, wrong)
        described = self.describe()
        summary = {"task": self.task, "backbone": described["backbone"], "weights": described["weights"],
                   "splits": {name: len(part) for name, part in splits.items()},
                   "decision": self.decision.describe(), "headline": self._headline(metrics, split_notes)}
        notes = [report_lib.skipped_note(self.skipped), *(f"{key}: {role}" for key, role in split_notes.items())]
        report_lib.write_report(run_dir / "report.html", title, self.history, self.class_names, shown.labels,
                                probabilities, images, multi_label=self.multi_label, metrics=metrics,
                                notes=notes, decisions=decisions, summary=summary, split=shown_split,
                                **self._report_extras(run_dir))
        return metrics

    def _report_extras(self, run_dir: Path) -> dict:
        """Further sections of the report (subclasses: the clinical section, Grad-CAM)."""
        return {}

    def _headline(self, metrics: dict, split_notes: dict) -> list:
        """(figure, value, split) rows for the report's summary: the test split's when there is one."""
        for prefix in ("test", "val"):
            if f"{prefix}_accuracy" in metrics:
                role = split_notes.get(f"{prefix}_*", prefix)
                return [("accuracy", f"{metrics[f'{prefix}_accuracy']:.3f}", role)] + \
                       ([("AUC", f"{metrics[f'{prefix}_auc']:.3f}", role)] if f"{prefix}_auc" in metrics else [])
        return []

    def _images_at(self, data, indices) -> dict:
        """index -> the (resized) image the model saw, for just these indices of ``data``."""
        wanted, found, start = set(int(i) for i in indices), {}, 0
        if not wanted:
            return found
        for batch_images, _ in self._pipeline(data, training=False):
            for offset in range(len(batch_images)):
                if start + offset in wanted:
                    found[start + offset] = batch_images[offset].numpy()
            start += len(batch_images)
            if len(found) == len(wanted):
                break
        return found


__all__ = ["ClassificationRecipe"]
