"""Keras layers whose bitwidth is a runtime tensor.

Every layer is called on ``[x, bits]`` where ``bits`` is the model's float input of shape ``(batch, 2)``
holding ``(weight_bits, activation_bits)`` (see :mod:`tfbitmeta.quant.bitwidth`).  A layer's ``precision`` is
its policy: ``"adaptive"`` follows the bits input; ``"fp"`` is always float; an integer (e.g. ``8``) is a
fixed bitwidth -- except in the full-precision task ``(FP, FP)``, where every layer runs in float, as in the
reference (mebqat-spec §1.1).
"""
from __future__ import annotations

import tensorflow as tf

from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.quant.bitwidth import FP, BitSpace
from tfbitmeta.quant.quantizers import get_scheme

ADAPTIVE = "adaptive"


def _check_precision(p):
    if p in (ADAPTIVE, "fp"):
        return p
    if isinstance(p, int) and 1 <= p <= 16:
        return p
    raise TfbitmetaError(f"bad layer precision {p!r}: use 'adaptive', 'fp' or an integer 1-16")


def _x_shape(shape):
    """The shape of ``x`` from the shape of ``[x, bits]`` (or of ``x`` itself)."""
    if isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], (tf.TensorShape, list, tuple)):
        return tf.TensorShape(shape[0])
    return tf.TensorShape(shape)


def _effective_bits(precision, bits_value, fp_task):
    if precision == ADAPTIVE:
        return bits_value
    if precision == "fp":
        return tf.constant(float(FP))
    return tf.where(fp_task, float(FP), float(precision))


class _BitMixin:
    """Shared config and bit selection of the quantized layers."""

    def _init_bits(self, scheme, precision, candidates):
        self.scheme_name = scheme
        self.scheme = get_scheme(scheme)
        self.precision = _check_precision(precision)
        self.candidates = BitSpace.from_config(candidates) if isinstance(candidates, dict) else (candidates or BitSpace())
        self.input_spec = None  # inputs are [x, bits]

    def weight_bits(self, bits):
        fp_task = bits[0, 0] >= FP
        return _effective_bits(self.precision, bits[0, 0], fp_task)

    def act_bits(self, bits):
        fp_task = bits[0, 0] >= FP
        return _effective_bits(self.precision, bits[0, 1], fp_task)

    def _bit_config(self):
        return {"scheme": self.scheme_name, "precision": self.precision, "candidates": self.candidates.to_config()}

    # Keras plumbing shared by the kernel layers: they are called on [x, bits] but shaped by x alone.
    def build(self, input_shape):
        super().build(_x_shape(input_shape))
        self.input_spec = None  # inputs are [x, bits]

    def compute_output_shape(self, input_shape):
        return super().compute_output_shape(_x_shape(input_shape))

    def get_config(self):
        return {**super().get_config(), **self._bit_config()}


class QConv2D(_BitMixin, tf.keras.layers.Conv2D):
    """Conv2D with a fake-quantized kernel at the bitwidth given by the ``bits`` input."""

    def __init__(self, filters, kernel_size, scheme="dorefa", precision=ADAPTIVE, candidates=None, **kwargs):
        kwargs.setdefault("kernel_initializer", pytorch_kernel_init())
        super().__init__(filters, kernel_size, **kwargs)
        self._init_bits(scheme, precision, candidates)

    def quantized_kernel(self, bits):
        return self.scheme.quantize_weight(self.kernel, self.weight_bits(bits), [0, 1, 2])

    def call(self, inputs):
        x, bits = inputs
        y = self.convolution_op(x, self.quantized_kernel(bits))
        if self.use_bias:
            y = tf.nn.bias_add(y, self.bias)
        return self.activation(y)


class QDepthwiseConv2D(_BitMixin, tf.keras.layers.DepthwiseConv2D):
    def __init__(self, kernel_size, scheme="dorefa", precision=ADAPTIVE, candidates=None, **kwargs):
        kwargs.setdefault("depthwise_initializer", pytorch_kernel_init())
        super().__init__(kernel_size, **kwargs)
        self._init_bits(scheme, precision, candidates)

    def quantized_kernel(self, bits):
        return self.scheme.quantize_weight(self.depthwise_kernel, self.weight_bits(bits), [0, 1])

    def call(self, inputs):
        x, bits = inputs
        y = tf.nn.depthwise_conv2d(
            x, self.quantized_kernel(bits), strides=(1,) + self.strides + (1,),
            padding=self.padding.upper(), dilations=self.dilation_rate, data_format="NHWC",
        )
        if self.use_bias:
            y = tf.nn.bias_add(y, self.bias)
        return self.activation(y)


