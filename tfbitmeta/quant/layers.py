"""Keras layers whose bitwidth is a runtime tensor.

Every layer is called on ``[x, bits]`` where ``bits`` is the model's float input of shape ``(batch, 2)``
holding ``(weight_bits, activation_bits)`` (see :mod:`tfbitmeta.quant.bitwidth`).  A layer's ``precision`` is
its policy: ``"adaptive"`` follows the bits input; ``"fp"`` is always float; an integer (e.g. ``8``) is a
fixed bitwidth -- except in the full-precision task ``(FP, FP)``, where every layer runs in float, as in the
reference (docs/method.md, "Tasks").
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfbitmeta.errors import BadArgument
from tfbitmeta.quant.bitwidth import FP, BitSpace
from tfbitmeta.quant.quantizers import DEFAULT_SCHEME, get_scheme, levels

ADAPTIVE = "adaptive"


def _check_precision(p):
    if p in (ADAPTIVE, "fp"):
        return p
    if isinstance(p, int) and 1 <= p <= 16:
        return p
    raise BadArgument(f"bad layer precision {p!r}: use 'adaptive', 'fp' or an integer 1-16", param="precision")


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


def _bitspace(candidates) -> BitSpace:
    """The candidate set from a :class:`BitSpace`, its config dict (a revived layer config) or None (the default)."""
    if candidates is None:
        return BitSpace()
    if isinstance(candidates, dict):
        return BitSpace.from_config(candidates)
    if isinstance(candidates, BitSpace):
        return candidates
    raise BadArgument(f"bad candidate bitwidths {candidates!r}: use a BitSpace", param="candidates")


class _BitMixin:
    """Shared config and bit selection of the quantized layers."""

    def _init_bits(self, scheme, precision, candidates):
        self.scheme_name = scheme
        self.scheme = get_scheme(scheme)
        self.precision = _check_precision(precision)
        self.candidates = _bitspace(candidates)
        self.input_spec = None  # inputs are [x, bits]

    def weight_bits(self, bits):
        """The weight bitwidth this layer uses for the ``bits`` input (a scalar float tensor)."""
        fp_task = bits[0, 0] >= FP
        return _effective_bits(self.precision, bits[0, 0], fp_task)

    def act_bits(self, bits):
        """The activation bitwidth this layer uses for the ``bits`` input (a scalar float tensor)."""
        fp_task = bits[0, 0] >= FP
        return _effective_bits(self.precision, bits[0, 1], fp_task)

    def get_config(self):
        return {**super().get_config(), "scheme": self.scheme_name, "precision": self.precision,
                "candidates": self.candidates.to_config()}

    @classmethod
    def from_config(cls, config):
        """Revive the nested candidate set (saved as a dict) before calling the constructor."""
        config = dict(config)
        config["candidates"] = _bitspace(config.get("candidates"))
        return cls(**config)


class _QuantizedKernel(_BitMixin):
    """The one ``call`` path of the kernel layers: quantize the kernel at the weight bitwidth, apply it, add the
    bias, activate.  A subclass names its kernel attribute, the axes reduced per output channel and the op."""

    kernel_attr = "kernel"
    reduce_axes: tuple[int, ...] = ()

    def _apply_kernel(self, x, kernel):
        raise NotImplementedError

    def quantized_kernel(self, bits):
        """The kernel fake-quantized at this layer's weight bitwidth for the ``bits`` input."""
        return self.scheme.quantize_weight(getattr(self, self.kernel_attr), self.weight_bits(bits),
                                           list(self.reduce_axes))

    def call(self, inputs):
        x, bits = inputs
        y = self._apply_kernel(x, self.quantized_kernel(bits))
        if self.use_bias:
            y = tf.nn.bias_add(y, self.bias)
        return self.activation(y)

    # Keras plumbing: the layers are called on [x, bits] but shaped by x alone.
    def build(self, input_shape):
        super().build(_x_shape(input_shape))
        self.input_spec = None  # inputs are [x, bits]

    def compute_output_shape(self, input_shape):
        return super().compute_output_shape(_x_shape(input_shape))


_BIT_ARGS = """scheme: quantizer scheme, a key of :data:`~tfbitmeta.quant.quantizers.SCHEMES`.
        precision: ``"adaptive"`` (follow the ``bits`` input), ``"fp"`` or a fixed bitwidth 1-16 (float in the
            full-precision task).
        candidates: the model's candidate bitwidths (:class:`~tfbitmeta.quant.bitwidth.BitSpace`); default all."""


def _kernel_layer_doc(summary: str, base: str, own_args: str) -> str:
    """The docstring of a quantized kernel layer: its summary, its own arguments, then the shared ones."""
    return f"""{summary}

    Called on ``[x, bits]``.

    Args:
        {own_args}
        {_BIT_ARGS}
        **kwargs: any :class:`{base}` argument (the kernel initializer defaults to PyTorch's).
    """


