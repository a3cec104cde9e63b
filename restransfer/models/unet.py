"""A U-Net decoder on a restransfer backbone: segmentation with a ResNet encoder.

The encoder taps are the backbone's named stages at strides 2, 4, 8, 16 and 32 (stem and
stage1..stage4: ``conv1_relu`` and the last block of each stage; for the pre-activation v2
networks the stem's ``conv1_conv``, the BN+ReLU'd input of each stage's last block, and
``post_relu``), so freezing, BatchNorm policy and discriminative rates work on the encoder
exactly as for classification, and the decoder takes the role of the head.

Each decoder block upsamples to *its skip's* size (not "x 2"), so any input size works, not
only multiples of 32; the last block upsamples to the input size. The head
(:class:`SegmentationHead`) computes in float32 and returns probabilities at the input
resolution: one sigmoid map for a binary task, a softmax over the classes otherwise. It
carries the class names, the image contract and the decision rule (the foreground threshold
of a binary task), so they travel inside the model file.
"""

from __future__ import annotations

import dataclasses

import keras
from keras import layers, ops

from restransfer.models.batchnorm import FusedBatchNormalization
from restransfer.models.heads import TaskHead

DECODER_WIDTHS = (256, 128, 64, 32, 16)  # segmentation_models' U-Net default


def encoder_taps(backbone: keras.Model) -> list[str]:
    """Names of the layers the decoder takes, shallowest first (strides 2, 4, 8, 16, 32)."""
    names = [layer.name for layer in backbone.layers]
    preactivation = "post_relu" in names
    taps = ["conv1_conv" if preactivation else "conv1_relu"]
    for stage in range(2, 6):
        blocks = sorted(int(name.split("_")[1][5:]) for name in names
                        if name.startswith(f"conv{stage}_block") and name.endswith("_out"))
        if not blocks:
            raise ValueError(f"{backbone.name} has no conv{stage}_block*_out layers: not a restransfer ResNet")
        if preactivation:
            taps.append("post_relu" if stage == 5 else f"conv{stage}_block{blocks[-1]}_preact_relu")
        else:
            taps.append(f"conv{stage}_block{blocks[-1]}_out")
    return taps


@keras.saving.register_keras_serializable(package="restransfer")
class UpsampleTo(layers.Layer):
    """Bilinear resize of ``x`` to the spatial size of ``reference`` (its skip, or the input)."""

    def call(self, inputs):
        x, reference = inputs
        height, width = reference.shape[1], reference.shape[2]
        if height is None or width is None:
            shape = ops.shape(reference)
            height, width = shape[1], shape[2]
        return ops.image.resize(x, (height, width), interpolation="bilinear")

    def compute_output_shape(self, input_shapes):
        x, reference = input_shapes
        return (x[0], reference[1], reference[2], x[3])


@dataclasses.dataclass
class MaskDecision:
    """How probabilities become a class per pixel: argmax, or for a binary task (one sigmoid
    map) the foreground when its probability >= ``threshold``. ``chosen_on`` records where a
    tuned threshold was chosen."""

    threshold: float | None = 0.5
    chosen_on: dict | None = None

    def get_config(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self, class_names: list[str]) -> str:
        if self.threshold is None:
            return "each pixel's most probable class"
        text = f"'{class_names[1]}' where its probability >= {self.threshold:.4g}, else '{class_names[0]}'"
        if self.chosen_on:
            where = self.chosen_on
            text += f"; chosen on {where.get('split')} ({where.get('images')} images, {where.get('method')})"
        return text

    def decide(self, probabilities):
        """Class ids [..., H, W] (int32) from probabilities [..., H, W, C]; TensorFlow ops, so
        ``predict_masks`` and the serving graph decide by the same code."""
        import tensorflow as tf

        probabilities = tf.convert_to_tensor(probabilities, tf.float32)
        if self.threshold is None:
            return tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return tf.cast(probabilities[..., 0] >= self.threshold, tf.int32)


