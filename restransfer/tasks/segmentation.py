"""SegmentationRecipe: a class per pixel, with a U-Net decoder on the ResNet's stages.

What the task contributes to the shared :class:`~restransfer.tasks.base.Recipe`: image/mask
pairs as its data (:mod:`restransfer.data.masks`), the U-Net head (:mod:`restransfer.models.unet`),
cross-entropy + soft Dice as its objective, masks as its predictions (``predict_masks`` at each
image's own size), Dice/IoU figures (:mod:`restransfer.evaluation.segmentation`), the served
masks (:mod:`restransfer.serving.segmentation`) and the report's segmentation sections.
Freezing, phases (the decoder takes the head's role: ``two_phase`` trains the decoder first,
then everything), resume, distribution and the image contract are the shared machinery's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from restransfer import data as data_lib
from restransfer.graph import plain
from restransfer.models.heads import find_head
from restransfer.models.unet import DECODER_WIDTHS, MaskDecision, SegmentationHead, masks_at_size, unet_outputs
from restransfer.tasks.base import COMMON_ARGUMENTS, Recipe, is_tf_dataset


class SegmentationRecipe(Recipe):
    __doc__ = """Semantic segmentation by fine-tuning a U-Net on a ResNet encoder.

    Example::

        recipe = SegmentationRecipe(backbone="resnet34", weights="imagenet", image_size=256,
                                    class_names=["background", "polyp"])
        recipe.fit("data/kvasir_seg")                    # train/ and val/, each images/ + masks/
        recipe.evaluate("data/kvasir_seg/val")           # {'dice': ..., 'iou': ..., 'per_class': ...}
        masks = recipe.predict_masks(["frame.jpg"])      # class ids at each image's own size
        recipe.export("serving/")                        # masks served as PNG bytes

    Arguments of the task:
        decoder_widths: the 5 decoder blocks' widths, deepest first.
        ignore_index: mask value of pixels without truth (e.g. 255), left out of loss and figures.
        mask_values: stored mask value -> class id (e.g. ``{0: 0, 255: 1}``).
        class_weights: a weight per class on the cross-entropy term.
        loss: ``"ce+dice"`` (default), ``"ce"`` or ``"dice"``.
        threshold: a binary task's foreground threshold (0.5), or ``"tune"``: chosen on the
            validation data after training to maximise its Dice (the figures on that data are
            then optimistic, and say so).
    """ + COMMON_ARGUMENTS

    task = "segmentation"
    backbone_pooling = None  # the decoder takes the stages' feature maps

    def __init__(self, backbone: str = "resnet34", weights="imagenet", *, decoder_widths=DECODER_WIDTHS,
                 ignore_index: int | None = None, mask_values: dict | None = None, class_weights=None,
                 loss: str = "ce+dice", threshold: float | str = 0.5, **options):
        super().__init__(backbone, weights, **options)
        self.decoder_widths = tuple(int(w) for w in decoder_widths)
        if len(self.decoder_widths) != 5:
            raise ValueError(f"decoder_widths needs 5 widths (deepest first), got {decoder_widths}")
        if ignore_index is not None and not 0 <= int(ignore_index) <= 255:
            raise ValueError(f"ignore_index must be a mask value 0..255, got {ignore_index}")
        if not (threshold == "tune" or isinstance(threshold, (int, float)) and 0 < threshold < 1):
            raise ValueError(f"threshold must be in (0, 1) or 'tune', got {threshold!r}")
        for index, phase in enumerate(self.phases):
            if phase.mixup or phase.label_smoothing:
                raise ValueError(f"phase {index + 1}: MixUp and label smoothing are for classification, "
                                 "not segmentation masks")
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.mask_values = {int(k): int(v) for k, v in mask_values.items()} if mask_values else None
        self.class_weights, self.loss, self.threshold_setting = class_weights, loss, threshold
        self.empty_masks = 0

    # --- the task's part ---------------------------------------------------------------------

    def read_source(self, source, **options):
        return data_lib.as_segmentation_data(source, ignore_index=self.ignore_index, mask_values=self.mask_values,
                                             **options)

    def _head_outputs(self, backbone, inputs):
        binary = self.num_classes == 2
        threshold = 0.5 if self.threshold_setting == "tune" else float(self.threshold_setting)
        head = SegmentationHead(self.num_classes, class_names=self.class_names, image_contract=self.image_contract(),
                                decision={"threshold": threshold if binary else None}, ignore_index=self.ignore_index,
                                task=self.task, name="head")
        return unet_outputs(backbone, inputs, head, self.decoder_widths)

    def _adopt_data(self, train) -> None:
        self.empty_masks = train.empty_masks

    def _check_task(self, train) -> None:
        if self.class_weights is not None and len(self.class_weights) != self.num_classes:
            raise ValueError(f"{len(self.class_weights)} class_weights for {self.num_classes} classes {self.class_names}")

    def objective(self, train):
        from restransfer.training.objectives import SegmentationObjective

        return SegmentationObjective(self.num_classes, self.ignore_index, self.class_weights, self.loss)

    @classmethod
    def _arguments_saved_in(cls, model, head) -> dict:
        return {"ignore_index": head.ignore_index}

    @property
    def decision(self) -> MaskDecision:
        """How the model's probabilities become a class per pixel (stored in its head)."""
        return find_head(self._require_model()).decision

    # --- predictions ---------------------------------------------------------------------------

    def predict(self, images, batch_size: int | None = None) -> np.ndarray:
        """Probabilities at the model's resolution [N, S, S, C'] (C' = 1 foreground map for a
        binary task, else one per class) for image files or raw 0-255 pixel arrays."""
        return self._require_model().predict(self._resized(self._input_pixels(images)),
                                             batch_size=batch_size or self.batch_size, verbose=0)

    def predict_masks(self, images) -> list[np.ndarray]:
        """The decided mask of each image at its own size (uint8 class ids, H x W): the
        probabilities resized to the image, then thresholded (binary) or argmaxed -- what the
        exported model's ``mask_png_bytes`` holds."""
        pixels = self._input_pixels(images)
        probabilities = self._require_model().predict(self._resized(pixels), batch_size=self.batch_size, verbose=0)
        decision = self.decision
        return [np.asarray(masks_at_size(p, image.shape[0], image.shape[1], decision))
                for p, image in zip(probabilities, pixels)]

    def _masks_and_truths(self, data, keep_probabilities: bool = False):
        """(decided masks, true masks, original images, foreground probabilities) of every
        image of ``data``, at the images' own sizes."""
        model, decision = self._require_model(), self.decision
        originals = data.dataset
        batches = self._pipeline(data, training=False).map(plain(lambda images, _: images))
        decided, truths, images, foreground = [], [], [], []
        originals_iterator = iter(originals)
        for batch in batches:
            probabilities = model.predict_on_batch(batch)
            for p in np.asarray(probabilities):
                image, truth = next(originals_iterator)
                image, truth = image.numpy(), truth.numpy()
                decided.append(np.asarray(masks_at_size(p, truth.shape[0], truth.shape[1], decision)))
                truths.append(truth)
                images.append(image)
                if keep_probabilities:
                    import tensorflow as tf

                    foreground.append(tf.image.resize(p[None], truth.shape, method="bilinear")[0, ..., 0].numpy())
        return decided, truths, images, foreground

    def evaluate(self, data, verbose=0, bootstrap: int = 1000) -> dict:
        """Dice and IoU of the model's decided masks against the truth, at each image's own
        size: per class, per image (mean, bootstrap 95 % interval) and over the split's pooled
        pixels ("dataset_"), their foreground means (``dice``, ``iou``, ...), pixel
        sensitivity/precision for a binary task, and the rule for empty images."""
        figures, _ = self._evaluate(self._as_data(data, split="test"), bootstrap)
        return figures

    def _evaluate(self, source, bootstrap: int = 1000):
        from restransfer.evaluation.segmentation import pixel_counts, segmentation_figures

        if is_tf_dataset(source):
            raise TypeError("evaluate a segmentation model on image/mask pairs (a folder, CSV, .npz or arrays)")
        decided, truths, images, _ = self._masks_and_truths(source)
        counts = np.stack([pixel_counts(t, d, self.num_classes, self.ignore_index) for t, d in zip(truths, decided)])
        figures = segmentation_figures(counts, self.class_names, bootstrap=bootstrap, seed=self.seed)
        figures["empty_masks"] = int(source.empty_masks)
        return figures, (decided, truths, images)

    def calibrate(self, validation_data, split: str = "val") -> dict:
        """A binary task's foreground threshold chosen on ``validation_data`` (the highest
        dataset Dice over 0.05..0.95) and stored in the model as its decision rule."""
        from restransfer.evaluation.segmentation import best_threshold

        if self.num_classes != 2:
            raise ValueError("only a binary segmentation model decides by a threshold")
        head = find_head(self._require_model())
        head.set_decision(MaskDecision(threshold=0.5))
        val = self._as_data(validation_data, split="val")
        _, truths, _, foreground = self._masks_and_truths(val, keep_probabilities=True)
        threshold, dice = best_threshold(foreground, truths, self.ignore_index)
        head.set_decision(MaskDecision(threshold=threshold, chosen_on={
            "split": split, "images": len(val), "method": "the highest dataset Dice", "dice": dice}))
        return {"threshold": threshold, "dice": dice}

    def decision_text(self) -> str:
        return self.decision.describe(self.class_names)

    def prediction_record(self, path, index: int, top_k: int = 3, out_dir=None) -> dict:
        """One file's mask (class ids, its own size) and overlay written as PNGs into
        ``out_dir`` (names made safe, numbered so inputs of one name never collide), and the
        share of its pixels each class has."""
        from PIL import Image

        from restransfer.evaluation.segmentation import overlay
        from restransfer.paths import file_stem

        out = Path(out_dir or "predictions")
        out.mkdir(parents=True, exist_ok=True)
        image = self._load(path)
        mask = self.predict_masks([image])[0]
        stem = file_stem(path, index)
        mask_file, overlay_file = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
        Image.fromarray(mask).save(mask_file)
        Image.fromarray(overlay(image, mask, self.ignore_index)).save(overlay_file)
        shares = np.bincount(mask.ravel(), minlength=self.num_classes) / mask.size
        return {"image": str(path), "mask": str(mask_file), "overlay": str(overlay_file),
                "size": [int(mask.shape[0]), int(mask.shape[1])],
                "classes": {name: float(share) for name, share in zip(self.class_names, shares)}}

    @staticmethod
    def record_line(record: dict) -> str:
        present = ", ".join(f"{name} {share:.1%}" for name, share in record["classes"].items() if share)
        return f"{record['image']}: mask {record['mask']} ({present}); overlay {record['overlay']}"

    # --- export -----------------------------------------------------------------------------

    def export(self, out_dir, model_name: str | None = None, version: int | None = None, warmup_images=None,
               format: str = "saved_model", quantization: str | None = None, heldout=None, representative=None,
               max_metric_drop: float = 0.02, allow_drop: bool = False, **_ignored) -> Path:
        """The model for deployment. ``format="saved_model"`` (TensorFlow Serving; see
        :mod:`restransfer.serving.segmentation`): probabilities and each image's mask at its own
        size as PNG bytes; refused unless the served masks equal :meth:`predict_masks` on
        ``warmup_images`` (files: their original bytes). ``"litert"``/``"onnx"``: pixels in,
        probabilities and the decided mask at the model's resolution out, checked in the
        runtime on ``heldout`` pairs (see :mod:`restransfer.serving.portable`)."""
        from restransfer.serving.segmentation import export_segmentation_model

        if format != "saved_model":
            return self._export_portable(out_dir, format, model_name, version, quantization, heldout, representative,
                                         max_metric_drop, allow_drop)

        if not self.worker.is_chief:
            print(f"worker {self.worker.index}: only the chief exports; nothing written")
            return Path(out_dir)
        decoded, encoded = self._export_samples(warmup_images)
        return export_segmentation_model(
            self._require_model(), out_dir, class_names=self.class_names, image_size=self.image_size,
            decision=self.decision, model_name=model_name or self.backbone_name, version=version,
            warmup_images=decoded, encoded_images=encoded, expected_masks=self.predict_masks,
            keep_precision=bool(self.keep_precision), decode_options=self.decode_options, metadata=self.describe())

    def describe(self) -> dict:
        return {**super().describe(), "decoder_widths": list(self.decoder_widths), "ignore_index": self.ignore_index,
                "empty_training_masks": self.empty_masks}

    # --- portable exports ----------------------------------------------------------------

    def _pixel_outputs(self, model):
        decision = self.decision

        def outputs(pixels):
            import tensorflow as tf

            probabilities = tf.cast(model(pixels, training=False), tf.float32)
            return {"probabilities": probabilities, "predictions": decision.decide(probabilities)}

        return outputs

    def _portable_targets(self, data, indices):
        """The true masks at the model's resolution (nearest neighbour), as training sees them."""
        from restransfer.data.decoding import resize_mask

        if isinstance(data.masks, list):
            masks = [data_lib.read_mask(data.masks[i], data.mask_values) for i in indices]
        else:
            masks = [data.masks[i] for i in indices]
        return np.stack([np.asarray(resize_mask(m, self.image_size)) for m in masks])

    def _portable_figures(self, outputs: dict, targets) -> dict:
        from restransfer.evaluation.segmentation import pixel_counts

        counts = sum(pixel_counts(t, p, self.num_classes, self.ignore_index)
                     for t, p in zip(targets, np.asarray(outputs["predictions"])))
        dice = [2 * c[0] / (c[1] + c[2]) for c in counts[1:] if c[1] + c[2]]
        return {"dataset_dice_at_model_size": float(np.mean(dice)) if dice else float("nan")}

    def _portable_outputs_card(self) -> dict:
        binary = self.num_classes == 2
        return {"probabilities": f"float32 [N, {self.image_size}, {self.image_size}, {1 if binary else self.num_classes}]",
                "predictions": f"int32 [N, {self.image_size}, {self.image_size}]: class ids by the decision rule at "
                               "the model's resolution (resize the probabilities to an image's size, then decide, "
                               "for its own-size mask)"}

    # --- the run's report -------------------------------------------------------------------------

    def tuned_on_validation(self) -> list[str]:
        tuned = ["early stopping kept its best epoch"] if self.early_stopping_patience else []
        if self.threshold_setting == "tune" and self.num_classes == 2:
            tuned.append("the foreground threshold was chosen")
        return tuned

    def inner_validation_fraction(self) -> float:
        return self.val_fraction

    def after_training(self, val, scored, out_dir: Path, tuned_on: str, scored_on: str) -> dict:
        if self.threshold_setting == "tune" and self.num_classes == 2 and val is not None:
            return {"threshold": {**self.calibrate(val, split=tuned_on), "chosen_on": tuned_on}}
        return {}

    def fold_figures(self, findings: dict) -> dict:
        return {}

    def report(self, run_dir: Path, title: str, splits: data_lib.Splits, split_notes: dict,
               shown_split: str = "validation") -> dict:
        """Scores the validation and test parts (``val_*``/``test_*``: the foreground figures;
        ``val_figures``/``test_figures``: everything, per class) and writes ``report.html``:
        summary, curves, the per-class table, per-image Dice, and the worst, median and best
        images of the validation part."""
        from restransfer.evaluation import report as report_lib
        from restransfer.evaluation import segmentation as seg

        metrics, shown = {}, None
        for name, part in (("val", splits.val), ("test", splits.test)):
            if part is None:
                continue
            figures, masks = self._evaluate(part)
            metrics.update({f"{name}_{key}": value for key, value in figures.items()
                            if isinstance(value, float) and np.isfinite(value)})
            metrics[f"{name}_figures"] = figures
            if shown is None:
                shown = (figures, masks)
        described = self.describe()
        headline = []
        for prefix in ("test", "val"):
            if f"{prefix}_dice" in metrics:
                role = split_notes.get(f"{prefix}_*", prefix)
                figures = metrics[f"{prefix}_figures"]
                interval = figures["dice_ci95"]
                headline = [("Dice (per image)", f"{figures['dice']:.3f} ({interval[0]:.3f}–{interval[1]:.3f})", role),
                            ("Dice (dataset)", f"{figures['dataset_dice']:.3f}", role),
                            ("IoU (per image)", f"{figures['iou']:.3f}", role)]
                break
        summary = {"task": self.task, "backbone": described["backbone"], "weights": described["weights"],
                   "splits": {name: len(part) for name, part in splits.items()},
                   "decision": self.decision.describe(self.class_names), "headline": headline}
        body = report_lib.summary_section(summary)
        notes = [report_lib.skipped_note(self.skipped),
                 f"{self.empty_masks} training mask(s) are empty (background only)",
                 f"empty images: {seg.EMPTY_RULE}", *(f"{key}: {role}" for key, role in split_notes.items())]
        body += "<ul>" + "".join(f"<li>{report_lib.html.escape(n)}</li>" for n in notes) + "</ul>"
        if self.history is not None and self.history.history:
            body += report_lib.png_section("Training curves (dotted lines: phase starts)",
                                           report_lib.curves_png(self.history.history, self.history.phase_starts,
                                                                 metrics=("loss", "dice")))
        if shown is not None:
            figures, (decided, truths, images) = shown
            rows = [[name, f"{c['dice']:.3f}", f"{c['dice_ci95'][0]:.3f}–{c['dice_ci95'][1]:.3f}", f"{c['dataset_dice']:.3f}",
                     f"{c['iou']:.3f}", f"{c['dataset_iou']:.3f}", c["images"], c["both_empty"]]
                    for name, c in figures["per_class"].items()]
            body += (f"<h2>Per class ({report_lib.html.escape(shown_split)})</h2>"
                     + report_lib.table(["class", "Dice (per image)", "95 % CI", "Dice (dataset)", "IoU (per image)",
                                         "IoU (dataset)", "images", "both empty"], rows))
            body += report_lib.png_section(f"Per-image Dice ({shown_split})",
                                           seg.dice_histogram_png(figures["per_image_dice"], shown_split))
            scores = [(-1.0 if v is None else v) for v in figures["per_image_dice"]]
            order = np.argsort(scores, kind="stable")
            picks = [("worst", order[0]), ("median", order[len(order) // 2]), ("best", order[-1])]
            examples = [(f"{label}: image {index + 1}", images[index], truths[index], decided[index],
                         figures["per_image_dice"][index] or 0.0) for label, index in picks]
            body += seg.examples_section(examples, self.class_names, shown_split, self.ignore_index)
        metric_rows = [[k, f"{v:.4f}"] for k, v in metrics.items() if isinstance(v, float)]
        body += "<h2>Metrics</h2>" + report_lib.table(["metric", "value"], metric_rows)
        report_lib.write_page(Path(run_dir) / "report.html", title, body)
        return metrics
