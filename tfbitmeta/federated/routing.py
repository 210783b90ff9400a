"""Early-exit routing: which test images a client answers with its own exit head and which it offloads to the
server backend (docs/harmony.md, "Routing").

A *score* is larger for images that look in-distribution (ID) to the client.  A :class:`Router` turns a score into
the offload decision with one threshold per client, calibrated on that client's own **validation ID data only**
(held out from its training data by :func:`hold_out_validation`) so that a target fraction of ID images stays
local (``keep_local``).  Nothing about OOD images is used to place the threshold: the client has none.

Scores (all numpy, no TensorFlow):

- ``max_softmax``: the exit head's largest probability (SplitGP-style confidence; the baseline);
- ``entropy``: minus the Shannon entropy of the exit head's probabilities (SplitGP's uncertainty, negated);
- ``energy``: ``T * logsumexp(logits / T)`` of the exit head (minus the free energy);
- ``mahalanobis``: minus the smallest Mahalanobis distance of the features to the client's class means under one
  tied (Ledoit-Wolf shrunk) covariance, fitted on the client's training ID features (:class:`Mahalanobis`);
- ``posterior``: the probability mass a *shared* all-class head puts on the client's own ID classes (the federated
  class posterior: the head is trained by every client, so it knows what the client's OOD classes look like).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tfbitmeta.errors import TfbitmetaError

SCORES = ("max_softmax", "entropy", "energy", "mahalanobis", "posterior")
FIT_IMAGES = 1000  # training ID images per client for the Mahalanobis class means and covariance
DEPLOYED_SCORES = ("mahalanobis", "max_softmax")  # what a device computes (docs/harmony.md, "Deployed routing")
ROUTER_RANK = 64  # rank of the deployed Mahalanobis form (docs/harmony.md, "Deployed routing": AUROC vs full rank)


def deployable(kind: str) -> str:
    """The score a device computes for an algorithm's routing score: itself when deployable, else max-softmax."""
    return kind if kind in DEPLOYED_SCORES else "max_softmax"


def fit_images(train_indices: np.ndarray, seed: int, client: int, n: int = FIT_IMAGES) -> np.ndarray:
    """The (up to ``n``) training images of a client the Mahalanobis statistics are fitted on: a fixed random
    subset, the same in the benchmark's report and in ``tfbitmeta convert``."""
    return np.random.default_rng([seed, 5, client]).permutation(np.asarray(train_indices))[:n]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def logsumexp(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    m = z.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))[..., 0]


def max_softmax(logits: np.ndarray) -> np.ndarray:
    return softmax(logits).max(axis=-1)


def neg_entropy(logits: np.ndarray) -> np.ndarray:
    p = softmax(logits)
    return (p * np.log(np.clip(p, 1e-300, None))).sum(axis=-1)


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return temperature * logsumexp(np.asarray(logits, np.float64) / temperature)


def class_posterior(logits: np.ndarray, id_classes) -> np.ndarray:
    """Mass of softmax(logits) on ``id_classes`` (logits over all classes of the federation)."""
    ids = np.asarray(id_classes, np.int64)
    p = softmax(logits)
    if ids.size == 0 or ids.max() >= p.shape[-1] or ids.min() < 0:
        raise TfbitmetaError(f"ID classes {ids.tolist()} do not index {p.shape[-1]} logits")
    return p[:, ids].sum(axis=-1)