@tf.keras.utils.register_keras_serializable(package="tfbitmeta")
class QConv2D(_QuantizedKernel, tf.keras.layers.Conv2D):
    __doc__ = _kernel_layer_doc("Conv2D with a fake-quantized kernel at the bitwidth given by the ``bits`` input.",
                                "tf.keras.layers.Conv2D",
                                "filters: output channels.\n        kernel_size: an int or a pair.")

    reduce_axes = (0, 1, 2)

    def __init__(self, filters, kernel_size, scheme=DEFAULT_SCHEME, precision=ADAPTIVE, candidates=None, **kwargs):
        kwargs.setdefault("kernel_initializer", pytorch_kernel_init())
        super().__init__(filters, kernel_size, **kwargs)
        self._init_bits(scheme, precision, candidates)

    def _apply_kernel(self, x, kernel):
        return self.convolution_op(x, kernel)


@tf.keras.utils.register_keras_serializable(package="tfbitmeta")
class QDepthwiseConv2D(_QuantizedKernel, tf.keras.layers.DepthwiseConv2D):
    __doc__ = _kernel_layer_doc("DepthwiseConv2D with a fake-quantized kernel at the bitwidth of the ``bits`` input.",
                                "tf.keras.layers.DepthwiseConv2D", "kernel_size: an int or a pair.")

    kernel_attr = "depthwise_kernel"
    reduce_axes = (0, 1)

    def __init__(self, kernel_size, scheme=DEFAULT_SCHEME, precision=ADAPTIVE, candidates=None, **kwargs):
        kwargs.setdefault("depthwise_initializer", pytorch_kernel_init())
        super().__init__(kernel_size, **kwargs)
        self._init_bits(scheme, precision, candidates)

    def _apply_kernel(self, x, kernel):
        return tf.nn.depthwise_conv2d(x, kernel, strides=(1,) + self.strides + (1,), padding=self.padding.upper(),
                                      dilations=self.dilation_rate, data_format="NHWC")


@tf.keras.utils.register_keras_serializable(package="tfbitmeta")
class QDense(_QuantizedKernel, tf.keras.layers.Dense):
    __doc__ = _kernel_layer_doc("Dense with a fake-quantized kernel at the bitwidth given by the ``bits`` input.",
                                "tf.keras.layers.Dense", "units: output features.")

    reduce_axes = (0,)

    def __init__(self, units, scheme=DEFAULT_SCHEME, precision=ADAPTIVE, candidates=None, **kwargs):
        kwargs.setdefault("kernel_initializer", pytorch_kernel_init())
        super().__init__(units, **kwargs)
        self._init_bits(scheme, precision, candidates)

    def _apply_kernel(self, x, kernel):
        return tf.matmul(x, kernel)


class _Requantized:
    """What a quantizer downstream of an integer conv needs to round as the deployed kernel does.

    TFLite requantizes a conv's int32 accumulator with a fixed-point multiplier and *two* roundings: first to
    ``2^-r`` output steps, then to a whole step (both ties toward +inf on x86; docs/export.md).  With the small
    accumulators of low-bit layers ``r`` is 2-4 and the first rounding moves ~8 % of the outputs of a depthwise
    conv by one step.  ``requant_shift`` holds ``r`` per configuration slot and output channel (-1: unknown, round
    once); the export sets it while it aligns the biases (``tfbitmeta.export.graph.aligned_biases``), so the Keras
    model it verifies against computes the file's codes."""

    def _build_requant(self, input_shape):
        c = int(_x_shape(input_shape)[-1])
        # export-time state, a numpy array: no Keras weight (checkpoints and SavedModels unchanged); read when the
        # layer is called, so a function traced inside ``aligned_biases`` keeps the shifts of that block
        self.requant_shift = np.full((len(self.candidates.configs), c), -1.0, np.float32)
        self._slot_table = self.candidates.slot_table()

    def _deployed_steps(self, v, bits):
        """(known, steps): per channel whether the shift is known, and ``v`` (in output steps) rounded twice."""
        r = tf.gather(tf.constant(self.requant_shift), config_slot(self._slot_table, bits))
        p = tf.pow(tf.constant(2.0, tf.float64), tf.cast(tf.maximum(r, 0.0), tf.float64))
        steps = tf.floor(tf.floor(tf.cast(v, tf.float64) * p + 0.5) / p + 0.5)
        return r >= 0.0, tf.cast(steps, v.dtype)


class _ActivationQuantizer(_Requantized, _BitMixin, tf.keras.layers.Layer):
    """Shared plumbing of the quantizers called on ``[x, bits]`` that keep ``x``'s shape."""

    def __init__(self, scheme=DEFAULT_SCHEME, precision=ADAPTIVE, candidates=None, **kwargs):
        super().__init__(**kwargs)
        self._init_bits(scheme, precision, candidates)

    def compute_output_shape(self, input_shape):
        return _x_shape(input_shape)


