"""Max-pooling whose training gradient does not depend on the TensorFlow build that runs it.

On quantized feature maps many pooling windows hold maxima that are equal in exact arithmetic (sums of products
of grid values); a convolution kernel that sums in another order makes them differ in the last bit.  TF's
``MaxPoolGrad`` hands the whole gradient of a window to one element, so a last-bit difference moves it: the TFF
worker (its own TensorFlow build) and Python's TensorFlow computed different rounds from the same inputs
(docs/federated.md, "TFF round = plain-TF round").  :class:`MaxPool2D` keeps Keras' forward op (exported
unchanged); in training its gradient is shared equally by the elements of a window within ``tolerance`` x the
channel's largest magnitude of the maximum -- far below a quantization step, far above rounding noise.
"""
from __future__ import annotations

import tensorflow as tf

TIE_TOLERANCE = 1e-5


def _windows(x, pool_size, strides):
    """Every 'valid' pooling window of ``x`` (N, H, W, C) as (N, Ho, Wo, kh * kw, C): one strided slice per window
    offset (their gradients are plain scatters in every TensorFlow build)."""
    (kh, kw), (sh, sw) = pool_size, strides
    ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    return tf.stack([x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] for i in range(kh) for j in range(kw)],
                    axis=3)


def max_pool_shared_ties(x, pool_size, strides, tolerance: float = TIE_TOLERANCE):
    """'valid' max-pool (NHWC) whose gradient is split equally among each window's (near-)maxima."""
    @tf.custom_gradient
    def pool(x):
        y = tf.nn.max_pool2d(x, pool_size, strides, "VALID")

        def grad(g):
            with tf.GradientTape() as tape:
                tape.watch(x)
                win = _windows(x, pool_size, strides)
            scale = tf.reduce_max(tf.abs(x), axis=[0, 1, 2])
            near = tf.cast(win >= y[:, :, :, None] - tolerance * scale, x.dtype)
            share = near / tf.reduce_sum(near, axis=3, keepdims=True)
            return tape.gradient(win, x, output_gradients=share * g[:, :, :, None])
        return y, grad
    return pool(x)


@tf.keras.utils.register_keras_serializable(package="tfbitmeta")
class MaxPool2D(tf.keras.layers.MaxPool2D):
    """:class:`tf.keras.layers.MaxPool2D` whose training gradient shares ties (:func:`max_pool_shared_ties`);
    inference, 'same' padding and channels-first run Keras' own op."""

    def call(self, inputs, training=None):
        if not training or self.padding != "valid" or self.data_format != "channels_last":
            return super().call(inputs)
        return max_pool_shared_ties(inputs, self.pool_size, self.strides)
