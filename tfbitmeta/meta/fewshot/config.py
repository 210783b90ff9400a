"""What a few-shot run is: method, episodes, bitwidth candidates and the default recipe (docs/fewshot.md).

Methods (``tfbitmeta train --method ...``):

* ``mebqat-maml``  -- FOMAML; every episode of the meta-batch draws its own (w, a) from the candidates.
* ``mebqat-proto`` -- ProtoNet; one episode per step shared by T configurations, losses averaged.
* ``fomaml``       -- FOMAML at one fixed bitwidth: ``--bits 4`` is the QAT+FOMAML baseline, ``--bits fp`` vanilla MAML.
* ``protonet``     -- ProtoNet at one fixed bitwidth: QAT+ProtoNet, or vanilla ProtoNet with ``--bits fp``.

Every model is built with the full few-shot candidate space (w in {2..8,16}, a in {2..8,16,fp}, plus (fp,fp):
73 configurations) so any of them can be evaluated at every bitwidth; the method decides what is trained.

The default recipe (:data:`RECIPE`): Conv-4 with the reference's 64 channels; ProtoNet trains on 60-way 1-shot
episodes with 5 queries per class (the reference's Omniglot setting), MAML on 20-way 1-shot with 15 queries;
handwriting augmentation (:mod:`tfbitmeta.data.augment`) of the training episodes; Adam with a cosine-decayed
learning rate; validation on 20-way 1-shot episodes of the validation alphabets every 100 steps, and the best
validation checkpoint is the model.
"""
from __future__ import annotations

import dataclasses

from tfbitmeta.data.episodes import Setting
from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.meta.fewshot.maml import FOMAML
from tfbitmeta.meta.fewshot.protonet import ProtoNet
from tfbitmeta.quant.bitwidth import FP, BitSpace, parse_bits

FEWSHOT_BITS = (2, 3, 4, 5, 6, 7, 8, 16, FP)
"""Per-tensor candidates of the few-shot experiments (no 1-bit): 73 valid (w, a) configurations."""

METHODS = {"mebqat-maml": "maml", "mebqat-proto": "protonet", "fomaml": "maml", "protonet": "protonet"}
ADAPTIVE_METHODS = ("mebqat-maml", "mebqat-proto")
SEED_OFFSETS = {"train": 0, "val": 10_000, "test": 20_000}  # episode streams per split are independent
STANDARD_SETTINGS = "20w1s,5w1s"  # what a run is scored on after training (Omniglot one-shot protocol)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Defaults a user gets without flags, per algorithm family (measured: docs/fewshot.md)."""
    width: float  # Conv-4 channels / 16
    ways: int
    queries: int
    steps: int
    lr: float


RECIPE = {
    "protonet": Recipe(width=4.0, ways=60, queries=5, steps=600, lr=1e-3),
    "maml": Recipe(width=4.0, ways=20, queries=15, steps=150, lr=1e-3),
}


@dataclasses.dataclass
class FewShotConfig:
    method: str = "mebqat-proto"
    data_dir: str = "../shared/data/omniglot"
    ways: int = 5
    shots: int = 1
    queries: int = 15  # per class, training episodes (the reference's ProtoNet uses 5 on Omniglot, MAML 15)
    meta_batch: int = 4  # episodes per MAML step
    num_tasks: int = 4  # bitwidth configurations per ProtoNet step (mebqat-proto)
    inner_steps: int = 5
    inner_lr: float = 0.1
    eval_inner_steps: int = 5
    train_bits: tuple[int, ...] = FEWSHOT_BITS  # candidates of mebqat-*, or the one bitwidth of a baseline
    val_episodes: int = 20
    eval_episodes: int = 100
    steps_per_epoch: int = 100
    augment: bool = True  # handwriting affine jitter of the training episodes
    val_ways: int = 20  # validation episodes: val_ways-way (capped by the classes), shots as trained
    lr_decay: str = "cosine"  # "cosine" over the run's steps, or "none"

    @property
    def kind(self) -> str:
        return METHODS[self.method]

    @property
    def adaptive(self) -> bool:
        return self.method in ADAPTIVE_METHODS

    @property
    def setting(self) -> Setting:
        return Setting(self.ways, self.shots, self.queries)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train_bits"] = list(self.train_bits)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FewShotConfig":
        d = dict(d)
        d["train_bits"] = tuple(d["train_bits"])
        legacy = {"augment": False, "val_ways": d.get("ways", 5), "lr_decay": "none"}  # runs made before the recipe
        for k, v in legacy.items():
            d.setdefault(k, v)
        return cls(**d)


def parse_train_bits(method: str, spec: str) -> tuple[int, ...]:
    if method not in METHODS:
        raise TfbitmetaError(f"unknown few-shot method {method!r}; choose from {', '.join(METHODS)}")
    bits = parse_bits(spec, all_bits=FEWSHOT_BITS)
    if method in ADAPTIVE_METHODS and len(bits) < 2:
        raise TfbitmetaError(f"{method} adapts across bitwidths: give several candidates (default: all)", param="bits")
    if method not in ADAPTIVE_METHODS and len(bits) != 1:
        raise TfbitmetaError(f"{method} trains at one bitwidth: pass one value, e.g. 4 (QAT baseline) or fp "
                             f"(vanilla)", param="bits")
    return bits


def model_space(train_bits) -> BitSpace:
    return BitSpace(tuple(sorted(set(FEWSHOT_BITS) | set(train_bits))))


def make_algorithm(bm, fcfg: FewShotConfig, optimizer=None, clip: float = 10.0):
    if fcfg.kind == "maml":
        return FOMAML(bm.keras, optimizer, fcfg.inner_lr, fcfg.inner_steps, clip)
    return ProtoNet(bm.keras, optimizer, clip)
