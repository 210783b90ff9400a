"""Where a hybrid client's accuracy goes: the decomposition reported for every algorithm and every run
(docs/harmony.md, "Diagnostics").

All functions take plain numpy arrays for one client's test set: labels ``y``, an ``is_ood`` mask (the image's
class is not one of the client's ID classes), the exit head's and the server's predictions for *every* image (the
server's as if every image had been offloaded), and the router's ``offload`` decision.  The accuracy under the
hybrid rule splits exactly into four counts::

    correct = ID local & exit right + ID served & server right + OOD served & server right + OOD local & exit right

where *served* = offloaded and answered with the server's label (all offloaded images, or with
``defer_own_classes`` those for which the server does not name one of the client's own classes, see
:func:`routing.answer`)

and the rest of the decomposition says why each part is what it is: routing recall (OOD images offloaded), false
offload (ID images offloaded), the server's accuracy on the OOD images it received and on all of them (oracle
routing), the *shortcut* (OOD images the server labels as one of the client's own ID classes: the server read
who made the features, not what they show) and the accuracy with oracle routing.
"""
from __future__ import annotations

import numpy as np

from tfbitmeta.errors import TfbitmetaError


def _mean(mask_or_values) -> float | None:
    a = np.asarray(mask_or_values)
    return float(a.mean()) if a.size else None


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float | None:
    """OOD-vs-ID AUROC of a routing score that is larger for ID images: the probability that a random OOD image
    scores below a random ID image (ties count one half).  ``None`` when either set is empty."""
    from sklearn.metrics import roc_auc_score

    id_scores, ood_scores = np.ravel(id_scores).astype(np.float64), np.ravel(ood_scores).astype(np.float64)
    if id_scores.size == 0 or ood_scores.size == 0:
        return None
    labels = np.concatenate([np.zeros(id_scores.size), np.ones(ood_scores.size)])  # OOD is the positive class
    return float(roc_auc_score(labels, -np.concatenate([id_scores, ood_scores])))


def shortcut_rate(server_pred: np.ndarray, is_ood: np.ndarray, id_classes) -> float | None:
    """Fraction of the client's OOD images that the server labels as one of the client's own ID classes (by
    construction always wrong).  ``None`` without OOD images."""
    server_pred, is_ood = np.asarray(server_pred), np.asarray(is_ood, bool)
    if not is_ood.any():
        return None
    return float(np.isin(server_pred[is_ood], np.asarray(id_classes)).mean())


def routing(offload: np.ndarray, is_ood: np.ndarray) -> dict:
    """OOD recall (OOD images offloaded), ID false offload (ID images offloaded) and the offload ratio."""
    offload, is_ood = np.asarray(offload, bool), np.asarray(is_ood, bool)
    return {"offload_ratio": _mean(offload), "ood_recall": _mean(offload[is_ood]),
            "id_false_offload": _mean(offload[~is_ood])}


