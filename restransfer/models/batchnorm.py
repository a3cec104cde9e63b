"""BatchNorm as TensorFlow's one fused kernel.

Keras 3 writes BatchNormalization as separate element-wise ops (moments, then
``tf.nn.batch_normalization``): in a ResNet-18 training step ~30 graph ops per layer forward
and more for the gradient, every one a pass over the activations. ``FusedBatchNormV3`` does
the same arithmetic in one kernel forward and one backward (oneDNN's on the CPU), so a
phase traces and optimises a smaller graph and every step makes fewer passes. The layer is
Keras' own otherwise: the same variables, config, momentum rule (Keras' biased batch
variance feeds the moving variance) and frozen/``trainable`` behaviour; masks, renorm,
synchronized statistics and other layouts fall back to Keras' code.
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="restransfer")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    def _fusable(self, inputs, mask) -> bool:
        return (mask is None and not self.renorm and not self.synchronized and len(inputs.shape) == 4
                and self.axis in (-1, 3) and keras.backend.backend() == "tensorflow")

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        # as Keras: statistics in float32 whatever the compute dtype
        x = tf.cast(inputs, tf.float32)
        channels = x.shape[-1]
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels])
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels])
        if training and self.trainable:
            empty = tf.constant([], tf.float32)
            y, mean, unbiased, *_ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=gamma, offset=beta, mean=empty, variance=empty, epsilon=self.epsilon,
                exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
            # the kernel returns the Bessel-corrected variance; Keras averages the biased one
            count = tf.cast(tf.size(x) // channels, tf.float32)
            variance = unbiased * (count - 1.0) / count
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
            # Grappler fuses this kernel with a following ReLU into oneDNN's, which turns NaN
            # into 0: a diverging backbone would leave the loss finite and the NaN guard blind.
            # The batch mean is computed before that activation, so a NaN/Inf batch reaches the
            # loss through it (0 * NaN is NaN; 0 otherwise, and no gradient flows back).
            self.add_loss(0.0 * tf.reduce_sum(mean))
        else:
            y, *_ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=gamma, offset=beta, mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32), epsilon=self.epsilon,
                exponential_avg_factor=1.0, data_format="NHWC", is_training=False)
            if training:
                # frozen inside a training step: no batch mean here, so the input itself is
                # summed for the guard (forward only: stop_gradient keeps the backward pass as it was)
                self.add_loss(0.0 * tf.reduce_sum(tf.stop_gradient(x)))
        return tf.cast(y, self.compute_dtype)
