"""Per-bitwidth BatchNorm statistics, estimated after training (the deployable BN), and models that run with
explicitly chosen BatchNorm statistics."""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf
from tqdm.auto import tqdm

from tfbitmeta.errors import BadArgument
from tfbitmeta.quant.bitwidth import Config, bits_tensor
from tfbitmeta.quant.layers import BatchNormStatistics, BitBatchNorm


def batchnorm_layers(model: tf.keras.Model) -> list[BitBatchNorm]:
    return [m for m in model.submodules if isinstance(m, BitBatchNorm)]


def with_bn_statistics(model: tf.keras.Model, statistics: str, weight: float = 0.0) -> tf.keras.Model:
    """A twin of the functional ``model`` (same layers and variables) whose every BitBatchNorm normalizes with
    ``statistics`` at inference: ``"batch"``, ``"calibrated"`` or ``"accumulate"`` (batch statistics, added
    ``weight`` x each batch's into the configuration's slot).

    The model itself is unchanged, so a function traced on either model keeps that model's statistics.  Returns
    ``model`` when its BatchNorms already use ``statistics``.

    Args:
        model: a functional Keras model whose BitBatchNorms are top-level layers (as every tfbitmeta model).
        statistics: one of :data:`tfbitmeta.quant.layers.STATISTICS`.
        weight: the accumulation factor for ``"accumulate"``.
    """
    layers = batchnorm_layers(model)
    if statistics != "accumulate" and all(layer.mode == statistics for layer in layers):
        return model
    nested = [layer for layer in layers if layer not in model.layers]
    if nested:
        raise BadArgument(f"{model.name}: BatchNorm {nested[0].name} is inside a nested model; "
                          f"with_bn_statistics needs top-level BatchNorms")

    def twin_layer(layer):
        return BatchNormStatistics(layer, statistics, weight) if isinstance(layer, BitBatchNorm) else layer

    return tf.keras.models.clone_model(model, clone_function=twin_layer)


def calibrate_batchnorm(model: tf.keras.Model, images: Sequence[tf.Tensor], configs: Sequence[Config],
                        progress: bool = False) -> None:
    """Set each configuration's BN slot to the mean of its batch statistics over ``images`` (a list of batches).

    Every other layer runs in inference mode (no dropout), so the statistics are those inference will see.
    """
    layers = batchnorm_layers(model)
    if not layers or not images:
        return
    accumulating = with_bn_statistics(model, "accumulate", 1.0 / len(images))
    shape = [None, *images[0].shape[1:]]

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32), tf.TensorSpec([None, 2], tf.float32)])
    def accumulate(x, bits):
        accumulating([x, bits], training=False)
        return tf.constant(0)

    for cfg in tqdm(configs, desc="calibrating BN", disable=not progress, leave=False):
        for layer in layers:
            slot = layer.candidates.slot(cfg)
            zeros = tf.zeros_like(layer.moving_mean[slot])
            layer.moving_mean.scatter_nd_update([[slot]], [zeros])
            layer.moving_variance.scatter_nd_update([[slot]], [zeros])
        for x in images:
            accumulate(x, bits_tensor(cfg, int(x.shape[0])))