def decompose(y, is_ood, exit_pred, server_pred, offload, id_classes, owner_server_pred=None,
              defer_own_classes: bool = False) -> dict:
    """The full decomposition of one client's hybrid accuracy on one test set (fractions in [0, 1]).

    ``owner_server_pred`` (optional): the server's predictions on the same OOD images computed through the front
    end of a client that owns each image's class; with it, ``server_acc_ood_via_owner`` sits beside
    ``server_acc_all_ood`` (through this client's own features)."""
    y, is_ood = np.asarray(y), np.asarray(is_ood, bool)
    exit_pred, server_pred, offload = np.asarray(exit_pred), np.asarray(server_pred), np.asarray(offload, bool)
    if not (len(y) == len(is_ood) == len(exit_pred) == len(server_pred) == len(offload)):
        raise TfbitmetaError("decompose: every array must have one entry per test image")
    if np.isin(y[is_ood], id_classes).any() or not np.isin(y[~is_ood], id_classes).all():
        raise TfbitmetaError("decompose: is_ood must mark exactly the images outside the client's ID classes")
    n = max(len(y), 1)
    exit_ok, server_ok = exit_pred == y, server_pred == y
    from tfbitmeta.federated.routing import answer

    pred, served = answer(exit_pred, server_pred, offload, id_classes, defer_own_classes)
    parts = {"id_local_exit_right": int(np.sum(~is_ood & ~served & exit_ok)),
             "id_served_server_right": int(np.sum(~is_ood & served & server_ok)),
             "ood_served_server_right": int(np.sum(is_ood & served & server_ok)),
             "ood_local_exit_right": int(np.sum(is_ood & ~served & exit_ok))}
    out = {"samples": int(len(y)), "ood_samples": int(is_ood.sum()),
           "accuracy": _mean(pred == y), "id_accuracy": _mean((pred == y)[~is_ood]),
           "ood_accuracy": _mean((pred == y)[is_ood]),
           **routing(offload, is_ood), "served_ratio": _mean(served),
           "exit_acc_id": _mean(exit_ok[~is_ood]),
           "exit_acc_kept_id": _mean(exit_ok[~is_ood & ~offload]),
           "server_acc_received_id": _mean(server_ok[~is_ood & offload]),
           "server_acc_all_id": _mean(server_ok[~is_ood]),
           "server_acc_received_ood": _mean(server_ok[is_ood & offload]),
           "server_acc_all_ood": _mean(server_ok[is_ood]),
           "shortcut": shortcut_rate(server_pred, is_ood, id_classes),
           "oracle_accuracy": _mean(np.where(is_ood, server_ok, exit_ok)),
           "counts": parts}
    if sum(parts.values()) != int(np.sum(pred == y)):  # the four parts are the whole (a bug otherwise)
        raise AssertionError("decompose: the parts do not add up to the hybrid accuracy")
    out["accuracy_from_parts"] = sum(parts.values()) / n
    if owner_server_pred is not None:
        owner = np.asarray(owner_server_pred)
        if len(owner) != len(y):
            raise TfbitmetaError("decompose: owner_server_pred needs one entry per test image")
        out["server_acc_ood_via_owner"] = _mean((owner == y)[is_ood])
    return out


def accuracy_at(p: float, id_accuracy: float, ood_accuracy: float | None) -> float:
    """Expected hybrid accuracy on a test set with ``p`` OOD images per ID image, from the accuracy on the ID
    images and on the OOD images: (a_ID + p a_OOD) / (1 + p).  The p = 0 / 0.5 / 1 columns of the table follow
    from these two numbers, which is where the decomposition looks."""
    if p < 0:
        raise TfbitmetaError(f"OOD fraction must be >= 0 (got {p})")
    if p == 0 or ood_accuracy is None:
        return float(id_accuracy)
    return float((id_accuracy + p * ood_accuracy) / (1.0 + p))


def owners(id_classes_per_client: list) -> dict[int, list[int]]:
    """For every class, the clients that hold it as an ID class (the 'owners' of its images)."""
    out: dict[int, list[int]] = {}
    for k, ids in enumerate(id_classes_per_client):
        for c in np.asarray(ids).tolist():
            out.setdefault(int(c), []).append(k)
    return out


def sweep(validation_id_scores, scores, y, is_ood, exit_pred, server_pred,
          keep_rates=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0), id_classes=None,
          defer_own_classes: bool = False) -> list[dict]:
    """Accuracy against offload over a range of target keep-local rates, each threshold calibrated on the
    client's validation ID scores only (the operating curve of the router)."""
    from tfbitmeta.federated.routing import answer, calibrate_threshold

    y, is_ood = np.asarray(y), np.asarray(is_ood, bool)
    exit_pred, server_pred, scores = np.asarray(exit_pred), np.asarray(server_pred), np.asarray(scores, np.float64)
    rows = []
    for keep in keep_rates:
        thr = calibrate_threshold(validation_id_scores, keep)
        off = scores < thr
        pred, _ = answer(exit_pred, server_pred, off, [] if id_classes is None else id_classes,
                         defer_own_classes)
        rows.append({"keep_local": float(keep), "threshold": float(thr), "accuracy": _mean(pred == y),
                     **routing(off, is_ood)})
    return rows


