"""Model families built as named parts (extractor, early-exit head, backend)."""
from __future__ import annotations

from tfbitmeta.errors import BadArgument
from tfbitmeta.models import conv4, mobilenet_v2, preact_resnet, svhn_cnn
from tfbitmeta.models.base import BitModel, ModelConfig  # noqa: F401
from tfbitmeta.models.dropout import CheckpointedDropout
from tfbitmeta.models.pooling import MaxPool2D
from tfbitmeta.quant.layers import CUSTOM_OBJECTS as _QUANT_OBJECTS

FAMILIES = {
    "svhn_cnn": svhn_cnn.build,
    "preact_resnet20": preact_resnet.build,
    "mobilenet_v2": mobilenet_v2.build,
    "conv4": conv4.build,
}


def build(cfg: ModelConfig) -> BitModel:
    try:
        builder = FAMILIES[cfg.family]
    except KeyError:
        raise BadArgument(f"unknown model {cfg.family!r}; choose from {', '.join(FAMILIES)}", param="family") from None
    return builder(cfg)


def min_input_size(family: str) -> int:
    """The smallest input side a family accepts (others work on any size)."""
    return svhn_cnn.MIN_SIZE if family == "svhn_cnn" else 1

CUSTOM_OBJECTS = {**_QUANT_OBJECTS, "CheckpointedDropout": CheckpointedDropout, "MaxPool2D": MaxPool2D}
"""Compatibility alias: every tfbitmeta layer is registered with Keras (package ``tfbitmeta``), so
``tf.keras.models.load_model`` needs no ``custom_objects``; passing this dict still works."""
