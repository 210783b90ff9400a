"""The client architectures of a federated run: names -> core model families (no model code here).

An architecture is a ``tfbitmeta.models`` family at a width, cut at a split point whose features an adapter (a
quantized 1x1 conv, :class:`tfbitmeta.models.base.Adapter`) maps to the one feature shape the server's backend
reads.  Members of one family are HeteroFL width slices of its widest member in the run; different families share
only that feature space (docs/federated.md).
"""
from __future__ import annotations

from dataclasses import dataclass

from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.models import ModelConfig
from tfbitmeta.quant.bitwidth import BitSpace


@dataclass(frozen=True)
class Arch:
    name: str
    family: str
    width: float
    split: int  # stage boundary the front end ends at (its early exit + features)


ARCHITECTURES = {a.name: a for a in (
    Arch("svhn_cnn-w4", "svhn_cnn", 4, 3),
    Arch("svhn_cnn-w2", "svhn_cnn", 2, 3),
    Arch("svhn_cnn-w1", "svhn_cnn", 1, 3),
    Arch("mobilenet_v2-w05", "mobilenet_v2", 0.5, 7),
    Arch("mobilenet_v2-w025", "mobilenet_v2", 0.25, 7),
    Arch("preact_resnet20-w8", "preact_resnet20", 8, 7),
    Arch("preact_resnet20-w4", "preact_resnet20", 4, 7),
)}
DEFAULT_ARCHITECTURES = "svhn_cnn-w4,svhn_cnn-w2,mobilenet_v2-w05"

FEATURE_CHANNELS = 32
SERVER = Arch("server", "svhn_cnn", 4, 3)  # the server backend: svhn_cnn's stages after split 3


def parse_architectures(spec: str) -> list[Arch]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [n for n in names if n not in ARCHITECTURES]
    if bad or not names:
        raise TfbitmetaError(f"unknown architecture {', '.join(map(repr, bad)) or repr(spec)}: use {', '.join(ARCHITECTURES)}")
    return [ARCHITECTURES[n] for n in dict.fromkeys(names)]


def feature_size(input_shape) -> tuple[int, int]:
    """The common feature map: the server family's own map at its split (svhn_cnn after stage 3: 6x6 at 28 px)."""
    h, w = input_shape[:2]
    return ((h - 4) // 2) // 2, ((w - 4) // 2) // 2


def model_config(arch: Arch, input_shape, num_classes: int, candidates: BitSpace,
                 channels: int = FEATURE_CHANNELS) -> ModelConfig:
    """The core model of ``arch``: exact scheme (full-integer export), 8-bit first/last layers, per-bitwidth
    BatchNorm, one exit at the split, the adapter to the common features, no dropout."""
    return ModelConfig(family=arch.family, input_shape=tuple(input_shape), num_classes=num_classes, width=arch.width,
                       scheme="exact", first_last=8, bn_mode="calibrated", candidates=candidates, exits=(arch.split,),
                       dropout=0.0, adapter={"channels": int(channels), "size": list(feature_size(input_shape))})
