"""Quantization with the bitwidth as a runtime tensor: bit spaces, quantizers, layers, BN calibration.

:mod:`tfbitmeta.quant.bitwidth` imports no TensorFlow (the CLI parses bitwidths and builds its option lists
before any TensorFlow import); the layer names below are imported from :mod:`tfbitmeta.quant.layers` on first use.
"""
from tfbitmeta.quant.bitwidth import FP, BitSpace, bits_tensor, config_name, parse_config  # noqa: F401

_LAYERS = ("CUSTOM_OBJECTS", "BitBatchNorm", "QConv2D", "QDense", "QDepthwiseConv2D", "QReLU", "QLinear")

__all__ = ["FP", "BitSpace", "bits_tensor", "config_name", "parse_config", *_LAYERS]


def __getattr__(name):
    if name in _LAYERS:
        from tfbitmeta.quant import layers

        return getattr(layers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
