"""The training-free baseline: nearest support drawing by modified Hausdorff distance (Dubuisson & Jain 1994).

Each image is the set of its stroke pixels (pixel centres on the integer grid).  For point sets A and B,

    d(A, B)   = mean over a in A of  min over b in B of ||a - b||        (directed, Euclidean)
    MHD(A, B) = max(d(A, B), d(B, A))

and a query takes the class of the support drawing with the smallest MHD (for K > 1 shots: the nearest of all
support drawings).  No learning, no bitwidth: the classic pixel baseline of Omniglot one-shot classification.

Computation: ``min over b`` is the exact Euclidean distance transform of B's background
(:func:`scipy.ndimage.distance_transform_edt`), so ``d(A, B) = <mask_A, DT_B> / |A|``, a matrix product over
all (query, support) pairs of an episode.  An image without stroke pixels is infinitely far from any other
(distance 0 to another empty image).  The baseline runs on the drawings at their native resolution (105x105 for
Omniglot), not on the 28x28 images the networks see, so it is not handicapped by the down-sampling.
"""
from __future__ import annotations

import numpy as np

STROKE_THRESHOLD = 127  # uint8 stroke images (strokes bright): pixel > threshold is a stroke pixel


def stroke_masks(images: np.ndarray) -> np.ndarray:
    """(..., H, W[, 1]) uint8, strokes bright -> (..., H, W) bool stroke masks."""
    x = np.asarray(images)
    if x.ndim >= 3 and x.shape[-1] == 1:
        x = x[..., 0]
    return x > STROKE_THRESHOLD


def distance_transforms(masks: np.ndarray) -> np.ndarray:
    """(..., H, W) bool -> (..., H*W) float32: distance of every pixel to the nearest stroke pixel (inf if none)."""
    from scipy.ndimage import distance_transform_edt

    flat = masks.reshape(-1, *masks.shape[-2:])
    out = np.empty((len(flat), flat.shape[1] * flat.shape[2]), np.float32)
    for i, m in enumerate(flat):
        out[i] = distance_transform_edt(~m).ravel() if m.any() else np.inf
    return out.reshape(*masks.shape[:-2], -1)


def directed(mask_a: np.ndarray, dt_b: np.ndarray) -> np.ndarray:
    """(A, P) bool masks, (B, P) distance transforms -> (A, B) mean distance of A's pixels to B's nearest pixel."""
    a = mask_a.astype(np.float32)
    counts = a.sum(1, keepdims=True)
    finite = np.isfinite(dt_b).all(1)  # images with strokes
    with np.errstate(invalid="ignore", divide="ignore"):
        d = a @ np.where(np.isfinite(dt_b), dt_b, 0.0).T / counts
    d[:, ~finite] = np.inf
    d[(counts[:, 0] == 0)[:, None] & ~finite[None, :]] = 0.0  # two empty images
    d[(counts[:, 0] == 0)[:, None] & finite[None, :]] = np.inf
    return d


def mhd_matrix(query_masks: np.ndarray, query_dt: np.ndarray, support_masks: np.ndarray,
               support_dt: np.ndarray) -> np.ndarray:
    """(Q, S) modified Hausdorff distances between flattened query and support images."""
    return np.maximum(directed(query_masks, support_dt), directed(support_masks, query_dt).T)


def modified_hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """MHD between two stroke images ((H, W) bool masks or uint8 images with bright strokes)."""
    ma = a if a.dtype == bool else stroke_masks(a)
    mb = b if b.dtype == bool else stroke_masks(b)
    dt = distance_transforms(np.stack([ma, mb]))
    flat = np.stack([ma.ravel(), mb.ravel()])
    return float(mhd_matrix(flat[:1], dt[:1], flat[1:], dt[1:])[0, 0])


class HausdorffNearestSupport:
    """Nearest-support classification by MHD over one split; each image's distance transform is computed once,
    when an episode first uses it."""

    kind = "hausdorff"

    def __init__(self, images: np.ndarray):
        """``images``: (classes, drawers, H, W[, 1]) uint8 stroke images (strokes bright)."""
        self.masks = stroke_masks(images).reshape(*images.shape[:2], -1)
        self.shape = images.shape[2:4]
        self._dt: dict[tuple[int, int], np.ndarray] = {}

    def _transforms(self, idx: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        keys = list(zip(idx[0].tolist(), idx[1].tolist()))
        missing = [k for k in dict.fromkeys(keys) if k not in self._dt]
        if missing:
            m = self.masks[tuple(np.array(missing).T)].reshape(len(missing), *self.shape)
            for k, dt in zip(missing, distance_transforms(m)):
                self._dt[k] = dt
        return np.stack([self._dt[k] for k in keys])

    def predict(self, support_idx: tuple[np.ndarray, np.ndarray], support_labels: np.ndarray,
                query_idx: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Indices are (class, drawer) arrays into the split; returns the predicted label of every query."""
        d = mhd_matrix(self.masks[query_idx], self._transforms(query_idx), self.masks[support_idx],
                       self._transforms(support_idx))
        return np.asarray(support_labels)[np.argmin(d, axis=1)]

    def episode_accuracy(self, ep) -> float:
        """Accuracy on one :class:`~tfbitmeta.data.episodes.Episode` drawn from this split."""
        n, k = len(ep.classes), ep.picks.shape[1]
        shots = len(ep.support_labels) // n
        cls = np.repeat(ep.classes[:, None], k, axis=1)
        s_idx = (cls[:, :shots].ravel(), ep.picks[:, :shots].ravel())
        q_idx = (cls[:, shots:].ravel(), ep.picks[:, shots:].ravel())
        return float(np.mean(self.predict(s_idx, ep.support_labels, q_idx) == ep.query_labels))
