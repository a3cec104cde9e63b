"""Input preprocessing as a Keras layer, so raw 0-255 pixels go in everywhere.

The convention depends on where a backbone's weights came from:
  * ``caffe``: keras.applications ResNet v1 (BGR, ImageNet mean subtracted, no scaling)
  * ``tf``:    keras.applications ResNet v2 (scaled to [-1, 1])
  * ``torch``: torchvision weights (scaled to [0, 1], ImageNet mean/std)
  * ``none``:  identity (inputs are used as given)
"""

from __future__ import annotations

import keras
from keras import ops

PREPROCESSING_MODES = ("caffe", "tf", "torch", "none")

_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="restransfer")
class Preprocess(keras.layers.Layer):
    """Maps raw pixels (0-255, 1 or 3 channels) to what the backbone's weights expect.

    One-channel (grayscale) inputs are normalised with the channel-averaged statistics and
    then replicated to RGB, unless ``keep_channels`` (a backbone whose first conv was
    summed to one input channel, see :mod:`restransfer.models.backbones`). With the same statistics
    on all three channels, the two are exactly equivalent.
    """

    def __init__(self, mode: str = "caffe", keep_channels: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.keep_channels = bool(keep_channels)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(
                f"Unknown preprocessing mode {mode!r}; expected one of {PREPROCESSING_MODES}"
            )
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        gray = x.shape[-1] == 1
        average = (lambda values: (sum(values) / 3.0,)) if gray else tuple
        if self.mode == "caffe":
            mean = ops.convert_to_tensor(average(_CAFFE_BGR_MEAN), dtype=x.dtype)
            x = (x if gray else ops.flip(x, axis=-1)) - mean
        elif self.mode == "tf":
            x = x / 127.5 - 1.0
        elif self.mode == "torch":
            mean = ops.convert_to_tensor(average(_TORCH_MEAN), dtype=x.dtype)
            std = ops.convert_to_tensor(average(_TORCH_STD), dtype=x.dtype)
            x = (x / 255.0 - mean) / std
        if gray and not self.keep_channels:
            x = ops.repeat(x, 3, axis=-1)
        return x

    def compute_output_shape(self, input_shape):
        if input_shape[-1] == 1 and not self.keep_channels:
            return tuple(input_shape[:-1]) + (3,)
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "keep_channels": self.keep_channels}