@tf.keras.utils.register_keras_serializable(package="tfbitmeta")
class QReLU(_ActivationQuantizer):
    __doc__ = f"""ReLU followed by activation quantization at the activation bitwidth (plain ReLU at FP).

    Called on ``[x, bits]``.  At inference, a channel with a known ``requant_shift`` rounds as the integer kernel
    that writes it (:class:`_Requantized`).

    Args:
        {_BIT_ARGS}
        **kwargs: :class:`tf.keras.layers.Layer` arguments (``name``, ...).
    """

    def build(self, input_shape):
        self._build_requant(input_shape)

    def call(self, inputs, training=None):
        x, bits = inputs
        a = self.act_bits(bits)
        q = self.scheme.quantize_activation(x, a)
        if training:
            return q
        n = levels(a)
        known, steps = self._deployed_steps(x * n, bits)
        deployed = tf.clip_by_value(steps, 0.0, n) / n
        return tf.where(tf.logical_and(known, a < FP), deployed, q)


def config_slot(table, bits):
    """The slot of the configuration in the ``bits`` input in a per-configuration variable (``BitSpace.slot_table``)."""
    return tf.constant(table)[tf.cast(bits[0, 0], tf.int32), tf.cast(bits[0, 1], tf.int32)]


LINEAR_CODES = (-128, 127)
"""The int8 codes of a :class:`QLinear` grid (zero point 0)."""


def round_half_away(x):
    """Round to nearest, ties away from zero (TFLite's ``RoundingDivideByPOT``, e.g. in its int8 ADD)."""
    return tf.sign(x) * tf.floor(tf.abs(x) + 0.5)


@tf.keras.utils.register_keras_serializable(package="tfbitmeta")
class QLinear(_ActivationQuantizer):
    __doc__ = f"""8-bit quantization of a signed tensor that has no activation (a MobileNetV2 linear bottleneck, a
    residual sum), on the grid the integer model stores it on: ``s * q``, ``q`` in [-128, 127], zero point 0.

    Called on ``[x, bits]``.  ``s`` is a power of two per configuration of the candidate set (a ``scale`` slot, as
    :class:`BitBatchNorm`'s statistics), set after training by
    :func:`tfbitmeta.quant.calibration.calibrate_ranges` to the smallest one holding the largest ``|x|`` seen.
    With power-of-two scales TFLite's int8 ADD of two such tensors is exact up to its final rounding, which is
    half away from zero as here, so the Keras model and the integer file compute the same codes
    (docs/export.md, "Linear tensors").  Identity in training, at full-precision activations and while the
    slot is uncalibrated (0).

    Args:
        {_BIT_ARGS}
        **kwargs: :class:`tf.keras.layers.Layer` arguments (``name``, ...).
    """

    def build(self, input_shape):
        n = len(self.candidates.configs)
        self.scale = self.add_weight("scale", shape=(n,), initializer="zeros", trainable=False)
        self._build_requant(input_shape)

    def slot(self, bits):
        """The scale slot of the configuration in the ``bits`` input (a scalar int tensor)."""
        return config_slot(self._slot_table, bits)

    def call(self, inputs, training=None):
        x, bits = inputs
        if training:
            return x
        s = tf.gather(self.scale, self.slot(bits))
        v = tf.math.divide_no_nan(x, s)
        known, deployed = self._deployed_steps(v, bits)
        lo, hi = LINEAR_CODES
        q = s * tf.clip_by_value(tf.where(known, deployed, round_half_away(v)), float(lo), float(hi))
        return tf.where(tf.logical_and(s > 0.0, self.act_bits(bits) < FP), q, x)


STATISTICS = ("batch", "calibrated", "accumulate")
"""What a :class:`BitBatchNorm` normalizes with at inference: ``batch`` statistics, its ``calibrated`` per-bitwidth
slot, or batch statistics while ``accumulate``-ing them into the slot (calibration)."""