@dataclass
class Mahalanobis:
    """Class means and one shared (tied) covariance of a client's ID training features; the score of a feature
    vector is minus its smallest squared Mahalanobis distance to a class mean."""
    means: np.ndarray = field(default=None, repr=False)      # (classes, d)
    precision: np.ndarray = field(default=None, repr=False)  # (d, d)
    classes: np.ndarray = field(default=None)
    pool: bool = False

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, pool: bool = False) -> "Mahalanobis":
        from sklearn.covariance import LedoitWolf

        f = _flat(features, pool)
        labels = np.asarray(labels)
        if len(f) != len(labels) or len(f) < 2:
            raise TfbitmetaError("Mahalanobis.fit needs at least two labelled feature vectors")
        classes = np.unique(labels)
        means = np.stack([f[labels == c].mean(axis=0) for c in classes])
        centred = f - means[np.searchsorted(classes, labels)]
        cov = LedoitWolf(assume_centered=True).fit(centred)
        return cls(means=means, precision=cov.precision_, classes=classes, pool=pool)

    def score(self, features: np.ndarray) -> np.ndarray:
        f = _flat(features, self.pool)
        fp = f @ self.precision
        # (f - m)' P (f - m) = f'Pf - 2 m'Pf + m'Pm, for every class mean m
        dist = (fp * f).sum(1)[:, None] - 2.0 * fp @ self.means.T + np.einsum("cd,de,ce->c", self.means,
                                                                              self.precision, self.means)[None]
        return -dist.min(axis=1)


    def deployed(self, rank: int = 64) -> "DeployedMahalanobis":
        """The same score in the compact form a device evaluates (:class:`DeployedMahalanobis`).

        With the covariance's eigenvalues ``l_1 >= l_2 >= ...`` and ``b`` the mean of all but the top ``rank``,
        ``P ~= I / b - sum_j<=rank (1/b - 1/l_j) v_j v_j'``: exact when the remaining eigenvalues are equal, which
        is the Ledoit-Wolf shrinkage target with fewer images than feature dimensions (every direction the images
        do not span has the same variance).  Storage and work per image: (classes + rank) x dim."""
        cov = np.linalg.inv((self.precision + self.precision.T) / 2)
        lam, v = np.linalg.eigh((cov + cov.T) / 2)
        lam, v = lam[::-1], v[:, ::-1]
        r = int(min(rank, len(lam) - 1))
        b = float(lam[r:].mean())
        w = np.clip(1.0 / b - 1.0 / lam[:r], 0.0, None)
        return DeployedMahalanobis(means=self.means.astype(np.float32),
                                   projection=(v[:, :r] * np.sqrt(w)).T.astype(np.float32), isotropic=1.0 / b,
                                   classes=self.classes)


@dataclass
class DeployedMahalanobis:
    """The Mahalanobis score as shipped with a front end (docs/harmony.md, "Deployed routing"): the squared
    distance of features ``f`` to class mean ``m`` is ``isotropic * |f - m|^2 - |U f - U m|^2`` (float32
    parameters, float64 sums); the score is minus the smallest.  File layout (:meth:`to_bytes`): float32
    little-endian, the class means (classes x dim, row-major), then ``U`` (rank x dim, row-major); ``isotropic``
    is in the manifest."""
    means: np.ndarray = field(repr=False)        # (classes, dim)
    projection: np.ndarray = field(repr=False)   # U: (rank, dim)
    isotropic: float = 1.0
    classes: np.ndarray = field(default=None)

    def score(self, features: np.ndarray) -> np.ndarray:
        f = _flat(features)
        m, u = self.means.astype(np.float64), self.projection.astype(np.float64)
        z = f[:, None, :] - m[None]                                  # (n, classes, dim)
        d = self.isotropic * (z ** 2).sum(-1) - ((z @ u.T) ** 2).sum(-1)
        return -d.min(axis=1)

    def to_bytes(self) -> bytes:
        return (np.ascontiguousarray(self.means, "<f4").tobytes()
                + np.ascontiguousarray(self.projection, "<f4").tobytes())

    @classmethod
    def from_bytes(cls, buf: bytes, classes: int, rank: int, dim: int, isotropic: float) -> "DeployedMahalanobis":
        want = 4 * (classes + rank) * dim
        if classes < 1 or rank < 0 or dim < 1 or len(buf) != want:
            raise TfbitmetaError(f"router file has {len(buf)} bytes; {classes} class means and rank {rank} "
                                 f"over {dim} features need {want}")
        if not (np.isfinite(isotropic) and isotropic > 0):
            raise TfbitmetaError(f"router isotropic precision must be a positive number (got {isotropic})")
        a = np.frombuffer(buf, "<f4")
        if not np.all(np.isfinite(a)):
            raise TfbitmetaError("router file holds non-finite values")
        return cls(means=a[:classes * dim].reshape(classes, dim), projection=a[classes * dim:].reshape(rank, dim),
                   isotropic=float(isotropic))

    @classmethod
    def load(cls, route: dict, folder) -> "DeployedMahalanobis":
        """The router file a manifest entry's ``route`` names, in ``folder``, after its sha256 check."""
        from pathlib import Path

        from tfbitmeta.export.digest import sha256_bytes

        path = Path(folder) / route["path"]
        try:
            buf = path.read_bytes()
        except OSError as e:
            raise TfbitmetaError(f"cannot read router {path}: {e.strerror}") from None
        if sha256_bytes(buf) != route["sha256"]:
            raise TfbitmetaError(f"{path} fails its sha256 check against the manifest: refusing to use it")
        return cls.from_bytes(buf, int(route["classes"]), int(route["rank"]), int(route["dim"]),
                              float(route["isotropic"]))


