"""Pre-activation ResNet-20 (docs/method.md, "Models") at configurable base width (reference: 80 = 16 x expand 5)."""
from __future__ import annotations

import tensorflow as tf

from tfbitmeta.models.base import BitModel, LayerFactory, ModelConfig, Stage


def _block(L: LayerFactory, name, in_c, out_c, stride):
    bn1, r1 = L.bn(name=f"{name}_bn1"), L.relu(name=f"{name}_relu1")
    conv1 = L.conv(out_c, 3, strides=stride, name=f"{name}_conv1")
    bn2, r2 = L.bn(name=f"{name}_bn2"), L.relu(name=f"{name}_relu2")
    conv2 = L.conv(out_c, 3, name=f"{name}_conv2")
    shortcut = None
    if stride != 1 or in_c != out_c:
        sc_conv, sc_bn = L.conv(out_c, 1, strides=stride, name=f"{name}_sc_conv"), L.bn(name=f"{name}_sc_bn")
        shortcut = lambda a, b: sc_bn([sc_conv([a, b]), b])  # noqa: E731

    def fn(h, b):
        a = r1([bn1([h, b]), b])
        out = conv2([r2([bn2([conv1([a, b]), b]), b]), b])
        skip = h if shortcut is None else shortcut(a, b)
        return tf.keras.layers.Add(name=f"{name}_add")([out, skip])
    return Stage(name, fn)


def build(cfg: ModelConfig) -> BitModel:
    w = max(4, int(round(cfg.width)))
    L = LayerFactory(cfg)
    stem = L.conv(w, 3, role="first", name="stem_conv")
    stages = [Stage("stem", lambda h, b: stem([h, b]))]
    in_c = w
    for g, (c, stride) in enumerate([(w, 1), (2 * w, 2), (4 * w, 2)]):
        for i in range(3):
            stages.append(_block(L, f"g{g + 1}b{i + 1}", in_c, c, stride if i == 0 else 1))
            in_c = c
    bn, relu = L.bn(name="head_bn"), L.relu(role="last", name="head_relu")
    gap = tf.keras.layers.GlobalAveragePooling2D(name="head_pool")
    fc = L.dense(cfg.num_classes, role="last", name="logits")
    stages.append(Stage("head", lambda h, b: fc([gap(relu([bn([h, b]), b])), b])))
    return BitModel(cfg, stages, default_exits=(4,))
