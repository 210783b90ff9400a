"""The algorithms of ``tfbitmeta simulate`` as classes; ablations are constructor parameters.

Each is a frozen description the client work, server work and aggregator read (docs/federated.md):

* ``split``: the client uses the server backend (U-shaped exchange); ``labels_to_server``: SplitGP's exchange, the
  server computes the cross-entropy itself;
* ``contrastive``: weight of the server-side NT-Xent between two views of the same images (0 = off);
* ``sample``: the second view is a sampled architecture x bitwidth (else the client's own, repeated);
* ``server_views``: which views the server's cross-entropy trains on: ``"sampled"`` (balanced over the architecture
  space, so no client's own extractor signature is rewarded) or ``"both"``;
* ``inner``: one inner SGD step of the exit head on a support half-batch before the query loss (first-order MAML,
  "learn to personalize");
* ``lam_bank`` / ``lam_head``: what a client keeps when it receives the aggregate, ``lam * own + (1 - lam) *
  global`` (0 = take the global model, 1 = keep its own; SplitGP's lambda-mix in between);
* ``share_bank`` / ``share_head``: whether the aggregator averages them; ``single_arch``: every client runs the
  first architecture; ``centralized``: one learner holds the pooled data (the upper bound).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from tfbitmeta.errors import TfbitmetaError


@dataclass(frozen=True)
class Algorithm:
    name: str = "harmony"
    split: bool = True
    labels_to_server: bool = False
    contrastive: float = 0.5
    temperature: float = 0.5
    sample: bool = True
    server_views: str = "sampled"
    inner: bool = True
    exit_weight: float = 1.0
    server_weight: float = 1.0
    lam_bank: float = 0.0
    lam_head: float = 1.0
    share_bank: bool = True
    share_head: bool = False
    single_arch: bool = False
    centralized: bool = False

    def to_dict(self) -> dict:
        return {"class": type(self).__name__, **asdict(self)}


@dataclass(frozen=True)
class Harmony(Algorithm):
    """Ours: shared extractor bank (HeteroFL), personal exit heads, server CE on sampled views, contrastive on both."""


@dataclass(frozen=True)
class SplitGP(Algorithm):
    """SplitGP: labels sent to the server, gamma-weighted exit / server losses, lambda-mix of extractor and head."""
    name: str = "splitgp"
    labels_to_server: bool = True
    contrastive: float = 0.0
    sample: bool = False
    server_views: str = "both"
    inner: bool = False
    exit_weight: float = 0.5
    server_weight: float = 0.5
    lam_bank: float = 0.2
    lam_head: float = 0.2
    share_head: bool = True


@dataclass(frozen=True)
class FedAvg(Algorithm):
    """One global model of the first architecture, no server."""
    name: str = "fedavg"
    split: bool = False
    contrastive: float = 0.0
    sample: bool = False
    inner: bool = False
    lam_head: float = 0.0
    share_head: bool = True
    single_arch: bool = True


@dataclass(frozen=True)
class Local(Algorithm):
    """Local training only: no server, nothing shared."""
    name: str = "local"
    split: bool = False
    contrastive: float = 0.0
    sample: bool = False
    inner: bool = False
    lam_bank: float = 1.0
    share_bank: bool = False


@dataclass(frozen=True)
class Centralized(Algorithm):
    """The upper bound: one learner with the pooled data, the first architecture at sampled bitwidths, the server
    backend trained with labels."""
    name: str = "centralized"
    labels_to_server: bool = True
    contrastive: float = 0.0
    sample: bool = False
    server_views: str = "both"
    inner: bool = False
    share_bank: bool = False
    single_arch: bool = True
    centralized: bool = True


ALGORITHMS = {
    "harmony": Harmony(),
    "harmony-no-contrastive": Harmony(name="harmony-no-contrastive", contrastive=0.0),
    "harmony-no-sampling": Harmony(name="harmony-no-sampling", sample=False, server_views="both"),
    "harmony-no-inner": Harmony(name="harmony-no-inner", inner=False),
    "splitgp": SplitGP(),
    "fedavg": FedAvg(),
    "local": Local(),
    "centralized": Centralized(),
}


def get(name: str, **overrides) -> Algorithm:
    try:
        alg = ALGORITHMS[name]
    except KeyError:
        raise TfbitmetaError(f"unknown algorithm {name!r}: use {', '.join(ALGORITHMS)}") from None
    return replace(alg, **overrides) if overrides else alg
