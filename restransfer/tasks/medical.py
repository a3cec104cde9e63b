"""MedicalImagingRecipe: the classification recipe plus what clinical data needs.

* inputs: DICOM/NIfTI/16-bit through :mod:`restransfer.data.medical` (``window``, ``normalize``),
  1-channel images replicated or through a summed stem (``stem="sum"``);
* imbalance: class weights from the training split (scikit-learn's "balanced"), focal loss;
* evaluation: a threshold chosen on validation and applied unchanged to test, AUC,
  sensitivity, specificity, PPV, NPV with bootstrap CIs, ECE and optional temperature
  scaling, per-patient pooling, test-time augmentation;
* Grad-CAM overlays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from restransfer import data as data_lib
from restransfer.evaluation import metrics
from restransfer.tasks.classification import ClassificationRecipe


class MedicalImagingRecipe(ClassificationRecipe):
    def __init__(self, *args, class_weight="balanced", focal_gamma: float | None = None,
                 window="file", normalize: str = "percentile", threshold_method: str = "youden",
                 target_sensitivity: float = 0.9, positive_class: str | None = None,
                 tta: bool = False, temperature_scaling: bool = False, augmentation="medical", **kwargs):
        kwargs.setdefault("decode_options", {"window": window, "normalize": normalize})
        super().__init__(*args, augmentation=augmentation, **kwargs)
        if class_weight not in ("balanced", None) and not isinstance(class_weight, dict):
            raise ValueError(f"class_weight must be 'balanced', None or a dict, got {class_weight!r}")
        self.class_weight, self.focal_gamma = class_weight, focal_gamma  # imbalance
        self.threshold_method, self.target_sensitivity = threshold_method, target_sensitivity
        self.positive_class, self.tta, self.temperature_scaling = positive_class, tta, temperature_scaling
        self.threshold: float | None = None
        self.temperature: float = 1.0

    # --- training -------------------------------------------------------------------------

    def _fit_options(self, train) -> dict:
        options = {"focal_gamma": self.focal_gamma}
        if self.class_weight == "balanced" and isinstance(train, data_lib.ImageData) and not train.multi_label:
            from sklearn.utils.class_weight import compute_class_weight

            present = np.unique(train.labels)
            weights = compute_class_weight("balanced", classes=present, y=train.labels)
            options["class_weight"] = {int(c): float(w) for c, w in zip(present, weights)}
        elif isinstance(self.class_weight, dict):
            options["class_weight"] = {int(k): float(v) for k, v in self.class_weight.items()}
        return options

    # --- prediction ------------------------------------------------------------------------

    def predict_dataset(self, data) -> np.ndarray:
        """Probabilities in order; with ``tta``, averaged over flips and small shifts; with
        a fitted temperature, recalibrated."""
        if not self.tta:
            probabilities = super().predict_dataset(data)
        else:
            source = self._as_data(data, split="test")
            views = []
            for transform in _TTA:
                images = self._pipeline(source, training=False).map(lambda x, *_: transform(x))
                views.append(self._require_model().predict(images, verbose=0))
            probabilities = np.mean(views, axis=0)
        return _recalibrate(probabilities, self.temperature) if self.temperature != 1.0 else probabilities

    # --- clinical evaluation ---------------------------------------------------------------

    def _positive_index(self) -> int:
        if self.positive_class is not None:
            return self.class_names.index(self.positive_class)
        return 1

    def calibrate(self, validation_data) -> dict:
        """Chooses the decision threshold (and, if asked, a temperature) on validation data."""
        val = self._as_data(validation_data, split="val")
        probabilities = self.predict_dataset(val)
        if self.temperature_scaling and not self.multi_label:
            self.temperature = metrics.fit_temperature(val.labels, np.log(np.clip(probabilities, 1e-7, 1)))
            probabilities = _recalibrate(probabilities, self.temperature)
        if len(self.class_names) == 2 and not self.multi_label:
            self.threshold = metrics.choose_threshold(
                (val.labels == self._positive_index()).astype(int), probabilities[:, self._positive_index()],
                self.threshold_method, self.target_sensitivity)
        return {"threshold": self.threshold, "temperature": self.temperature}

    def evaluate_clinical(self, test_data, groups=None, bootstrap: int = 1000) -> dict:
        """The numbers a paper needs on test data, at the threshold chosen by :meth:`calibrate`
        (0.5 if it was not called). ``groups`` (e.g. patient ids) adds per-patient figures."""
        test = self._as_data(test_data, split="test")
        probabilities = self.predict_dataset(test)
        if self.multi_label:
            return {"per_label": {name: metrics.binary_report(test.labels[:, j], probabilities[:, j],
                                                              0.5, bootstrap=bootstrap)
                                  for j, name in enumerate(self.class_names)}}
        report = {"auc": metrics.multiclass_auc(test.labels, probabilities),
                  "ece": metrics.expected_calibration_error(test.labels, probabilities),
                  "accuracy": float((probabilities.argmax(axis=1) == test.labels).mean())}
        if len(self.class_names) == 2:
            positive = self._positive_index()
            truth, scores = (test.labels == positive).astype(int), probabilities[:, positive]
            threshold = 0.5 if self.threshold is None else self.threshold
            report["binary"] = metrics.binary_report(truth, scores, threshold, bootstrap=bootstrap)
            groups = groups if groups is not None else test.groups
            if groups is not None:
                labels, pooled, ids = metrics.per_group(truth, scores, groups)
                report["per_patient"] = metrics.binary_report(labels, pooled, threshold, bootstrap=bootstrap)
                report["per_patient"]["patients"] = int(len(ids))
        return report

    def grad_cam_overlays(self, data, out_dir, count: int = 6, stage: str = "stage4") -> list[Path]:
        """Grad-CAM overlay PNGs (for the predicted class) of ``count`` images of ``data``,
        taken from each class in turn."""
        from restransfer.evaluation.gradcam import grad_cam, overlay_png

        source = self._as_data(data, split="test")
        if not source.multi_label:  # round-robin over classes, so each class is shown
            by_class = [list(np.flatnonzero(source.labels == c)) for c in range(source.num_classes)]
            picked = [members[i] for i in range(len(source)) for members in by_class if i < len(members)]
            source = source.subset(picked[:count])
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for index, (image, label) in enumerate(self._pipeline(source, training=False).unbatch().take(count)):
            image = image.numpy()
            heat = grad_cam(self._require_model(), image, stage=stage)
            name = Path(source.paths[index]).stem if source.paths else f"image{index}"
            truth = self.class_names[int(label)] if not source.multi_label else "multi"
            path = out_dir / f"gradcam_{index:02d}_{truth}_{name}.png"
            overlay_png(image, heat, path)
            written.append(path)
        return written


def _recalibrate(probabilities, temperature):
    logits = np.log(np.clip(probabilities, 1e-7, 1.0)) / temperature
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _shift(pixels, dy, dx):
    import tensorflow as tf

    size = tf.shape(pixels)[1:3]
    padded = tf.pad(pixels, [[0, 0], [abs(dy), abs(dy)], [abs(dx), abs(dx)], [0, 0]], mode="REFLECT")
    return tf.image.crop_to_bounding_box(padded, abs(dy) + dy, abs(dx) + dx, size[0], size[1])


# identity, horizontal flip, and 4-pixel shifts: small changes a reader would not notice
_TTA = [
    lambda x: x,
    lambda x: x[:, :, ::-1, :],
    lambda x: _shift(x, 4, 0),
    lambda x: _shift(x, 0, 4),
    lambda x: _shift(x, -4, -4),
]
