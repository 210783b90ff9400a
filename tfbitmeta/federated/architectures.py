"""Client front ends of different architectures, as slices of one parameter *bank* (HeteroFL-style).

The bank holds, per model family, the weights of its widest member, plus one adapter per architecture that maps
the extractor output to the common feature shape the server backend reads.  An architecture is a family and a
width: its weights are the leading channels of every bank tensor it uses (``slice_bank``), so a narrower client
trains a sub-network of the wider one and HeteroFL averaging (``federated.strategy``) averages every parameter
over the clients whose slice contains it.  Different families share nothing but the feature space.

Everything is a pure function of tensors (no Keras variables) so that the same code runs in eager tests, in a
plain TF loop and inside ``tff.tensorflow.computation``: the quantization is the core's ``Exact`` scheme (weights
on a per-channel integer grid, activations ``j/(2^k-1)``) with the bitwidth as a tensor, like the core layers.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.quant.quantizers import get_scheme

FEATURE_CHANNELS = 16
MAX_WIDTH = 16
SCHEME = get_scheme("exact")
FIRST_LAST_BITS = 8.0  # the first conv and the exit head's dense stay at 8 bit, as in the core models


@dataclass(frozen=True)
class Arch:
    """One client architecture: ``family`` ("cnn" plain convs, "mobilenet" depthwise-separable) at ``width``."""
    name: str
    family: str
    width: int

    def slices(self, bank_shapes: dict) -> dict:
        """Bank entry -> the shape of this architecture's slice (leading indices of every axis)."""
        w, out = self.width, {}
        for key, shape in bank_shapes.items():
            fam, _, part = key.partition("/")
            if fam == self.family:
                out[key] = _narrow(part, shape, w)
            elif key == f"adapter_{self.name}/kernel" or key == f"adapter_{self.name}/bias":
                out[key] = tuple(shape)
        return out


def _narrow(part: str, shape, w: int) -> tuple:
    shape = list(shape)
    if part.endswith("bias"):
        return (min(w, shape[0]),)
    if part.startswith("c1"):  # first conv: image channels in, w out
        return (shape[0], shape[1], shape[2], w)
    if part.startswith("dw"):  # depthwise: (k, k, w, 1)
        return (shape[0], shape[1], w, 1)
    return (shape[0], shape[1], w, w)


ARCHITECTURES = {
    "cnn-w1": Arch("cnn-w1", "cnn", 16),
    "cnn-w05": Arch("cnn-w05", "cnn", 8),
    "cnn-w025": Arch("cnn-w025", "cnn", 4),
    "mobilenet": Arch("mobilenet", "mobilenet", 16),
    "mobilenet-w05": Arch("mobilenet-w05", "mobilenet", 8),
}


def parse_architectures(spec: str) -> list[Arch]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [n for n in names if n not in ARCHITECTURES]
    if bad or not names:
        raise TfbitmetaError(f"unknown architecture {', '.join(bad) or spec!r}: use {', '.join(ARCHITECTURES)}")
    return [ARCHITECTURES[n] for n in dict.fromkeys(names)]


def _he(rng, shape, fan_in):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def init_bank(archs: list[Arch], channels: int, seed: int) -> OrderedDict:
    """Bank for the families and adapters ``archs`` need, He-initialised (biases small positive so the [0, 1]
    activation grid starts populated)."""
    rng = np.random.default_rng(seed)
    W = MAX_WIDTH
    bank = OrderedDict()
    for fam in sorted({a.family for a in archs}):
        bank[f"{fam}/c1/kernel"] = _he(rng, (3, 3, channels, W), 9 * channels)
        bank[f"{fam}/c1/bias"] = np.full(W, 0.1, np.float32)
        if fam == "cnn":
            bank["cnn/c2/kernel"] = _he(rng, (3, 3, W, W), 9 * W)
            bank["cnn/c2/bias"] = np.full(W, 0.1, np.float32)
        else:
            bank["mobilenet/dw/kernel"] = _he(rng, (3, 3, W, 1), 9)
            bank["mobilenet/dw/bias"] = np.full(W, 0.1, np.float32)
            bank["mobilenet/pw/kernel"] = _he(rng, (1, 1, W, W), W)
            bank["mobilenet/pw/bias"] = np.full(W, 0.1, np.float32)
    for a in archs:
        bank[f"adapter_{a.name}/kernel"] = _he(rng, (1, 1, a.width, FEATURE_CHANNELS), a.width)
        bank[f"adapter_{a.name}/bias"] = np.full(FEATURE_CHANNELS, 0.1, np.float32)
    return bank


def slice_bank(bank: dict, arch: Arch) -> dict:
    """This architecture's weights: the leading part of each bank tensor it uses (static slices)."""
    shapes = {k: tuple(v.shape) for k, v in bank.items()}
    return {k: bank[k][tuple(slice(0, n) for n in s)] for k, s in arch.slices(shapes).items()}


