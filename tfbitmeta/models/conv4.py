"""Conv-4, the few-shot backbone (MAML's "CNN5" / ProtoNet's "CNN4", docs/method.md, "Models"), with bitwidth input.

Four blocks of conv3x3 (same) -> BatchNorm -> max-pool 2 -> ReLU(+activation quantization); ``16 * width``
channels (width 4 = the reference's 64).  The first conv follows the ``first_last`` policy; the ReLUs after
blocks 1-3 quantize the *inputs* of convs 2-4 at the task's activation bitwidth (as the reference quantizes
conv inputs); the last ReLU (the embedding, or the classifier's input) follows ``first_last``.

* ``num_classes > 0`` (MAML): flattened features -> dense classifier (``first_last`` precision).
* ``num_classes == 0`` (ProtoNet): the output is the flattened embedding, 16*width features for 28x28 inputs.
The output key is ``"logits"`` either way (the :class:`BitModel` convention); for ProtoNet it holds the embedding.
"""
from __future__ import annotations

import tensorflow as tf

from tfbitmeta.models.base import BitModel, LayerFactory, ModelConfig, Stage
from tfbitmeta.models.pooling import MaxPool2D


def build(cfg: ModelConfig) -> BitModel:
    L = LayerFactory(cfg)
    channels = max(1, int(round(16 * cfg.width)))

    def block(i):
        role_in = "first" if i == 1 else "inner"
        role_out = "last" if i == 4 else "inner"
        conv = L.conv(channels, 3, padding="same", bias=False, role=role_in, name=f"b{i}_conv")
        bn = L.bn(name=f"b{i}_bn")
        pool = MaxPool2D(2, name=f"b{i}_pool")
        relu = L.relu(role=role_out, name=f"b{i}_relu")
        return Stage(f"b{i}", lambda h, b: relu([pool(bn([conv([h, b]), b])), b]))

    stages = [block(i) for i in range(1, 5)]
    flat = tf.keras.layers.Flatten(name="embedding")
    if cfg.num_classes > 0:
        fc = L.dense(cfg.num_classes, role="last", name="logits")
        stages.append(Stage("head", lambda h, b: fc([flat(h), b])))
    else:
        stages.append(Stage("head", lambda h, b: flat(h)))
    return BitModel(cfg, stages, default_exits=())