def masks_at_size(probabilities, height, width, decision: MaskDecision):
    """One image's decided mask at its own size (uint8 [height, width]): the probabilities at
    the model's resolution [S, S, C] resized bilinearly to (height, width), then decided."""
    import tensorflow as tf

    resized = tf.image.resize(tf.convert_to_tensor(probabilities, tf.float32)[None], tf.stack([height, width]),
                              method="bilinear")[0]
    return tf.cast(decision.decide(resized), tf.uint8)


@keras.saving.register_keras_serializable(package="restransfer")
class SegmentationHead(TaskHead):
    """3x3 convolution to the classes (float32), then sigmoid (binary: one map) or softmax."""

    def __init__(self, num_classes: int, class_names: list[str] | None = None, image_contract: dict | None = None,
                 decision: dict | None = None, ignore_index: int | None = None, task: str = "segmentation",
                 **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"segmentation needs at least 2 classes (background and one more), got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for num_classes={num_classes}")
        self.num_classes = int(num_classes)
        self.binary = self.num_classes == 2
        self.class_names = list(class_names) if class_names else ["background", *[f"class_{i}" for i in range(1, num_classes)]]
        self.image_contract = dict(image_contract or {})
        self.ignore_index = ignore_index
        self.task = task
        self.decision = MaskDecision(**(decision or {"threshold": 0.5 if self.binary else None}))
        self.check(self.decision)
        self.classifier = layers.Conv2D(1 if self.binary else self.num_classes, 3, padding="same",
                                        dtype="float32", name="classifier")

    def check(self, decision: MaskDecision) -> None:
        if self.binary and decision.threshold is None:
            raise ValueError("a binary segmentation model decides by a threshold on its foreground map")
        if not self.binary and decision.threshold is not None:
            raise ValueError(f"a {self.num_classes}-class segmentation model decides by argmax, not a threshold")

    def set_decision(self, decision: MaskDecision) -> None:
        self.check(decision)
        self.decision = decision

    def build(self, input_shape):
        self.classifier.build(tuple(input_shape))

    def call(self, features):
        logits = self.classifier(ops.cast(features, "float32"))
        return ops.sigmoid(logits) if self.binary else ops.softmax(logits, axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (1 if self.binary else self.num_classes,)

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        return {**config, "num_classes": self.num_classes, "class_names": self.class_names,
                "image_contract": self.image_contract, "decision": self.decision.get_config(),
                "ignore_index": self.ignore_index, "task": self.task}


def _conv_bn_relu(x, filters, name):
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = FusedBatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def unet_outputs(backbone: keras.Model, inputs, head: SegmentationHead, decoder_widths=DECODER_WIDTHS):
    """The U-Net's probabilities for ``inputs``: ``backbone`` (built without pooling) as the
    encoder, one decoder block per width (deepest first), ``head`` at the input resolution."""
    decoder_widths = tuple(int(w) for w in decoder_widths)
    if len(decoder_widths) != 5 or min(decoder_widths) < 1:
        raise ValueError(f"decoder_widths needs 5 positive widths (one per block, deepest first), got {decoder_widths}")
    taps = encoder_taps(backbone)
    encoder = keras.Model(backbone.inputs, [backbone.get_layer(name).output for name in taps], name=backbone.name)
    skips = encoder(inputs)
    x = skips[-1]
    references = [*skips[-2::-1], inputs]  # stage3, stage2, stage1, stem, then the input (no skip)
    for index, (width, reference) in enumerate(zip(decoder_widths, references), start=1):
        x = UpsampleTo(name=f"decoder{index}_up")([x, reference])
        if reference is not inputs:
            x = layers.Concatenate(name=f"decoder{index}_concat")([x, reference])
        x = _conv_bn_relu(x, width, f"decoder{index}_1")
        x = _conv_bn_relu(x, width, f"decoder{index}_2")
    return head(x)
