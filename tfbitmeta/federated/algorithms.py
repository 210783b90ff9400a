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

Deployment (docs/harmony.md; they change nothing in training):

* ``router``: the routing score (``tfbitmeta.federated.routing.SCORES``); ``keep_local``: the share of the
  client's validation ID images kept local, which calibrates its threshold (None: the fixed ``--threshold``);
* ``finetune_head``: the client fine-tunes the (shared) exit head on its own data before deploying, the shared
  head staying its router; ``defer_own_classes``: an offloaded image the server labels as one of the client's
  classes keeps the exit head's answer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from tfbitmeta.errors import TfbitmetaError


@dataclass(frozen=True)
class Algorithm:
    """The knobs every hybrid split-FL algorithm is a setting of (docs/federated.md): the subclasses below are
    the published methods and ours, and the ablations are these fields changed (``algorithms.get(name, **kw)``)."""
    name: str = "harmony"
    split: bool = True                 # a server backend answers for the clients (False: whole models on clients)
    labels_to_server: bool = False     # SplitGP's rule; ours keeps raw labels on the client
    contrastive: float = 0.5           # weight of the server-side contrastive alignment of the clients' features
    temperature: float = 0.5           # its softmax temperature
    sample: bool = True                # the server also sees features at a sampled other bitwidth/width
    server_views: str = "sampled"      # which views feed the server's CE: "sampled" or "both"
    inner: bool = True                 # first-order MAML step of the exit head on the support half
    exit_weight: float = 1.0           # loss weight of the early exit ...
    server_weight: float = 1.0         # ... and of the server's answer in the client step
    lam_bank: float = 0.0              # lambda of the personal/shared mix: 0 = take the shared extractor bank
    lam_head: float = 1.0              # the same for the exit head (1 = keep the personal one)
    share_bank: bool = True            # the extractor bank is averaged across clients (HeteroFL slices)
    share_head: bool = False           # the exit head is averaged too
    single_arch: bool = False          # every client runs architecture 0 (FedAvg, centralized)
    centralized: bool = False          # one learner with the pooled data: the upper bound
    router: str = "max_softmax"        # the rule that decides "unsure -> ask the server" (federated/routing.py)
    keep_local: float | None = None    # target fraction of ID images answered on the device, calibrated on validation
    finetune_head: bool = False        # fine-tune a personal exit head at deployment
    defer_own_classes: bool = False    # an offloaded image the server puts in one of the client's own classes
    #                                    gets the exit head's answer instead (routing.answer)

    def to_dict(self) -> dict:
        return {"class": type(self).__name__, **asdict(self)}


@dataclass(frozen=True)
class Harmony(Algorithm):
    """Ours: shared extractor bank (HeteroFL), server CE on sampled views, contrastive on both; each client's exit
    head stays personal (trained on its own classes through the whole budget, never averaged); routing on the
    Mahalanobis distance of the shared features to the client's class means, calibrated on its validation ID data.
    No deferral (``harmony-defer``): it did not pay on either dataset (docs/harmony.md), and the device runtime
    answers an offloaded image with the server's label.  At a budget of 200 client steps the personal head beat a
    shared FedAvg head fine-tuned at deployment by 11 pp on ID images (docs/harmony.md, "Personalization")."""
    router: str = "mahalanobis"
    keep_local: float | None = 0.95


@dataclass(frozen=True)
class LabelledServer(Algorithm):
    """The baselines whose server backend learns from the clients' labels (the labels leave the client): both
    views feed the server's cross-entropy, without contrastive alignment, bitwidth sampling or inner steps."""
    labels_to_server: bool = True
    contrastive: float = 0.0
    sample: bool = False
    server_views: str = "both"
    inner: bool = False


@dataclass(frozen=True)
class SplitGP(LabelledServer):
    """SplitGP: labels sent to the server, gamma-weighted exit / server losses, lambda-mix of extractor and head."""
    name: str = "splitgp"
    exit_weight: float = 0.5
    server_weight: float = 0.5
    lam_bank: float = 0.2
    lam_head: float = 0.2
    share_head: bool = True


@dataclass(frozen=True)
class Unsplit(Algorithm):
    """The baselines without a server backend: each client trains its whole model on its own data (one bitwidth
    per step, no inner adaptation, no contrastive term); subclasses say what is shared."""
    split: bool = False
    contrastive: float = 0.0
    sample: bool = False
    inner: bool = False


@dataclass(frozen=True)
class FedAvg(Unsplit):
    """FedAvg (McMahan et al., 2017): every client trains one global model of the first architecture, which the
    server averages each round; no split, no backend, so the heads are shared too."""
    name: str = "fedavg"
    lam_head: float = 0.0
    share_head: bool = True
    single_arch: bool = True


@dataclass(frozen=True)
class Local(Unsplit):
    """The local-only baseline: each client keeps its own front end and exit head and never communicates.

    Its exit head answers every image, so on out-of-distribution classes it can only be wrong: the floor that any
    hybrid algorithm must beat on with-OOD accuracy and the ceiling it should approach on in-distribution classes.
    """
    name: str = "local"
    lam_bank: float = 1.0
    share_bank: bool = False


@dataclass(frozen=True)
class Centralized(LabelledServer):
    """The upper bound: one learner with the pooled data, the first architecture at sampled bitwidths, the server
    backend trained with labels."""
    name: str = "centralized"
    share_bank: bool = False
    lam_bank: float = 1.0  # the one learner keeps its own extractor (nothing is averaged into it)
    single_arch: bool = True
    centralized: bool = True


ALGORITHMS = {
    "harmony": Harmony(),
    "harmony-no-contrastive": Harmony(name="harmony-no-contrastive", contrastive=0.0),
    "harmony-no-sampling": Harmony(name="harmony-no-sampling", sample=False, server_views="both"),
    "harmony-no-inner": Harmony(name="harmony-no-inner", inner=False),
    # a shared FedAvg exit head fine-tuned per client at deployment (the default of 2026-12-01's first table); the
    # shared head also gives the federated class posterior as a routing score
    "harmony-shared-head": Harmony(name="harmony-shared-head", share_head=True, lam_head=0.0, finetune_head=True),
    # one per deployment component: the same training as "harmony" (or as "harmony-shared-head")
    "harmony-max-softmax": Harmony(name="harmony-max-softmax", router="max_softmax"),
    "harmony-defer": Harmony(name="harmony-defer", defer_own_classes=True),
    "harmony-posterior": Harmony(name="harmony-posterior", share_head=True, lam_head=0.0, finetune_head=True,
                                 router="posterior"),
    "harmony-no-finetune": Harmony(name="harmony-no-finetune", share_head=True, lam_head=0.0),
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


DEPLOYMENT_FIELDS = ("name", "router", "keep_local", "finetune_head", "defer_own_classes")
DEPLOYMENT_ABLATIONS = ("harmony-max-softmax", "harmony-defer", "harmony-posterior", "harmony-no-finetune")


def same_training(a: Algorithm, b: Algorithm) -> bool:
    """Whether two algorithms train identically (they may differ in deployment only)."""
    da, db = asdict(a), asdict(b)
    return all(da[k] == db[k] for k in da if k not in DEPLOYMENT_FIELDS) and type(a) is type(b)


def deployment_variants(name: str) -> list[str]:
    """The deployment ablations evaluated on a training run of ``name`` (same training, another deployment)."""
    alg = get(name)
    return [n for n in DEPLOYMENT_ABLATIONS if n != name and same_training(get(n), alg)]