LOWER_IS_BETTER = frozenset({"shortcut", "id_false_offload", "offload_ratio"})


def across_clients(rows: list[dict], key: str) -> dict:
    """Mean and worst client (with its index) of one per-client metric: the lowest value, or the highest for the
    metrics in ``LOWER_IS_BETTER``; clients with ``None`` (e.g. no OOD images) are left out."""
    vals = [(k, r[key]) for k, r in enumerate(rows) if r.get(key) is not None]
    if not vals:
        return {"mean": None, "worst": None, "worst_client": None}
    k, v = (max if key in LOWER_IS_BETTER else min)(vals, key=lambda kv: kv[1])
    return {"mean": float(np.mean([v for _, v in vals])), "worst": float(v), "worst_client": int(k)}


def test_images(y_test, id_classes, max_ood_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The images a client is evaluated on: all test images of its ID classes, then ``round(p_max * n_ID)`` random
    images of the other classes in random order (``(indices into the test set, is_ood)``).  The test set at OOD
    fraction p <= p_max is the ID images plus the first ``round(p * n_ID)`` of those OOD images
    (:func:`at_fraction`), so the sets are nested and every image is run through the models once."""
    y_test = np.asarray(y_test)
    rng = np.random.default_rng(seed)
    id_idx = np.flatnonzero(np.isin(y_test, id_classes))
    pool = np.flatnonzero(~np.isin(y_test, id_classes))
    n_ood = min(len(pool), int(round(max_ood_fraction * len(id_idx))))
    ood_idx = rng.choice(pool, n_ood, replace=False) if n_ood else np.array([], np.int64)
    return (np.concatenate([id_idx, ood_idx]).astype(np.int64),
            np.concatenate([np.zeros(len(id_idx), bool), np.ones(len(ood_idx), bool)]))


def at_fraction(is_ood: np.ndarray, p: float) -> np.ndarray:
    """Positions (into the arrays of :func:`test_images`) of the test set at OOD fraction ``p``."""
    is_ood = np.asarray(is_ood, bool)
    n_id = int((~is_ood).sum())
    ood = np.flatnonzero(is_ood)
    n = int(round(p * n_id))
    if n > len(ood):
        raise TfbitmetaError(f"OOD fraction {p} needs {n} OOD images, only {len(ood)} were drawn")
    return np.concatenate([np.flatnonzero(~is_ood), ood[:n]])


def evaluate_client(y, is_ood, id_classes, exit_pred, server_pred, scores: dict, router: str, keep_local: float,
                    ood_fractions=(0.0, 0.5, 1.0), owner_server_pred=None, fixed_threshold: float | None = None,
                    defer_own_classes: bool = False) -> dict:
    """One client's report on its test images (:func:`test_images`; every array is aligned with them).

    ``exit_pred`` / ``server_pred``: the client's exit-head and server predictions on every image;
    ``scores``: ``{kind: (validation ID scores, test scores)}`` (:func:`routing.client_scores`); ``router``: the
    score that decides; its threshold comes from the validation ID scores alone (``keep_local``), or is
    ``fixed_threshold`` (the uncalibrated SplitGP-style rule); ``"local"`` / ``"server"``: no routing, always the
    exit head (local-only, FedAvg) or always the server (a centralized model).  Every OOD fraction p gets the full
    decomposition;
    AUROC, recall and false offload are reported for every score (each calibrated the same way) on all the
    client's ID vs OOD test images."""
    from tfbitmeta.federated.routing import Router

    y, is_ood = np.asarray(y), np.asarray(is_ood, bool)
    exit_pred, server_pred = np.asarray(exit_pred), np.asarray(server_pred)
    if router in ("local", "server"):  # no routing: always the exit head (local-only, FedAvg) or the server
        offload = np.full(len(y), router == "server")
        out = {"router": router, "threshold": None, "keep_local_target": None, "keep_local_validation": None,
               "scores": {}}
        for kind, (v, t) in scores.items():
            t = np.asarray(t)
            out["scores"][kind] = {"auroc": auroc(t[~is_ood], t[is_ood])}
        for p in ood_fractions:
            sel = at_fraction(is_ood, p)
            out[f"p{p:g}"] = decompose(y[sel], is_ood[sel], exit_pred[sel], server_pred[sel], offload[sel],
                                       id_classes, None if owner_server_pred is None
                                       else np.asarray(owner_server_pred)[sel])
        return out
    if router not in scores:
        raise TfbitmetaError(f"no {router!r} scores for this client (available: {', '.join(scores) or 'none'})")
    val, test = scores[router]
    r = Router(router, keep_local=keep_local)
    if fixed_threshold is None:
        r.calibrate(val)
    else:
        r.threshold = float(fixed_threshold)
    offload = r.offload(test)
    out = {"router": router, "threshold": r.threshold, "keep_local_target": keep_local,
           "defer_own_classes": defer_own_classes,
           "keep_local_validation": float(1 - r.offload(val).mean()), "scores": {}}
    for kind, (v, t) in scores.items():
        t = np.asarray(t)
        rk = Router(kind, keep_local=keep_local).calibrate(v)
        out["scores"][kind] = {"auroc": auroc(t[~is_ood], t[is_ood]), **routing(rk.offload(t), is_ood)}
    for p in ood_fractions:
        sel = at_fraction(is_ood, p)
        out[f"p{p:g}"] = decompose(y[sel], is_ood[sel], exit_pred[sel], server_pred[sel], offload[sel], id_classes,
                                   None if owner_server_pred is None else np.asarray(owner_server_pred)[sel],
                                   defer_own_classes)
    sel = at_fraction(is_ood, max(ood_fractions))
    out["sweep"] = sweep(val, np.asarray(test)[sel], y[sel], is_ood[sel], exit_pred[sel], server_pred[sel],
                         id_classes=id_classes, defer_own_classes=defer_own_classes)
    return out


def owner_predictions(y_test, id_classes_per_client: list, test_indices: list, server_preds: list) -> list:
    """For client k and each of its test images, the server's prediction through the front end of a client that
    owns the image's class (the first other owner; k itself for its own ID images), -1 where no owner evaluated
    that image.  ``test_indices[k]`` / ``server_preds[k]``: client k's test images and its server predictions."""
    y_test = np.asarray(y_test)
    full = []
    for idx, pred in zip(test_indices, server_preds):
        a = np.full(len(y_test), -1, np.int64)
        a[np.asarray(idx)] = np.asarray(pred)
        full.append(a)
    own = owners(id_classes_per_client)
    out = []
    for k, idx in enumerate(test_indices):
        idx = np.asarray(idx)
        pred = np.full(len(idx), -1, np.int64)
        for c in np.unique(y_test[idx]):
            holders = [j for j in own.get(int(c), []) if j != k] or own.get(int(c), [])
            if holders:
                sel = y_test[idx] == c
                pred[sel] = full[holders[0]][idx[sel]]
        out.append(pred)
    return out


SUMMARY_KEYS = ("accuracy", "id_accuracy", "ood_accuracy", "offload_ratio", "ood_recall", "id_false_offload",
                "exit_acc_kept_id", "server_acc_received_id", "server_acc_received_ood", "server_acc_all_ood",
                "server_acc_ood_via_owner", "shortcut", "oracle_accuracy")


def summarize(clients: list[dict], ood_fractions=(0.0, 0.5, 1.0)) -> dict:
    """Mean and worst client of every decomposition entry at every p, and the mean AUROC / recall / false offload
    of every routing score."""
    out = {}
    for p in ood_fractions:
        key = f"p{p:g}"
        rows = [c[key] for c in clients]
        out[key] = {m: across_clients(rows, m) for m in SUMMARY_KEYS if any(r.get(m) is not None for r in rows)}
    kinds = clients[0]["scores"].keys() if clients else []
    out["scores"] = {kind: {m: across_clients([c["scores"][kind] for c in clients], m)
                            for m in ("auroc", "ood_recall", "id_false_offload")} for kind in kinds}
    return out
