"""Non-IID client data: which classes a client sees (its in-distribution, ID, classes) and its test sets with a
fraction of out-of-distribution (OOD) samples (docs/federated.md, "The protocol we evaluate")."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tfbitmeta.errors import TfbitmetaError


@dataclass
class ClientData:
    train: np.ndarray        # indices into the training set
    id_classes: np.ndarray   # the classes this client holds


def shards(y: np.ndarray, num_clients: int, classes_per_client: int, seed: int) -> list[ClientData]:
    """Each client gets ``classes_per_client`` distinct classes; every class goes to about the same number of
    clients, and a class's samples are split evenly among the clients that hold it."""
    classes = np.unique(y)
    if classes_per_client < 1 or classes_per_client > len(classes):
        raise TfbitmetaError(f"classes_per_client {classes_per_client}: the dataset has {len(classes)} classes",
                             param="classes_per_client")
    rng = np.random.default_rng(seed)
    # deal classes round-robin from a shuffled cycle so class loads differ by at most one
    order = np.concatenate([rng.permutation(classes) for _ in range(2 * num_clients + 2)])
    assigned, pos = [], 0
    for _ in range(num_clients):
        mine = []
        while len(mine) < classes_per_client:
            c = order[pos]
            pos += 1
            if c not in mine:
                mine.append(int(c))
        assigned.append(np.array(sorted(mine)))
    holders = {int(c): [k for k, a in enumerate(assigned) if c in a] for c in classes}
    train = [[] for _ in range(num_clients)]
    for c, ks in holders.items():
        if not ks:
            continue
        idx = rng.permutation(np.flatnonzero(y == c))
        for k, part in zip(ks, np.array_split(idx, len(ks))):
            train[k].extend(part.tolist())
    return [ClientData(np.array(sorted(t), dtype=np.int64), a) for t, a in zip(train, assigned)]


def check_alpha(alpha: float) -> None:
    """A Dirichlet concentration must be a positive number (0, negative and nan are refused)."""
    if not alpha > 0:
        raise TfbitmetaError(f"the Dirichlet alpha must be > 0 (got {alpha})", param="dirichlet")


def dirichlet(y: np.ndarray, num_clients: int, alpha: float, seed: int, min_share: float = 0.05) -> list[ClientData]:
    """Dirichlet(alpha) class proportions per client; a client's ID classes are those holding at least
    ``min_share`` of its samples."""
    check_alpha(alpha)
    rng = np.random.default_rng(seed)
    train = [[] for _ in range(num_clients)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        p = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
        for k, part in enumerate(np.split(idx, cuts)):
            train[k].extend(part.tolist())
    out = []
    for t in train:
        t = np.array(sorted(t), dtype=np.int64)
        counts = np.bincount(y[t], minlength=int(y.max()) + 1) if len(t) else np.zeros(int(y.max()) + 1)
        ids = np.flatnonzero(counts >= max(1, min_share * max(1, len(t))))
        out.append(ClientData(t, ids))
    return out


def test_indices(y_test: np.ndarray, id_classes: np.ndarray, ood_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All test samples of the client's ID classes plus ``round(p * that count)`` random samples of the other
    classes.  Returns (indices, is_ood)."""
    rng = np.random.default_rng(seed)
    id_idx = np.flatnonzero(np.isin(y_test, id_classes))
    ood_pool = np.flatnonzero(~np.isin(y_test, id_classes))
    n_ood = min(len(ood_pool), int(round(ood_fraction * len(id_idx))))
    ood_idx = rng.choice(ood_pool, n_ood, replace=False) if n_ood else np.array([], dtype=np.int64)
    idx = np.concatenate([id_idx, ood_idx]).astype(np.int64)
    return idx, np.concatenate([np.zeros(len(id_idx), bool), np.ones(len(ood_idx), bool)])
