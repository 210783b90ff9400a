"""Fake quantizers with a *tensor* bitwidth and straight-through estimators (STE).

Two schemes share one interface (:class:`Scheme`), in the spirit of tfmot's quantizer / quantize-config split:
layers ask a scheme to quantize their kernel or their activation at the bitwidth they were given.

* ``dorefa`` -- the reference's "Yu21" (Any-Precision) scheme (docs/quantizers.md, "dorefa").
* ``exact``  -- TFLite-exact: symmetric per-channel weights whose values are integer multiples of one scale
  per output channel (codes in ``[-(2^(k-1)-1), 2^(k-1)-1]``, so they store exactly in int8 / int4 with zero
  point 0), 1-bit as ``sign(W) * mean|W|`` (codes ±1).  Activations are on the ``[0, 1]`` grid with step
  ``1/(2^k-1)``, which an 8-bit tensor with that scale represents exactly.

Bit values are float tensors; :data:`~tfbitmeta.quant.bitwidth.FP` (32) means full precision.
"""
from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from tfbitmeta.errors import BadArgument
from tfbitmeta.quant.bitwidth import FP, MAX_BITS


def round_ste(x):
    """round(x) forward, identity gradient backward (round half to even, as torch.round)."""
    return x + tf.stop_gradient(tf.round(x) - x)


def sign_ste(x):
    return x + tf.stop_gradient(tf.sign(x) - x)


def is_fp(bits):
    return bits >= FP


def levels(bits):
    """2^k - 1 quantization steps for a k-bit unsigned grid (k as a float tensor)."""
    return tf.pow(2.0, tf.minimum(bits, 24.0)) - 1.0


def quantize_activation(x, bits):
    """ReLU + k-bit activation quantization; FP is a plain (unclipped) ReLU.  Shared by both schemes."""
    relu = tf.nn.relu(x)
    a = tf.clip_by_value(x, 0.0, 1.0)  # gradient only inside [0, 1]
    n = levels(bits)
    q = a + tf.stop_gradient(tf.round(a * n) / n - a)
    return tf.where(is_fp(bits), relu, q)


class Scheme:
    name = "base"

    def quantize_weight(self, w, bits, reduce_axes):
        raise NotImplementedError

    def quantize_activation(self, x, bits):
        return quantize_activation(x, bits)


class DoReFa(Scheme):
    """Any-Precision / "Yu21" DoReFa weights scaled by E = stop_grad(mean|W|)."""

    name = "dorefa"

    def quantize_weight(self, w, bits, reduce_axes):
        e = tf.stop_gradient(tf.reduce_mean(tf.abs(w)))
        t = tf.tanh(w)
        t = t / tf.reduce_max(tf.abs(t))  # the max is not detached (reference)
        u = (t + 1.0) / 2.0
        n = levels(bits)
        q = round_ste(u * n) / n
        multi = (2.0 * q - 1.0) * e
        binary = sign_ste(w / e) * e
        out = tf.where(bits <= 1.0, binary, multi)
        return tf.where(is_fp(bits), w, out)


@functools.lru_cache(maxsize=None)
def gaussian_clip_ratios() -> np.ndarray:
    """MSE-optimal clipping range (in units of the RMS) of a symmetric grid with 2m+1 levels, m = 2^(k-1)-1,
    for a Gaussian tensor; index k = 0..MAX_BITS (entries below 2 unused).  Computed numerically, not tuned."""
    x = np.linspace(-10.0, 10.0, 40001)
    pdf = np.exp(-0.5 * x**2)
    pdf /= pdf.sum()
    ratios = np.full(MAX_BITS + 1, 1e6, dtype=np.float32)
    candidates = np.linspace(0.2, 10.0, 981)
    for k in range(2, 17):
        m = 2 ** (k - 1) - 1
        best, best_err = candidates[-1], np.inf
        for r in candidates:
            s = r / m
            q = np.clip(np.round(x / s), -m, m) * s
            err = float(np.sum(pdf * (x - q) ** 2))
            if err < best_err:
                best, best_err = r, err
        ratios[k] = best
    return ratios


class Exact(Scheme):
    """Symmetric per-output-channel integer grid (TFLite int8/int4 with zero point 0)."""

    name = "exact"

    @staticmethod
    def max_code(bits):
        """m = 2^(k-1) - 1 for k >= 2 (narrow range); 1 for 1-bit (codes ±1)."""
        return tf.maximum(tf.pow(2.0, tf.minimum(bits, 24.0) - 1.0) - 1.0, 1.0)

    def scale(self, w, bits, reduce_axes):
        """Per-channel scale s (stop-gradient), shape broadcastable to ``w``."""
        absw = tf.abs(w)
        mx = tf.reduce_max(absw, axis=reduce_axes, keepdims=True)
        rms = tf.sqrt(tf.reduce_mean(tf.square(w), axis=reduce_axes, keepdims=True))
        ratio = tf.gather(tf.constant(gaussian_clip_ratios()), tf.cast(tf.minimum(bits, MAX_BITS), tf.int32))
        m = self.max_code(bits)
        multi = tf.minimum(mx, ratio * rms) / m
        binary = tf.reduce_mean(absw, axis=reduce_axes, keepdims=True)
        s = tf.where(bits <= 1.0, binary, multi)
        return tf.stop_gradient(tf.maximum(s, 1e-12))

    def codes(self, w, bits, reduce_axes):
        """Integer codes (as float) and the scale: ``W_q = codes * scale``."""
        s = self.scale(w, bits, reduce_axes)
        m = self.max_code(bits)
        multi = round_ste(tf.clip_by_value(w / s, -m, m))
        binary = sign_ste(w)
        return tf.where(bits <= 1.0, binary, multi), s

    def quantize_weight(self, w, bits, reduce_axes):
        c, s = self.codes(w, bits, reduce_axes)
        return tf.where(is_fp(bits), w, c * s)


SCHEMES = {s.name: s for s in (DoReFa(), Exact())}
"""The quantizer schemes by name (the CLI's ``--scheme`` choices)."""

DEFAULT_SCHEME = Exact.name
"""The scheme of layers, model configs, trainers and the CLI unless one is given: TFLite-exact integer grids."""


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise BadArgument(f"unknown quantizer scheme {name!r}; choose from {', '.join(SCHEMES)}", param="scheme") from None
