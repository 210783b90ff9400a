"""Quantization with the bitwidth as a runtime tensor: bit spaces, quantizers, layers, BN calibration."""
from tfbitmeta.quant.bitwidth import FP, BitSpace, bits_tensor, config_name, parse_config  # noqa: F401
from tfbitmeta.quant.layers import (  # noqa: F401
    CUSTOM_OBJECTS, BitBatchNorm, QConv2D, QDense, QDepthwiseConv2D, QReLU,
)