def _flat(features: np.ndarray, pool: bool = False) -> np.ndarray:
    """One vector per image: the flattened features, or with ``pool`` feature maps (n, h, w, c) average-pooled
    over space first.  Flattened is the default: on Fashion-MNIST feature maps (7x7x16) it separates OOD clearly
    better (mean AUROC 0.85 vs 0.78 over 10 clients); the Ledoit-Wolf shrinkage keeps the covariance usable with
    fewer images than dimensions."""
    f = np.asarray(features, np.float64)
    if pool and f.ndim == 4:
        f = f.mean(axis=(1, 2))
    return f.reshape(len(f), -1)


def score(kind: str, *, exit_logits=None, features=None, shared_logits=None, id_classes=None,
          mahalanobis: Mahalanobis | None = None, temperature: float = 1.0) -> np.ndarray:
    """One routing score per image (larger = more in-distribution); pass what ``kind`` needs."""
    inputs = {"max_softmax": ("exit_logits", exit_logits), "entropy": ("exit_logits", exit_logits),
              "energy": ("exit_logits", exit_logits), "mahalanobis": ("features", features),
              "posterior": ("shared_logits", shared_logits)}
    if kind not in inputs:
        raise TfbitmetaError(f"unknown routing score {kind!r}: use {', '.join(SCORES)}")
    name, value = inputs[kind]
    if value is None:
        raise TfbitmetaError(f"routing score {kind!r} needs {name}")
    if kind == "max_softmax":
        return max_softmax(exit_logits)
    if kind == "entropy":
        return neg_entropy(exit_logits)
    if kind == "energy":
        return energy(exit_logits, temperature)
    if kind == "mahalanobis":
        if mahalanobis is None:
            raise TfbitmetaError("routing score 'mahalanobis' needs a fitted Mahalanobis model")
        return mahalanobis.score(features)
    if id_classes is None:
        raise TfbitmetaError("routing score 'posterior' needs the client's id_classes")
    return class_posterior(shared_logits, id_classes)


def calibrate_threshold(validation_id_scores: np.ndarray, keep_local: float) -> float:
    """The threshold that keeps (at least) ``keep_local`` of the client's validation ID images local: the
    ``1 - keep_local`` lower quantile of their scores.  ``keep_local = 1`` keeps everything (threshold -inf);
    ``keep_local = 0`` offloads everything (threshold +inf)."""
    s = np.asarray(validation_id_scores, np.float64)
    if not 0.0 <= keep_local <= 1.0:
        raise TfbitmetaError(f"keep_local must be in [0, 1] (got {keep_local})")
    if s.size == 0:
        raise TfbitmetaError("cannot calibrate a router without validation ID images")
    if not np.all(np.isfinite(s)):
        raise TfbitmetaError("validation scores are not finite")
    if keep_local >= 1.0:
        return -np.inf
    if keep_local <= 0.0:
        return np.inf
    # keep local when score >= threshold: the largest threshold with at least ceil(keep * n) scores at or above it
    n_keep = int(np.ceil(keep_local * s.size - 1e-9))
    return float(np.sort(s)[::-1][n_keep - 1])