@tf.keras.utils.register_keras_serializable(package="tfbitmeta")
class BitBatchNorm(tf.keras.layers.Layer):
    """BatchNorm with shared affine parameters and per-bitwidth statistics.

    * training: always batch statistics (as the reference).
    * ``mode="batch"``: batch statistics at inference too -- the reference's transductive setting, which needs
      large test batches.
    * ``mode="calibrated"``: inference uses the statistics of the configuration given by the ``bits`` input
      (one slot per configuration of the candidate set), so batch-1 inference equals batched inference.  The
      slots are filled by :func:`tfbitmeta.quant.calibration.calibrate_batchnorm` after training.

    ``mode`` is fixed when the layer is made and is never switched from outside.  To run a model with other
    inference statistics, :func:`tfbitmeta.quant.calibration.with_bn_statistics` builds a twin model whose
    BatchNorms are :class:`BatchNormStatistics` views (same variables, their own fixed statistics), so a traced
    function always sees the statistics of the model it was traced with.

    Args:
        candidates: the model's candidate bitwidths; one statistics slot per configuration.
        mode: inference statistics, ``"calibrated"`` or ``"batch"``.
        epsilon: added to the variance.
        **kwargs: :class:`tf.keras.layers.Layer` arguments (``name``, ...).
    """

    MODES = ("batch", "calibrated")

    def __init__(self, candidates=None, mode="calibrated", epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise BadArgument(f"bad BatchNorm mode {mode!r}; choose from {', '.join(self.MODES)}", param="bn_mode")
        self.candidates = _bitspace(candidates)
        self.mode = mode
        self.epsilon = epsilon

    def build(self, input_shape):
        c = int(_x_shape(input_shape)[-1])
        n = len(self.candidates.configs)
        self.gamma = self.add_weight("gamma", shape=(c,), initializer="ones")
        self.beta = self.add_weight("beta", shape=(c,), initializer="zeros")
        self.moving_mean = self.add_weight("moving_mean", shape=(n, c), initializer="zeros", trainable=False)
        self.moving_variance = self.add_weight("moving_variance", shape=(n, c), initializer="ones", trainable=False)
        self._slot_table = self.candidates.slot_table()

    def slot(self, bits):
        """The statistics slot of the configuration in the ``bits`` input (a scalar int tensor)."""
        return config_slot(self._slot_table, bits)

    def normalize(self, inputs, training=None, statistics: str = "calibrated", weight: float = 0.0):
        """Normalize ``[x, bits]`` with explicit inference ``statistics`` (one of :data:`STATISTICS`); training
        always uses batch statistics.  ``accumulate`` adds ``weight`` x the batch statistics to the slot."""
        x, bits = inputs
        axes = list(range(len(x.shape) - 1))
        if training or statistics in ("batch", "accumulate"):
            mean, var = tf.nn.moments(x, axes)
            if statistics == "accumulate" and not training:
                slot = self.slot(bits)
                self.moving_mean.scatter_nd_add([[slot]], [mean * weight])
                self.moving_variance.scatter_nd_add([[slot]], [var * weight])
        else:
            slot = self.slot(bits)
            mean, var = tf.gather(self.moving_mean, slot), tf.gather(self.moving_variance, slot)
        return tf.nn.batch_normalization(x, mean, var, self.beta, self.gamma, self.epsilon)

    def call(self, inputs, training=None):
        return self.normalize(inputs, training, self.mode)

    def compute_output_shape(self, input_shape):
        return _x_shape(input_shape)

    def get_config(self):
        return {**super().get_config(), "candidates": self.candidates.to_config(), "mode": self.mode,
                "epsilon": self.epsilon}

    @classmethod
    def from_config(cls, config):
        """Revive the nested candidate set (saved as a dict) before calling the constructor."""
        config = dict(config)
        config["candidates"] = _bitspace(config.get("candidates"))
        return cls(**config)


class BatchNormStatistics(tf.keras.layers.Layer):
    """A view of a :class:`BitBatchNorm` (same variables) that normalizes with fixed ``statistics``.

    Made by :func:`tfbitmeta.quant.calibration.with_bn_statistics`; not serialized (a twin model is rebuilt from
    the original when needed).

    Args:
        bn: the BatchNorm whose variables this view uses.
        statistics: one of :data:`STATISTICS`.
        weight: for ``accumulate``, the factor of each batch's statistics (1 / number of batches).
    """

    def __init__(self, bn: BitBatchNorm, statistics: str, weight: float = 0.0, **kwargs):
        super().__init__(name=f"{bn.name}_{statistics}", **kwargs)
        if statistics not in STATISTICS:
            raise BadArgument(f"bad BatchNorm statistics {statistics!r}; choose from {', '.join(STATISTICS)}")
        self.bn, self.statistics, self.weight = bn, statistics, float(weight)
        self.candidates = bn.candidates

    def call(self, inputs, training=None):
        return self.bn.normalize(inputs, training, self.statistics, self.weight)

    def compute_output_shape(self, input_shape):
        return _x_shape(input_shape)


def pytorch_kernel_init():
    """PyTorch's default conv/linear init, as the reference uses (docs/method.md, "Models")."""
    return tf.keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


CUSTOM_OBJECTS = {c.__name__: c for c in (QConv2D, QDepthwiseConv2D, QDense, QReLU, QLinear, BitBatchNorm)}
"""Compatibility alias: the layers are registered with Keras (package ``tfbitmeta``), so ``load_model`` needs no
``custom_objects``; passing this dict still works."""
