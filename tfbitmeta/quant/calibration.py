"""Per-bitwidth BatchNorm statistics and the fixed 8-bit grids of linear tensors, estimated after training (what
the deployed integer model uses), and models that run with explicitly chosen BatchNorm statistics."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from tfbitmeta.errors import BadArgument
from tfbitmeta.quant.bitwidth import Config, bits_tensor
from tfbitmeta.quant.layers import LINEAR_CODES, BatchNormStatistics, BitBatchNorm, QLinear


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
    """Set each configuration's BN slot to the mean of its batch statistics over ``images`` (a list of batches),
    then the grids of the model's :class:`~tfbitmeta.quant.layers.QLinear` layers (:func:`calibrate_ranges`).

    Every other layer runs in inference mode (no dropout), so the statistics are those inference will see.
    """
    layers = batchnorm_layers(model)
    if not images:
        return
    if not layers:
        calibrate_ranges(model, images, configs)
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
    calibrate_ranges(model, images, configs)


def _node_input(layer, model):
    """The Keras tensor ``layer`` consumes in ``model``'s own graph (layers are shared by several graphs)."""
    for i, node in enumerate(layer.inbound_nodes):
        if f"{layer.name}_ib-{i}" in model._network_nodes:
            return node.keras_inputs[0]
    raise BadArgument(f"{model.name}: layer {layer.name} is not called in the model")


def calibrate_ranges(model: tf.keras.Model, images: Sequence[tf.Tensor], configs: Sequence[Config]) -> None:
    """Each configuration's scale of every QLinear layer of ``model``: the smallest power of two ``s`` with
    ``max |x| <= 127 s`` over ``images`` (the layer's input measured in one pass with every QLinear of that
    configuration off; upstream rounding can then move a peak by half a step, which the grid saturates)."""
    qlayers = [m for m in model.layers if isinstance(m, QLinear)]
    if not qlayers or not images:
        return
    probe = tf.keras.Model(model.inputs, [_node_input(layer, model) for layer in qlayers])
    peaks = tf.function(lambda x, b: [tf.reduce_max(tf.abs(t)) for t in probe([x, b], training=False)])
    for cfg in configs:
        slots = [layer.candidates.slot(cfg) for layer in qlayers]
        for layer, slot in zip(qlayers, slots):
            layer.scale.scatter_nd_update([[slot]], [0.0])
        peak = np.zeros(len(qlayers))
        for x in images:
            peak = np.maximum(peak, [float(v) for v in peaks(x, bits_tensor(cfg, int(x.shape[0])))])
        for layer, slot, p in zip(qlayers, slots, peak):
            scale = 2.0 ** np.ceil(np.log2(max(float(p), 1e-30) / LINEAR_CODES[1]))
            layer.scale.scatter_nd_update([[slot]], [np.float32(scale)])