@dataclass
class Router:
    """Per-client offload rule: offload when ``score < threshold``.

    ``keep_local`` is the target fraction of the client's own validation ID images answered locally; the threshold
    is fixed by :meth:`calibrate` from those images alone.  A fixed ``threshold`` (e.g. SplitGP's confidence 0.8 on
    ``max_softmax``) is the uncalibrated alternative."""
    kind: str = "mahalanobis"
    keep_local: float = 0.95
    threshold: float | None = None

    def __post_init__(self):
        if self.kind not in SCORES:
            raise TfbitmetaError(f"unknown routing score {self.kind!r}: use {', '.join(SCORES)}")

    def calibrate(self, validation_id_scores: np.ndarray) -> "Router":
        self.threshold = calibrate_threshold(validation_id_scores, self.keep_local)
        return self

    def offload(self, scores: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            raise TfbitmetaError("the router has no threshold: calibrate it on validation ID scores first")
        return np.asarray(scores, np.float64) < self.threshold


@dataclass
class ClientRouter:
    """A client's deployed offload rule, as ``convert`` ships it and ``evaluate`` measures it: the score a device
    computes from one front end's outputs (``exit_probs``, ``features``) and the threshold calibrated on the
    client's validation ID images.  ``mahalanobis`` is the compact :class:`DeployedMahalanobis` (None for
    max-softmax)."""
    kind: str
    keep_local: float
    threshold: float
    mahalanobis: DeployedMahalanobis | None = field(default=None, repr=False)
    validation_keep_local: float | None = None  # share of the validation images the threshold keeps local

    @classmethod
    def calibrate(cls, kind: str, keep_local: float, validation: dict, fit: dict | None = None, fit_labels=None,
                  rank: int = ROUTER_RANK) -> "ClientRouter":
        """Fit the score on the client's training images (``fit`` outputs, ``fit_labels``: Mahalanobis only) and
        place the threshold at the ``keep_local`` quantile of its scores on the validation ID outputs."""
        if kind not in DEPLOYED_SCORES:
            raise TfbitmetaError(f"routing score {kind!r} is not deployable: use {', '.join(DEPLOYED_SCORES)}")
        maha = None
        if kind == "mahalanobis":
            if fit is None or fit_labels is None:
                raise TfbitmetaError("a Mahalanobis router needs the client's training features and labels")
            maha = Mahalanobis.fit(fit["features"], fit_labels).deployed(rank)
        r = cls(kind=kind, keep_local=float(keep_local), threshold=np.nan, mahalanobis=maha)
        s = r.scores(validation)
        r.threshold = calibrate_threshold(s, keep_local)
        r.validation_keep_local = float(np.mean(s >= r.threshold))
        return r

    @classmethod
    def from_manifest(cls, route: dict, folder) -> "ClientRouter":
        """The router a manifest entry's ``route`` describes, its Mahalanobis file read from ``folder`` (sha256
        checked)."""
        maha = DeployedMahalanobis.load(route, folder) if route["score"] == "mahalanobis" else None
        return cls(kind=route["score"], keep_local=float(route["keep_local"]), threshold=float(route["threshold"]),
                   mahalanobis=maha, validation_keep_local=route.get("validation_keep_local"))

    def scores(self, outputs: dict) -> np.ndarray:
        """One score per image of a front end's ``outputs`` (``exit_probs``, ``features``); below ``threshold``
        the image goes to the server."""
        if self.kind == "max_softmax":
            return np.asarray(outputs["exit_probs"], np.float64).max(-1)
        return self.mahalanobis.score(outputs["features"])


def answer(exit_pred, server_pred, offload, id_classes, defer_own_classes: bool = False
           ) -> tuple[np.ndarray, np.ndarray]:
    """The client's final answers and which of them are the server's.

    An offloaded image gets the server's label.  With ``defer_own_classes`` an offloaded image for which the
    server names one of the client's own ID classes gets the exit head's label instead: the server says "this is
    one of yours", and on its own classes the personal head is the better judge (this recovers ID images the
    router sent away by mistake; an OOD image the server maps to an ID class was lost anyway)."""
    exit_pred, server_pred, offload = np.asarray(exit_pred), np.asarray(server_pred), np.asarray(offload, bool)
    served = offload & ~np.isin(server_pred, np.asarray(id_classes)) if defer_own_classes else offload
    return np.where(served, server_pred, exit_pred), served


def hold_out_validation(train_indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Split a client's training indices into (train, validation), stratified by class, so that the router's
    calibration set is the client's own ID data and never seen in training.  Every class keeps at least one
    training example; a class with a single example gives none to validation."""
    if not 0.0 < fraction < 1.0:
        raise TfbitmetaError(f"validation fraction must be in (0, 1) (got {fraction})")
    rng = np.random.default_rng(seed)
    idx = np.asarray(train_indices, np.int64)
    y = np.asarray(labels)[idx]
    train, val = [], []
    for c in np.unique(y):
        mine = rng.permutation(idx[y == c])
        n_val = min(len(mine) - 1, int(round(fraction * len(mine))))
        val.append(mine[:n_val])
        train.append(mine[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def client_scores(kinds, *, id_classes, validation: dict, test: dict, train: dict | None = None) -> dict:
    """Every routing score in ``kinds`` for one client's validation ID images and test images.

    ``validation`` / ``test`` hold what the client computes on device for those images: ``exit_logits`` (its exit
    head), ``features`` (the shared features it would send to the server) and, when the federation trains one,
    ``shared_logits`` (the shared all-class head).  ``train`` (``features`` and labels ``y`` of the client's own
    training ID images) fits the Mahalanobis class means and covariance.  Returns ``{kind: (val, test)}``."""
    out = {}
    maha = None
    for kind in kinds:
        if kind == "mahalanobis":
            if train is None:
                raise TfbitmetaError("routing score 'mahalanobis' needs the client's training features and labels")
            maha = maha or Mahalanobis.fit(train["features"], train["y"])
        if kind == "posterior" and validation.get("shared_logits") is None:
            continue  # the algorithm trains no shared head
        out[kind] = tuple(score(kind, exit_logits=d.get("exit_logits"), features=d.get("features"),
                                shared_logits=d.get("shared_logits"), id_classes=id_classes, mahalanobis=maha)
                          for d in (validation, test))
    return out