def pad_to_bank(part: dict, bank_like: dict) -> OrderedDict:
    """Inverse of ``slice_bank`` for gradients/deltas: zero-pad each slice to its bank shape (absent -> zeros)."""
    out = OrderedDict()
    for k, ref in bank_like.items():
        if k in part:
            v = part[k]
            pads = [[0, int(r) - int(n)] for n, r in zip(v.shape, ref.shape)]
            out[k] = tf.pad(v, pads)
        else:
            out[k] = tf.zeros(ref.shape, tf.float32)
    return out


def slice_mask(bank: dict, arch: Arch) -> OrderedDict:
    """1 where ``arch`` holds a bank parameter, 0 elsewhere (numpy, for HeteroFL weighting)."""
    shapes = {k: tuple(v.shape) for k, v in bank.items()}
    sl = arch.slices(shapes)
    out = OrderedDict()
    for k, s in shapes.items():
        m = np.zeros(s, np.float32)
        if k in sl:
            m[tuple(slice(0, n) for n in sl[k])] = 1.0
        out[k] = m
    return out


# -- forward passes -------------------------------------------------------------------------------------
def _qconv(x, kernel, bias, w_bits, depthwise=False):
    axes = [0, 1] if depthwise else [0, 1, 2]
    k = SCHEME.quantize_weight(kernel, w_bits, axes)
    if depthwise:
        y = tf.nn.depthwise_conv2d(x, k, [1, 1, 1, 1], "SAME")
    else:
        y = tf.nn.conv2d(x, k, 1, "SAME")
    return tf.nn.bias_add(y, bias)


def _pool(x):
    return tf.nn.max_pool2d(x, 2, 2, "VALID") if x.shape[1] >= 2 else x


def extract(weights: dict, arch: Arch, x, bits):
    """Features at the split point, shape (B, H/4, W/4, FEATURE_CHANNELS), on the client's activation grid.

    ``bits``: float tensor ``[w_bits, a_bits]`` (32 = full precision).  The first conv runs at 8 bit."""
    w_bits, a_bits = bits[0], bits[1]
    first = tf.where(w_bits >= 32.0, w_bits, FIRST_LAST_BITS)
    f = arch.family
    h = SCHEME.quantize_activation(_qconv(x, weights[f"{f}/c1/kernel"], weights[f"{f}/c1/bias"], first), a_bits)
    h = _pool(h)
    if f == "cnn":
        h = SCHEME.quantize_activation(_qconv(h, weights["cnn/c2/kernel"], weights["cnn/c2/bias"], w_bits), a_bits)
    else:
        h = SCHEME.quantize_activation(
            _qconv(h, weights["mobilenet/dw/kernel"], weights["mobilenet/dw/bias"], w_bits, depthwise=True), a_bits)
        h = SCHEME.quantize_activation(_qconv(h, weights["mobilenet/pw/kernel"], weights["mobilenet/pw/bias"], w_bits), a_bits)
    h = _pool(h)
    a = f"adapter_{arch.name}"
    return SCHEME.quantize_activation(_qconv(h, weights[f"{a}/kernel"], weights[f"{a}/bias"], w_bits), a_bits)


def init_head(num_classes: int, seed: int, feature_shape: tuple) -> OrderedDict:
    """Early-exit head: one dense layer on the flattened split-point features (SplitGP's auxiliary classifier)."""
    rng = np.random.default_rng(seed + 7919)
    n = int(np.prod(feature_shape))
    return OrderedDict([("kernel", (rng.standard_normal((n, num_classes)) * np.sqrt(1.0 / n)).astype(np.float32)),
                        ("bias", np.zeros(num_classes, np.float32))])


def feature_shape(image_shape: tuple) -> tuple:
    """Shape of the split-point features for an image of ``image_shape`` (two 2x2 poolings, then the adapter)."""
    h, w = image_shape[0], image_shape[1]
    for _ in range(2):
        h, w = (h // 2 if h >= 2 else h), (w // 2 if w >= 2 else w)
    return (h, w, FEATURE_CHANNELS)


def exit_logits(head: dict, feats, bits):
    """The exit head at 8 bit (full precision in the FP task) on the flattened features."""
    w_bits = tf.where(bits[0] >= 32.0, bits[0], FIRST_LAST_BITS)
    k = SCHEME.quantize_weight(head["kernel"], w_bits, [0])
    return tf.matmul(tf.reshape(feats, [tf.shape(feats)[0], -1]), k) + head["bias"]


def flops(arch: Arch, image_shape: tuple) -> float:
    """Multiply-accumulates x 2 of the extractor and adapter for one image (the exit head is ``head_flops``)."""
    h, w, c = image_shape
    W = arch.width
    total = 2 * h * w * 9 * c * W
    h2, w2 = max(1, h // 2), max(1, w // 2)
    if arch.family == "cnn":
        total += 2 * h2 * w2 * 9 * W * W
    else:
        total += 2 * h2 * w2 * (9 * W + W * W)
    h4, w4 = max(1, h2 // 2), max(1, w2 // 2)
    total += 2 * h4 * w4 * W * FEATURE_CHANNELS
    return float(total)
