"""Per-bitwidth BatchNorm statistics, estimated after training (the deployable BN)."""
from __future__ import annotations

import contextlib
from typing import Sequence

import tensorflow as tf
from tqdm.auto import tqdm

from tfbitmeta.quant.bitwidth import Config, bits_tensor
from tfbitmeta.quant.layers import BitBatchNorm


def batchnorm_layers(model: tf.keras.Model) -> list[BitBatchNorm]:
    return [m for m in model.submodules if isinstance(m, BitBatchNorm)]


@contextlib.contextmanager
def bn_mode(model: tf.keras.Model, mode: str):
    """Temporarily switch every BitBatchNorm to ``mode`` ("batch" or "calibrated")."""
    layers = batchnorm_layers(model)
    old = [layer.mode for layer in layers]
    for layer in layers:
        layer.mode = mode
    try:
        yield
    finally:
        for layer, m in zip(layers, old):
            layer.mode = m


def calibrate_batchnorm(model: tf.keras.Model, images: Sequence[tf.Tensor], configs: Sequence[Config],
                        progress: bool = False) -> None:
    """Set each configuration's BN slot to the mean of its batch statistics over ``images`` (a list of batches).

    Every other layer runs in inference mode (no dropout), so the statistics are those inference will see.
    """
    layers = batchnorm_layers(model)
    if not layers or not images:
        return
    weight = 1.0 / len(images)
    shape = [None, *images[0].shape[1:]]

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32), tf.TensorSpec([None, 2], tf.float32)])
    def accumulate(x, bits):
        model([x, bits], training=False)
        return tf.constant(0)

    for layer in layers:
        layer.calibration_weight = weight
    try:
        for cfg in tqdm(configs, desc="calibrating BN", disable=not progress, leave=False):
            for layer in layers:
                slot = layer.candidates.slot(cfg)
                zeros = tf.zeros_like(layer.moving_mean[slot])
                layer.moving_mean.scatter_nd_update([[slot]], [zeros])
                layer.moving_variance.scatter_nd_update([[slot]], [zeros])
            for x in images:
                accumulate(x, bits_tensor(cfg, int(x.shape[0])))
    finally:
        for layer in layers:
            layer.calibration_weight = None
