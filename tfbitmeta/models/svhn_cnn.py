"""The Any-Precision / MEBQAT SVHN CNN ("CNN8", docs/method.md, "Models") at width multiplier ``ep``.

The last conv's kernel equals the remaining feature-map size (5 for the reference's 40x40 input), so the
family works for inputs of 24 px and more.
"""
from __future__ import annotations

import tensorflow as tf

from tfbitmeta.errors import BadArgument
from tfbitmeta.models.base import BitModel, LayerFactory, ModelConfig, Stage
from tfbitmeta.models.dropout import CheckpointedDropout
from tfbitmeta.models.pooling import MaxPool2D

MIN_SIZE = 24


def build(cfg: ModelConfig) -> BitModel:
    ep = max(1, int(round(cfg.width)))
    size = min(cfg.input_shape[:2])
    if size < MIN_SIZE:
        raise BadArgument(f"svhn_cnn needs inputs of at least {MIN_SIZE}x{MIN_SIZE} px (got {size}); "
                          f"resize the images to {MIN_SIZE} or use another model", param="image_size")
    L = LayerFactory(cfg)
    pool = MaxPool2D
    final_k = (((size - 4) // 2) // 2) - 4  # spatial size before the last conv

    def conv_bn_relu(name, filters, padding, pool_after=False):
        conv = L.conv(filters, 3, padding=padding, name=f"{name}_conv")
        bn, relu = L.bn(name=f"{name}_bn"), L.relu(name=f"{name}_relu")
        mp = pool(2, name=f"{name}_pool") if pool_after else None

        def fn(h, b):
            h = bn([conv([h, b]), b])
            if mp is not None:
                h = mp(h)
            return relu([h, b])
        return Stage(name, fn)

    c1 = L.conv(6 * ep, 5, padding="valid", bias=True, role="first", name="s1_conv")
    p1, r1 = pool(2, name="s1_pool"), L.relu(name="s1_relu")
    stages = [Stage("s1", lambda h, b: r1([p1(c1([h, b])), b]))]
    stages += [
        conv_bn_relu("s2", 8 * ep, "same"),
        conv_bn_relu("s3", 8 * ep, "same", pool_after=True),
        conv_bn_relu("s4", 16 * ep, "valid"),
        conv_bn_relu("s5", 16 * ep, "same"),
        conv_bn_relu("s6", 16 * ep, "valid"),
    ]
    drop = CheckpointedDropout(0.5 if cfg.dropout is None else cfg.dropout, seed=1, name="head_dropout")
    c7 = L.conv(64 * ep, final_k, padding="valid", name="head_conv")
    r7 = L.relu(role="last", name="head_relu")
    flat = tf.keras.layers.Flatten(name="head_flatten")
    fc = L.dense(cfg.num_classes, role="last", name="logits")
    stages.append(Stage("head", lambda h, b: fc([flat(r7([c7([drop(h), b]), b])), b])))
    return BitModel(cfg, stages, default_exits=(3,))
