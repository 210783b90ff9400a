"""Models as named parts: extractor -> early-exit head, and backend (the rest, ending in the classifier).

A family builds a list of :class:`Stage` objects that own their layers.  :class:`BitModel` applies them to
Keras inputs to make the full functional model and, sharing the same layer objects (so the same weights),
the parts cut at any stage boundary (the *split*).  Split ``s`` means "after stage ``s``" (1-based).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import tensorflow as tf

from tfbitmeta.errors import BadArgument, TfbitmetaError
from tfbitmeta.models.pooling import MaxPool2D
from tfbitmeta.quant.bitwidth import BitSpace
from tfbitmeta.quant.layers import ADAPTIVE, BitBatchNorm, QConv2D, QDense, QDepthwiseConv2D, QLinear, QReLU
from tfbitmeta.quant.quantizers import DEFAULT_SCHEME


def first_last_precision(first_last: str | int | None, scheme: str) -> str | int:
    """The precision of the first conv and the last dense layer: the one ``first_last="auto"`` rule.

    ``"auto"`` (or None) is ``"fp"`` for the reference's ``dorefa`` scheme (as the paper) and ``8`` for ``exact``
    (so the exported file is full-integer); ``"fp"``, ``8`` or ``"8"`` are kept (as ``"fp"`` / ``8``).
    """
    if first_last is None or first_last == "auto":
        return "fp" if scheme == "dorefa" else 8
    if first_last == "fp":
        return "fp"
    try:
        return int(first_last)
    except (TypeError, ValueError):
        raise BadArgument(f"bad first/last-layer precision {first_last!r}: use 'auto', 'fp' or 8",
                          param="first_last") from None


@dataclasses.dataclass
class ModelConfig:
    """What a model family builds: its input, classes, width, quantizer and bitwidth policy.

    Args:
        family: a key of :data:`tfbitmeta.models.FAMILIES`.
        input_shape: ``(height, width, channels)`` of the model input.
        num_classes: classifier outputs (0 for an embedding model).
        width: the family's width parameter (multiplier, base channels or alpha).
        scheme: quantizer scheme, a key of :data:`tfbitmeta.quant.quantizers.SCHEMES`.
        first_last: precision of the first conv, the last dense and the activation feeding it; ``"auto"`` is
            resolved by :func:`first_last_precision` when the config is made.
        bn_mode: :class:`~tfbitmeta.quant.layers.BitBatchNorm` inference statistics, ``"calibrated"`` or ``"batch"``.
        candidates: the bitwidths the model supports.
        exits: split points with an early-exit head; None = the family's default.
        dropout: dropout rate; None = the family's default.
    """

    family: str = "svhn_cnn"
    input_shape: tuple[int, int, int] = (28, 28, 1)
    num_classes: int = 10
    width: float = 2.0
    scheme: str = DEFAULT_SCHEME
    first_last: str | int = "auto"
    bn_mode: str = "calibrated"
    candidates: BitSpace = dataclasses.field(default_factory=BitSpace)
    exits: tuple[int, ...] | None = None  # split points with an early-exit head; None = the family's default
    dropout: float | None = None  # None = the family's default
    # feature adapter at the (single) exit split: max-pool to ``size`` (when larger), then a quantized 1x1 conv ->
    # BatchNorm -> ReLU+Q to ``channels``, so models of different families emit one common feature shape
    adapter: dict | None = None  # {"channels": C, "size": [H, W]}
    # early-exit head's pooling, a key of EXIT_HEADS: "gap" (global average) or "grid" (max-pool to a small grid,
    # flattened: keeps where features are); runs written before the field existed have "gap"
    exit_head: str = "gap"

    def __post_init__(self):
        self.first_last = first_last_precision(self.first_last, self.scheme)
        if self.exit_head not in EXIT_HEADS:
            raise BadArgument(f"unknown exit head {self.exit_head!r}; choose from {', '.join(EXIT_HEADS)}",
                              param="exit_head")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["candidates"] = self.candidates.to_config()
        d["input_shape"] = list(self.input_shape)
        d["exits"] = None if self.exits is None else list(self.exits)
        d["adapter"] = None if self.adapter is None else {"channels": int(self.adapter["channels"]),
                                                          "size": [int(v) for v in self.adapter["size"]]}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["candidates"] = BitSpace.from_config(d["candidates"])
        d["input_shape"] = tuple(d["input_shape"])
        if d.get("exits") is not None:
            d["exits"] = tuple(d["exits"])
        return cls(**d)


class LayerFactory:
    """Makes quantized layers with the model's scheme, candidate set and precision policy.

    ``role`` is ``"inner"`` (adaptive bitwidth), ``"first"`` or ``"last"`` (the ``first_last`` policy).
    """

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        fl = cfg.first_last
        if fl not in ("fp", 8) and not (isinstance(fl, int) and 2 <= fl <= 16):
            raise BadArgument(f"bad first/last-layer precision {fl!r}: use 'fp' or 8", param="first_last")
        self._common = {"scheme": cfg.scheme, "candidates": cfg.candidates}

    def _precision(self, role):
        return ADAPTIVE if role == "inner" else self.cfg.first_last

    def conv(self, filters, kernel, strides=1, padding="same", bias=False, role="inner", name=None):
        return QConv2D(filters, kernel, strides=strides, padding=padding, use_bias=bias,
                       precision=self._precision(role), name=name, **self._common)

    def dwconv(self, kernel, strides=1, name=None):
        return QDepthwiseConv2D(kernel, strides=strides, padding="same", use_bias=False, name=name, **self._common)

    def dense(self, units, role="last", name=None):
        return QDense(units, precision=self._precision(role), name=name, **self._common)

    def relu(self, role="inner", name=None):
        return QReLU(precision=self._precision(role), name=name, **self._common)

    def linear(self, name=None):
        """8-bit grid of a signed tensor without activation (bottleneck outputs, residual sums)."""
        return QLinear(precision=ADAPTIVE, name=name, **self._common)

    def bn(self, name=None):
        return BitBatchNorm(candidates=self.cfg.candidates, mode=self.cfg.bn_mode, name=name)


class Stage:
    """One named piece of a model: ``fn(h, bits) -> h`` built from layers it owns."""

    def __init__(self, name: str, fn: Callable):
        self.name = name
        self.fn = fn

    def __call__(self, h, bits):
        with tf.name_scope(self.name):
            return self.fn(h, bits)


EXIT_GRID = 3  # the "grid" exit head max-pools its feature map to at most EXIT_GRID x EXIT_GRID


class ExitHead:
    """Early-exit classifier: quantized 3x3 conv -> BN -> ReLU+Q, pooling, dense (last-layer precision).  Its
    width is the width of the features it reads.

    ``kind`` (docs/method.md, "Early exits"): ``"gap"`` pools globally (average) -- a class's evidence must then
    be the same anywhere in the image; ``"grid"`` max-pools to at most :data:`EXIT_GRID` x :data:`EXIT_GRID`
    cells and flattens them, so the dense layer sees where the features are (a sleeve, a collar).  Max-pooling
    is exact on the integer grid, so the exported file rounds once less than with the average.
    """

    def __init__(self, L: LayerFactory, num_classes: int, split: int, channels: int, kind: str = "gap",
                 in_size=None):
        self.conv = L.conv(channels, 3, name=f"exit{split}_conv")
        self.bn = L.bn(name=f"exit{split}_bn")
        self.relu = L.relu(role="last", name=f"exit{split}_relu")
        if kind == "gap":
            self.pool = [tf.keras.layers.GlobalAveragePooling2D(name=f"exit{split}_pool")]
        else:
            grid = [min(EXIT_GRID, int(n)) for n in in_size]
            (ph, sh), (pw, sw) = (_pool_for(int(i), o) for i, o in zip(in_size, grid))
            pool = [] if (ph, pw) == (1, 1) else [MaxPool2D((ph, pw), (sh, sw), name=f"exit{split}_pool")]
            self.pool = pool + [tf.keras.layers.Flatten(name=f"exit{split}_flatten")]
        self.dense = L.dense(num_classes, role="last", name=f"exit{split}_logits")

    def __call__(self, h, bits):
        h = self.relu([self.bn([self.conv([h, bits]), bits]), bits])
        for layer in self.pool:
            h = layer(h)
        return self.dense([h, bits])


EXIT_HEADS = ("grid", "gap")


class Adapter:
    """Maps a stage's output to a common feature shape (docs/federated.md): max-pool down to ``size`` when the map is
    larger, then quantized 1x1 conv -> BitBatchNorm -> ReLU+Q to ``channels``."""

    def __init__(self, L: LayerFactory, channels: int, size, in_size):
        self.pool = None
        if tuple(in_size) != tuple(size):
            ph, pw = (_pool_for(i, o) for i, o in zip(in_size, size))
            self.pool = MaxPool2D((ph[0], pw[0]), (ph[1], pw[1]), name="adapter_pool")
        self.conv = L.conv(channels, 1, name="adapter_conv")
        self.bn = L.bn(name="adapter_bn")
        self.relu = L.relu(name="adapter_relu")

    def __call__(self, h, bits):
        if self.pool is not None:
            h = self.pool(h)
        return self.relu([self.bn([self.conv([h, bits]), bits]), bits])


def _pool_for(n_in: int, n_out: int) -> tuple[int, int]:
    """(pool size, stride) of a 'valid' max-pool that maps ``n_in`` to ``n_out``."""
    if n_out > n_in:
        raise TfbitmetaError(f"adapter: cannot enlarge a {n_in}-px feature map to {n_out} px; split later")
    for stride in range(max(1, n_in // n_out), 0, -1):
        k = n_in - (n_out - 1) * stride
        if 1 <= k <= 2 * stride + 1:
            return k, stride
    raise TfbitmetaError(f"adapter: no max-pool maps {n_in} px to {n_out} px")


class BitModel:
    """The full Keras model plus its parts, sharing weights."""

    def __init__(self, cfg: ModelConfig, stages: Sequence[Stage], default_exits: tuple[int, ...]):
        self.cfg = cfg
        self._projected = {}
        self.stages = list(stages)
        self.exits = tuple(default_exits if cfg.exits is None else cfg.exits)
        for s in self.exits:
            self._check_split(s)
        L = LayerFactory(cfg)
        if cfg.adapter is not None:
            if len(self.exits) != 1:
                raise TfbitmetaError("a feature adapter needs exactly one split (exits=(s,))")
            s = self.exits[0]
            raw = self.feature_shape(s)
            adapter = Adapter(L, int(cfg.adapter["channels"]), cfg.adapter["size"], raw[:2])
            inner = self.stages[s - 1]
            self.stages[s - 1] = Stage(inner.name, lambda h, b, inner=inner: adapter(inner.fn(h, b), b))
        self.exit_heads = {}
        for s in self.exits:
            shape = self.feature_shape(s)
            self.exit_heads[s] = ExitHead(L, cfg.num_classes, s, int(shape[-1]), cfg.exit_head, shape[:2])
        image, bits = self._inputs()
        h, outputs = image, {}
        self._feature_shapes = {}
        self.boundaries = {}  # split -> the stage's output tensor in the full model (export cuts here)
        for i, stage in enumerate(self.stages, start=1):
            h = stage(h, bits)
            self.boundaries[i] = h
            if i in self.exit_heads:
                self._feature_shapes[i] = tuple(h.shape[1:])
                outputs[f"exit{i}"] = self.exit_heads[i](h, bits)
        outputs["logits"] = h
        self.keras = tf.keras.Model([image, bits], outputs, name=cfg.family)

    # -- parts ---------------------------------------------------------------------------------
    def _check_split(self, split: int):
        if not 1 <= split <= len(self.stages) - 1:
            raise BadArgument(f"split {split} does not exist: {self.cfg.family} has splits 1..{len(self.stages) - 1}")

    def _check_exit(self, split: int):
        if split not in self.exit_heads:
            raise BadArgument(f"exit {split} does not exist; the model has exits at {list(self.exits) or 'none'}")

    def _inputs(self, shape=None, name="image"):
        shape = tuple(self.cfg.input_shape) if shape is None else shape
        return tf.keras.Input(shape, name=name), tf.keras.Input((2,), name="bits")

    def feature_shape(self, split: int) -> tuple:
        self._check_split(split)
        image, bits = self._inputs()
        h = image
        for stage in self.stages[:split]:
            h = stage(h, bits)
        return tuple(h.shape[1:])

    def extractor(self, split: int) -> tf.keras.Model:
        self._check_split(split)
        image, bits = self._inputs()
        h = image
        for stage in self.stages[:split]:
            h = stage(h, bits)
        return tf.keras.Model([image, bits], h, name=f"extractor{split}")

    def exit_head(self, split: int) -> tf.keras.Model:
        """The early-exit head at ``split`` alone: ``[features, bits]`` -> exit logits (the federated clients'
        personal head is this model)."""
        self._check_exit(split)
        feats, bits = self._inputs(self.feature_shape(split), name="features")
        return tf.keras.Model([feats, bits], self.exit_heads[split](feats, bits), name=f"exit{split}")

    def backend(self, split: int) -> tf.keras.Model:
        self._check_split(split)
        feats, bits = self._inputs(self.feature_shape(split), name="features")
        h = feats
        for stage in self.stages[split:]:
            h = stage(h, bits)
        return tf.keras.Model([feats, bits], h, name=f"backend{split}")

    def backend_with_projection(self, split: int, dim: int) -> tf.keras.Model:
        """The backend plus a projection head for contrastive losses: outputs ``{"logits", "projection"}``, the
        projection being a dense layer (last-layer precision) on the flattened output of the stage before the
        classifier stage.  Built once per (split, dim); the logits path is exactly :meth:`backend`'s."""
        key = (split, dim)
        if key not in self._projected:
            self._check_split(split)
            if not hasattr(self, "_projection_layers"):
                self._projection_layers = {}
            proj = self._projection_layers.setdefault(dim, LayerFactory(self.cfg).dense(dim, role="last",
                                                                                          name=f"projection{dim}"))
            feats, bits = self._inputs(self.feature_shape(split), name="features")
            h = feats
            for stage in self.stages[split:-1]:
                h = stage(h, bits)
            z = proj([tf.keras.layers.Flatten(name=f"projection{dim}_flatten")(h), bits])
            logits = self.stages[-1](h, bits)
            self._projected[key] = tf.keras.Model([feats, bits], {"logits": logits, "projection": z},
                                                  name=f"backend{split}_projected")
        return self._projected[key]

    def front_end(self, split: int) -> tf.keras.Model:
        """Extractor + early-exit head: the device part, outputs ``{"exit": logits, "features": h}``."""
        self._check_exit(split)
        image, bits = self._inputs()
        h = image
        for stage in self.stages[:split]:
            h = stage(h, bits)
        return tf.keras.Model([image, bits], {"exit": self.exit_heads[split](h, bits), "features": h},
                              name=f"front_end{split}")

    def count_params(self) -> int:
        return int(sum(math.prod(w.shape) for w in self.keras.trainable_weights))
