"""Bitwidth configurations: the meta-learning tasks of MEBQAT.

A configuration is a pair ``(w, a)`` of weight and activation bits applied to every intermediate layer.
Full precision is encoded as :data:`FP` (32).  Inside a model the pair travels as a float tensor of shape
``(batch, 2)`` (the ``bits`` model input), so changing the bitwidth never retraces a ``tf.function``.
"""
from __future__ import annotations

import dataclasses
from typing import Collection, Iterable

import numpy as np

from tfbitmeta.errors import BadArgument

FP = 32
"""Full precision (float32) as a bitwidth value."""

MAX_BITS = FP
"""Bit values are integers in ``1..MAX_BITS``; lookup tables in the layers have ``MAX_BITS + 1`` entries."""

DEFAULT_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16, FP)
"""The reference's candidate set for the Yu21/DoReFa scheme (1-bit included)."""

Config = tuple[int, int]


def bit_name(b: int) -> str:
    return "fp" if b == FP else str(b)


def config_name(cfg: Config) -> str:
    w, a = cfg
    return bit_name(w) if w == a else f"w{bit_name(w)}a{bit_name(a)}"


def parse_bit(token: str, param: str | None = "bits") -> int:
    """One bitwidth: ``'1'``..``'16'``, or ``'fp'`` (also ``fp32``, ``32``, ``float``, ``none``) for :data:`FP`."""
    t = token.strip().lower()
    if t in ("fp", "fp32", "32", "float", "none"):
        return FP
    try:
        b = int(t)
    except ValueError:
        raise BadArgument(f"bad bitwidth {token!r}: use an integer 1-16 or 'fp'", param=param) from None
    if not 1 <= b <= 16:
        raise BadArgument(f"bad bitwidth {token!r}: use an integer 1-16 or 'fp'", param=param)
    return b


def parse_bits(spec: str, *, all_bits: Iterable[int] = DEFAULT_BITS, allowed: Collection[int] | None = None,
               keep_order: bool = False, param: str | None = "bits") -> tuple[int, ...]:
    """A list of per-tensor bitwidths such as ``'2,4,8,fp'``; ``'all'`` is ``all_bits``.

    The one parser of bitwidth lists (training candidates, few-shot training bits, federated client bits).

    Args:
        spec: comma-separated bitwidths (see :func:`parse_bit`) or ``'all'``.
        all_bits: what ``'all'`` means.
        allowed: if given, every value must be in it.
        keep_order: keep the given order (duplicates dropped) instead of sorting, e.g. for round-robin assignment.
        param: the argument name reported in errors.

    Returns:
        the distinct bitwidths, sorted unless ``keep_order``.
    """
    tokens = [t for t in str(spec).split(",") if t.strip()]
    if len(tokens) == 1 and tokens[0].strip().lower() == "all":
        bits = tuple(all_bits)
    else:
        bits = tuple(parse_bit(t, param) for t in tokens)
    if not bits:
        raise BadArgument(f"no bitwidth in {spec!r}: give e.g. '2,4,8,fp' or 'all'", param=param)
    if allowed is not None:
        bad = [b for b in bits if b not in allowed]
        if bad:
            raise BadArgument(f"bitwidth {', '.join(bit_name(b) for b in bad)} not allowed here: use "
                              f"{', '.join(bit_name(b) for b in sorted(allowed))}", param=param)
    return tuple(dict.fromkeys(bits)) if keep_order else tuple(sorted(set(bits)))


def parse_config(token: str) -> Config:
    """``'4'`` -> (4, 4); ``'4/8'`` or ``'w4a8'`` -> (4, 8); ``'fp'`` -> (FP, FP)."""
    t = token.strip().lower()
    if t.startswith("w") and "a" in t:
        w, a = t[1:].split("a", 1)
        return parse_bit(w), parse_bit(a)
    if "/" in t:
        w, a = t.split("/", 1)
        return parse_bit(w), parse_bit(a)
    b = parse_bit(t)
    return b, b


def is_valid_pair(w: int, a: int) -> bool:
    """The reference's rejection rules for (w, a) pairs (docs/method.md, "Tasks")."""
    if w == FP and a != FP:
        return False
    if w == 1 and a not in (1, FP):
        return False
    if w != 1 and a == 1:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class BitSpace:
    """The candidate bitwidths a model supports.

    ``bits`` are the per-tensor candidates (weights and activations share them).  With ``w_eq_a`` only the
    diagonal pairs ``(b, b)`` are configurations; otherwise every pair allowed by :func:`is_valid_pair`
    (75 for the default candidates, as in the reference).
    """

    bits: tuple[int, ...] = DEFAULT_BITS
    w_eq_a: bool = False

    def __post_init__(self):
        bits = tuple(sorted(set(int(b) for b in self.bits)))
        for b in bits:
            if not (1 <= b <= 16 or b == FP):
                raise BadArgument(f"bad candidate bitwidth {b}: use 1-16 or fp")
        if not bits:
            raise BadArgument("the candidate bitwidth set is empty")
        object.__setattr__(self, "bits", bits)

    @property
    def configs(self) -> list[Config]:
        if self.w_eq_a:
            return [(b, b) for b in self.bits]
        return [(w, a) for w in self.bits for a in self.bits if is_valid_pair(w, a)]

    @property
    def diagonal(self) -> list[Config]:
        """The uniform ``w = a`` configurations, the usual evaluation table."""
        return [(b, b) for b in self.bits]

    def slot(self, cfg: Config) -> int:
        return self.configs.index(tuple(cfg))

    def slot_table(self) -> np.ndarray:
        """``table[w, a]`` = slot index of configuration (w, a), or -1; shape (MAX_BITS+1, MAX_BITS+1)."""
        table = np.full((MAX_BITS + 1, MAX_BITS + 1), -1, dtype=np.int32)
        for i, (w, a) in enumerate(self.configs):
            table[w, a] = i
        return table

    def check(self, cfg: Config) -> Config:
        cfg = (int(cfg[0]), int(cfg[1]))
        if cfg not in self.configs:
            raise BadArgument(
                f"bitwidth {config_name(cfg)} is not in the model's candidate set "
                f"({', '.join(config_name(c) for c in self.diagonal)}"
                f"{'' if self.w_eq_a else ' and their valid (w,a) pairs'})"
            )
        return cfg

    def parse(self, spec: str | Iterable[str]) -> list[Config]:
        """Parse a CLI list such as ``'all'``, ``'2,4,8,fp'`` or ``'4/8,fp'`` and check each against the set."""
        tokens = spec.split(",") if isinstance(spec, str) else list(spec)
        if len(tokens) == 1 and tokens[0].strip().lower() == "all":
            return self.diagonal
        if len(tokens) == 1 and tokens[0].strip().lower() == "pairs":
            return self.configs
        return [self.check(parse_config(t)) for t in tokens if t.strip()]

    def to_config(self) -> dict:
        return {"bits": list(self.bits), "w_eq_a": self.w_eq_a}

    @classmethod
    def from_config(cls, cfg: dict) -> "BitSpace":
        return cls(bits=tuple(cfg["bits"]), w_eq_a=bool(cfg.get("w_eq_a", False)))


def bits_tensor(cfg: Config, batch: int):
    """The ``bits`` model input for one configuration: float32 of shape ``(batch, 2)``."""
    import tensorflow as tf

    return tf.tile(tf.constant([[cfg[0], cfg[1]]], tf.float32), [batch, 1])
