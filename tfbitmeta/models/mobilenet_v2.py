"""MobileNetV2 for small images (stride 1 in the stem and the first 24-channel stage, as the reference's CIFAR
variant) with a width multiplier.  ReLU replaces ReLU6 (the activation quantizer clips to [0, 1] anyway).  The
linear bottleneck outputs and the residual sums are on fixed 8-bit grids (:class:`~tfbitmeta.quant.layers.QLinear`),
as the integer model stores them."""
from __future__ import annotations

import tensorflow as tf

from tfbitmeta.models.base import BitModel, LayerFactory, ModelConfig, Stage
from tfbitmeta.models.dropout import CheckpointedDropout

# (expansion t, channels c, repeats n, stride s)
BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _divisible(v, d=8):
    return max(d, int(v + d / 2) // d * d)


def _inverted_residual(L: LayerFactory, name, in_c, out_c, stride, t):
    hidden = in_c * t
    expand = None
    if t != 1:
        e_conv, e_bn, e_relu = L.conv(hidden, 1, name=f"{name}_expand"), L.bn(name=f"{name}_expand_bn"), \
            L.relu(name=f"{name}_expand_relu")
        expand = lambda h, b: e_relu([e_bn([e_conv([h, b]), b]), b])  # noqa: E731
    dw, dw_bn, dw_relu = L.dwconv(3, strides=stride, name=f"{name}_dw"), L.bn(name=f"{name}_dw_bn"), \
        L.relu(name=f"{name}_dw_relu")
    proj, proj_bn = L.conv(out_c, 1, name=f"{name}_project"), L.bn(name=f"{name}_project_bn")
    proj_q = L.linear(name=f"{name}_project_q")
    residual = stride == 1 and in_c == out_c
    add_q = L.linear(name=f"{name}_add_q") if residual else None

    def fn(h, b):
        x = h if expand is None else expand(h, b)
        x = dw_relu([dw_bn([dw([x, b]), b]), b])
        x = proj_q([proj_bn([proj([x, b]), b]), b])
        return add_q([tf.keras.layers.Add(name=f"{name}_add")([h, x]), b]) if residual else x
    return Stage(name, fn)


def build(cfg: ModelConfig) -> BitModel:
    alpha = float(cfg.width)
    L = LayerFactory(cfg)
    c0 = _divisible(32 * alpha)
    stem, stem_bn, stem_relu = L.conv(c0, 3, role="first", name="stem_conv"), L.bn(name="stem_bn"), \
        L.relu(name="stem_relu")
    stages = [Stage("stem", lambda h, b: stem_relu([stem_bn([stem([h, b]), b]), b]))]
    in_c, k = c0, 0
    for t, c, n, s in BLOCKS:
        out_c = _divisible(c * alpha)
        for i in range(n):
            k += 1
            stages.append(_inverted_residual(L, f"ir{k}", in_c, out_c, s if i == 0 else 1, t))
            in_c = out_c
    last_c = _divisible(1280 * max(1.0, alpha))
    h_conv, h_bn, h_relu = L.conv(last_c, 1, name="head_conv"), L.bn(name="head_bn"), L.relu(role="last", name="head_relu")
    gap = tf.keras.layers.GlobalAveragePooling2D(name="head_pool")
    drop = CheckpointedDropout(0.2 if cfg.dropout is None else cfg.dropout, seed=2, name="head_dropout")
    fc = L.dense(cfg.num_classes, role="last", name="logits")
    stages.append(Stage("head", lambda h, b: fc([drop(gap(h_relu([h_bn([h_conv([h, b]), b]), b]))), b])))
    return BitModel(cfg, stages, default_exits=(4,))
