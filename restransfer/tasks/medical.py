"""MedicalImagingRecipe: the classification recipe plus what clinical data needs.

* inputs: DICOM/NIfTI/16-bit through :mod:`restransfer.data.medical` (``window``, ``normalize``),
  1-channel images replicated or through a summed stem (``stem="sum"``);
* imbalance: class weights from the training split (scikit-learn's "balanced"), focal loss;
* evaluation: a threshold chosen on validation and applied unchanged to test, AUC,
  sensitivity, specificity, PPV, NPV with bootstrap CIs, ECE and optional temperature
  scaling, per-patient pooling, test-time augmentation. The threshold, positive class,
  temperature and test-time views are stored in the model (its head's decision rule), so
  ``predict_labels``, ``restransfer predict`` and TF Serving decide as the report says;
* Grad-CAM overlays.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from restransfer import data as data_lib
from restransfer.evaluation import metrics
from restransfer.models.decision import DecisionRule
from restransfer.models.heads import find_head
from restransfer.tasks.base import COMMON_ARGUMENTS
from restransfer.tasks.classification import ClassificationRecipe


class MedicalImagingRecipe(ClassificationRecipe):
    __doc__ = """Classification of medical images with what clinical data needs (see the module
    docstring). Takes every :class:`ClassificationRecipe` argument, and:

    Arguments of the medical task:
        class_weight: ``"balanced"`` (from the training split), None, or {class id: weight}.
        focal_gamma: focal loss with this gamma instead of cross-entropy.
        window: DICOM window: ``"file"`` (the file's own), a preset (``"brain"``, ``"lung"``, ...)
            or (centre, width).
        normalize: how DICOM (without a window), NIfTI and 16-bit PNG/TIFF intensities map to
            0-255: ``"auto"`` (= ``"percentile"``), ``"percentile"``, ``"minmax"``, ``"zscore"``.
        threshold_method: ``"youden"`` or ``"sensitivity"`` (the highest threshold reaching
            ``target_sensitivity``), chosen on validation by :meth:`calibrate`.
        positive_class: the class a binary task detects (required for two classes).
        tta: average the probabilities of 5 test-time views (served too).
        temperature_scaling: fit a temperature on validation (calibrated probabilities).
        threshold_val_fraction: cross-validation: the share of each fold's training part held
            out to choose the threshold.
        gradcam_images: Grad-CAM overlays in a run's report.

    Arguments of classification: multi_label, head_dropout, head_hidden_units (see
    :class:`ClassificationRecipe`).
    """ + COMMON_ARGUMENTS

    task = "medical"

    def __init__(self, backbone: str = "resnet50", weights="imagenet", *, class_weight="balanced",
                 focal_gamma: float | None = None, window="file", normalize: str = "auto",
                 threshold_method: str = "youden", target_sensitivity: float = 0.9,
                 positive_class: str | None = None, tta: bool = False, temperature_scaling: bool = False,
                 threshold_val_fraction: float = 0.15, gradcam_images: int = 6, **options):
        options.setdefault("decode_options", {"window": window, "normalize": normalize})
        super().__init__(backbone, weights, **options)
        if class_weight not in ("balanced", None) and not isinstance(class_weight, dict):
            raise ValueError(f"class_weight must be 'balanced', None or a dict, got {class_weight!r}")
        self.class_weight, self.focal_gamma = class_weight, focal_gamma  # imbalance
        self.threshold_method, self.target_sensitivity = threshold_method, target_sensitivity
        self.positive_class, self.tta, self.temperature_scaling = positive_class, tta, temperature_scaling
        self.threshold_val_fraction, self.gradcam_images = threshold_val_fraction, gradcam_images
        self._calibrated_on: str | None = None  # fingerprint of the data calibrate() tuned on
        self._clinical: tuple[dict, object] | None = None  # (figures, the data they are on)

    @property
    def tta(self) -> bool:
        """Test-time augmentation; part of the model's decision rule once there is a model."""
        return self.decision.test_time_augmentation if self.model is not None else self._tta

    @tta.setter
    def tta(self, value: bool) -> None:
        self._tta = bool(value)
        if self.model is not None:
            head = find_head(self.model)
            head.set_decision(dataclasses.replace(head.decision, test_time_augmentation=self._tta))

    @property
    def threshold(self) -> float | None:
        """The binary decision threshold stored in the model (None until :meth:`calibrate`)."""
        return self.decision.threshold if self.model is not None else None

    @property
    def temperature(self) -> float:
        return float(find_head(self.model).temperature.numpy()) if self.model is not None else 1.0

    def _decision_options(self) -> dict:
        return {"test_time_augmentation": self._tta}

    @classmethod
    def _arguments_saved_in(cls, model, head) -> dict:
        rule = head.decision
        return {**super()._arguments_saved_in(model, head), "tta": rule.test_time_augmentation,
                **({"positive_class": rule.positive_class} if rule.positive_class else {})}

    # --- training -------------------------------------------------------------------------

    def objective(self, train):
        """Classification's, with class weights from the training split (scikit-learn's
        "balanced") and the focal loss when asked."""
        from restransfer.training.objectives import ClassificationObjective

        class_weight = None
        if self.class_weight == "balanced" and isinstance(train, data_lib.ImageData) and not train.multi_label:
            from sklearn.utils.class_weight import compute_class_weight

            present = np.unique(train.labels)
            weights = compute_class_weight("balanced", classes=present, y=train.labels)
            class_weight = {int(c): float(w) for c, w in zip(present, weights)}
        elif isinstance(self.class_weight, dict):
            class_weight = {int(k): float(v) for k, v in self.class_weight.items()}
        return ClassificationObjective(self.num_classes, self.multi_label, self.focal_gamma, class_weight)

    # --- clinical evaluation ---------------------------------------------------------------

    def _check_task(self, train) -> None:
        if len(self.class_names) == 2 and not self.multi_label:
            self._positive_index()
        normalize = self.decode_options.get("normalize")
        if normalize not in (None, "auto") and getattr(train, "paths", None) is not None \
                and not any(data_lib.high_bit_depth(p) for p in train.paths):
            raise ValueError(f"normalize={normalize!r} acts on DICOM (without a window), NIfTI and 16-bit PNG/TIFF "
                             f"files, and none of the {len(train)} training files is one (8-bit files are used as "
                             "stored): remove it (or set it to 'auto')")

    def _positive_index(self) -> int:
        """A binary task's positive class must be named: sensitivity and specificity swap
        silently when a sorted-name rule picks the wrong one (abnormal / normal)."""
        if self.positive_class is None:
            raise ValueError(f"a binary medical task needs its positive class: set positive_class "
                             f"(medical.positive_class in a recipe file) to one of {self.class_names}")
        if self.positive_class not in self.class_names:
            raise ValueError(f"positive_class {self.positive_class!r} is not one of {self.class_names}")
        return self.class_names.index(self.positive_class)

    def calibrate(self, validation_data, split: str = "val") -> dict:
        """Chooses the decision threshold (and, if asked, a temperature) on validation data
        and stores them in the model. ``split`` names that data in the model card."""
        head = find_head(self._require_model())
        head.temperature.assign(1.0)  # calibrate the model's own probabilities, not a previous fit
        val = self._as_data(validation_data, split="val")
        self._calibrated_on = _fingerprint(val)
        probabilities = self.predict_dataset(val)
        if self.temperature_scaling and not self.multi_label:
            temperature = metrics.fit_temperature(val.labels, np.log(np.clip(probabilities, 1e-7, 1)))
            head.temperature.assign(temperature)
            probabilities = self.predict_dataset(val)
        if len(self.class_names) == 2 and not self.multi_label:
            positive = self._positive_index()
            truth, scores = (val.labels == positive).astype(int), probabilities[:, positive]
            threshold = metrics.choose_threshold(truth, scores, self.threshold_method, self.target_sensitivity)
            there = metrics.binary_report(truth, scores, threshold, bootstrap=0)
            method = ("Youden's J" if self.threshold_method == "youden"
                      else f"sensitivity >= {self.target_sensitivity}")
            head.set_decision(DecisionRule(
                "threshold", positive_class=self.class_names[positive], threshold=threshold,
                test_time_augmentation=self.tta,
                chosen_on={"split": split, "images": int(len(val)), "method": method,
                           "figures": {k: there[k] for k in ("sensitivity", "specificity", "auc") if k in there}}))
        return {"threshold": self.threshold, "temperature": self.temperature}

    def evaluate_clinical(self, test_data, groups=None, bootstrap: int = 1000) -> dict:
        """The numbers a paper needs on test data, at the threshold chosen by :meth:`calibrate`
        (0.5 if it was not called). ``groups`` (e.g. patient ids) adds per-patient figures."""
        test = self._as_data(test_data, split="test")
        probabilities = self.predict_dataset(test)
        report = {}
        if self._calibrated_on is not None and _fingerprint(test) == self._calibrated_on:
            report["optimistic"] = ("these figures are on the data the threshold was chosen on; "
                                    "evaluate on a held-out test split for unbiased figures")
        if self.multi_label:
            thresholds = self.decision.thresholds
            return {**report, "per_label": {name: metrics.binary_report(test.labels[:, j], probabilities[:, j],
                                                                        thresholds[j], bootstrap=bootstrap)
                                            for j, name in enumerate(self.class_names)}}
        decided = np.asarray(self.decision.decide(probabilities, self.class_names))
        report = {**report, "auc": metrics.multiclass_auc(test.labels, probabilities),
                  "ece": metrics.expected_calibration_error(test.labels, probabilities),
                  "accuracy": float((decided == test.labels).mean())}  # of the model's decisions
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

    def _figures(self, probabilities, labels) -> dict[str, float]:
        """Classification's figures of the model's decisions, and for a binary task the clinical
        figures at its threshold: AUC, sensitivity, specificity, PPV, NPV."""
        figures = super()._figures(probabilities, labels)
        labels = np.asarray(labels)
        if len(self.class_names) == 2 and not self.multi_label and self.decision.positive_class:
            positive = self.class_names.index(self.decision.positive_class)
            truth = (labels == positive).astype(int)
            if 0 < truth.sum() < len(truth):
                threshold = 0.5 if self.threshold is None else self.threshold
                clinical = metrics.binary_report(truth, probabilities[:, positive], threshold, bootstrap=0)
                figures.update({key: clinical[key] for key in ("auc", "sensitivity", "specificity", "ppv", "npv")})
                figures["threshold"] = float(threshold)
        return figures

    # --- the run's report -----------------------------------------------------------------

    def tuned_on_validation(self) -> list[str]:
        return super().tuned_on_validation() + ["the decision threshold was chosen"]

    def inner_validation_fraction(self) -> float:
        """Cross-validation: the share of each fold's training part that chooses the threshold."""
        return self.threshold_val_fraction

    def after_training(self, val, scored, out_dir: Path, tuned_on: str, scored_on: str) -> dict:
        """Threshold (and temperature) chosen on ``val``, stored in the model, then applied
        unchanged to ``scored``; Grad-CAM overlays of its first images. The report names both."""
        if val is not None:
            self.calibrate(val, split=tuned_on)
        clinical = {"decision_rule": self.decision.describe(), "threshold_chosen_on": tuned_on,
                    "figures_on": scored_on, **self.evaluate_clinical(scored)}
        if self.gradcam_images:
            self.grad_cam_overlays(scored, Path(out_dir) / "gradcam", count=self.gradcam_images)
        self._clinical = (clinical, scored)
        return {"clinical": clinical}

    def fold_figures(self, findings: dict) -> dict:
        binary = findings.get("clinical", {}).get("binary", {})
        return {f"test_{k}": binary[k] for k in ("auc", "sensitivity", "specificity", "accuracy") if k in binary}

    def _headline(self, metrics: dict, split_notes: dict) -> list:
        from restransfer.evaluation.report import with_ci

        clinical = self._clinical[0] if self._clinical else None
        if clinical and "binary" in clinical:
            binary = clinical["binary"]
            return [(name, with_ci(binary, key), clinical["figures_on"])
                    for name, key in (("AUC", "auc"), ("sensitivity", "sensitivity"), ("specificity", "specificity"))]
        return super()._headline(metrics, split_notes)

    def _report_extras(self, run_dir: Path) -> dict:
        from restransfer.evaluation import report as report_lib

        extras = {"extra_images": sorted((Path(run_dir) / "gradcam").glob("*.png"))}
        if not self._clinical:
            return extras
        clinical, data = self._clinical
        plots = (None, None)
        if "binary" in clinical and data is not None:
            scores = self.predict_dataset(data)
            positive = self.class_names.index(self.decision.positive_class)
            truth = (np.asarray(data.labels) == positive).astype(int)
            on = clinical["figures_on"].split(":")[0]
            plots = (report_lib.operating_point_png(truth, scores[:, positive], self.decision.threshold, on,
                                                    self.class_names[positive]),
                     report_lib.calibration_png(np.eye(len(self.class_names))[data.labels], scores,
                                                on, temperature=self.temperature))
        return {**extras, "clinical": clinical, "clinical_plots": plots}


def _fingerprint(data) -> str | None:
    """Identifies a data set by content (to notice figures on the data that tuned them)."""
    import hashlib

    digests = data_lib.content_digests(data) if isinstance(data, data_lib.ImageData) else None
    if digests is None:
        return None
    return hashlib.sha256("".join(digests).encode()).hexdigest()