class QDense(_BitMixin, tf.keras.layers.Dense):
    def __init__(self, units, scheme="dorefa", precision=ADAPTIVE, candidates=None, **kwargs):
        kwargs.setdefault("kernel_initializer", pytorch_kernel_init())
        super().__init__(units, **kwargs)
        self._init_bits(scheme, precision, candidates)

    def quantized_kernel(self, bits):
        return self.scheme.quantize_weight(self.kernel, self.weight_bits(bits), [0])

    def call(self, inputs):
        x, bits = inputs
        y = tf.matmul(x, self.quantized_kernel(bits))
        if self.use_bias:
            y = tf.nn.bias_add(y, self.bias)
        return self.activation(y)


class QReLU(_BitMixin, tf.keras.layers.Layer):
    """ReLU followed by activation quantization at the activation bitwidth (plain ReLU at FP)."""

    def __init__(self, scheme="dorefa", precision=ADAPTIVE, candidates=None, **kwargs):
        super().__init__(**kwargs)
        self._init_bits(scheme, precision, candidates)

    def call(self, inputs):
        x, bits = inputs
        return self.scheme.quantize_activation(x, self.act_bits(bits))

    def compute_output_shape(self, input_shape):
        return _x_shape(input_shape)


class BitBatchNorm(tf.keras.layers.Layer):
    """BatchNorm with shared affine parameters and per-bitwidth statistics.

    * training: always batch statistics (as the reference).
    * ``mode="batch"``: batch statistics at inference too -- the reference's transductive setting, which needs
      large test batches.
    * ``mode="calibrated"``: inference uses the statistics of the configuration given by the ``bits`` input
      (one slot per configuration of the candidate set), so batch-1 inference equals batched inference.  The
      slots are filled by :func:`tfbitmeta.quant.calibration.calibrate_batchnorm` after training.
    """

    MODES = ("batch", "calibrated")

    def __init__(self, candidates=None, mode="calibrated", epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise TfbitmetaError(f"bad BatchNorm mode {mode!r}; choose from {', '.join(self.MODES)}")
        self.candidates = BitSpace.from_config(candidates) if isinstance(candidates, dict) else (candidates or BitSpace())
        self.mode = mode
        self.epsilon = epsilon
        self.calibration_weight = None  # set by calibrate_batchnorm(): accumulate batch stats into the slot

    def build(self, input_shape):
        c = int(_x_shape(input_shape)[-1])
        n = len(self.candidates.configs)
        self.gamma = self.add_weight("gamma", shape=(c,), initializer="ones")
        self.beta = self.add_weight("beta", shape=(c,), initializer="zeros")
        self.moving_mean = self.add_weight("moving_mean", shape=(n, c), initializer="zeros", trainable=False)
        self.moving_variance = self.add_weight("moving_variance", shape=(n, c), initializer="ones", trainable=False)
        self._slot_table = self.candidates.slot_table()

    def slot(self, bits):
        return tf.constant(self._slot_table)[tf.cast(bits[0, 0], tf.int32), tf.cast(bits[0, 1], tf.int32)]

    def call(self, inputs, training=None):
        x, bits = inputs
        axes = list(range(len(x.shape) - 1))
        if training or self.mode == "batch" or self.calibration_weight is not None:
            mean, var = tf.nn.moments(x, axes)
            if self.calibration_weight is not None and not training:
                slot = self.slot(bits)
                self.moving_mean.scatter_nd_add([[slot]], [mean * self.calibration_weight])
                self.moving_variance.scatter_nd_add([[slot]], [var * self.calibration_weight])
        else:
            slot = self.slot(bits)
            mean, var = tf.gather(self.moving_mean, slot), tf.gather(self.moving_variance, slot)
        return tf.nn.batch_normalization(x, mean, var, self.beta, self.gamma, self.epsilon)

    def compute_output_shape(self, input_shape):
        return _x_shape(input_shape)

    def get_config(self):
        return {**super().get_config(), "candidates": self.candidates.to_config(), "mode": self.mode,
                "epsilon": self.epsilon}


def pytorch_kernel_init():
    """PyTorch's default conv/linear init, as the reference uses (mebqat-spec §8)."""
    return tf.keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


CUSTOM_OBJECTS = {c.__name__: c for c in (QConv2D, QDepthwiseConv2D, QDense, QReLU, BitBatchNorm)}
