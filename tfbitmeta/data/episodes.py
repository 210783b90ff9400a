"""N-way K-shot episodes drawn from one split's classes, deterministic per (seed, index).

An episode picks N classes, then K support and Q query drawings of each (disjoint).  Labels are 0..N-1 in the
order the classes were drawn; support and query are *class-major* (all drawings of class 0 first).  Episode
``i`` depends only on ``(seed, i)``, so a resumed run sees the episodes an uninterrupted one would, and every
model and bitwidth in an evaluation sees the same test episodes.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from tfbitmeta.errors import TfbitmetaError


@dataclasses.dataclass
class Episode:
    support: np.ndarray  # (N*K, H, W, C) uint8
    support_labels: np.ndarray  # (N*K,) int32
    query: np.ndarray  # (N*Q, H, W, C) uint8
    query_labels: np.ndarray  # (N*Q,) int32
    classes: np.ndarray  # (N,) class indices into the split
    picks: np.ndarray  # (N, K+Q) drawer indices of each class: K support, then Q query


@dataclasses.dataclass(frozen=True)
class Setting:
    ways: int
    shots: int
    queries: int = 15

    @property
    def name(self) -> str:
        return f"{self.ways}w{self.shots}s"

    @classmethod
    def parse(cls, token: str, queries: int = 15) -> "Setting":
        t = token.strip().lower()
        try:
            w, s = t.rstrip("s").split("w")
            return cls(int(w), int(s), queries)
        except ValueError:
            raise TfbitmetaError(f"bad few-shot setting {token!r}: use e.g. 5w1s or 20w5s") from None


class EpisodeSampler:
    def __init__(self, images: np.ndarray, setting: Setting, seed: int, split_name: str = "split"):
        self.images, self.setting, self.seed = images, setting, seed
        c, drawers = images.shape[:2]
        s = setting
        if s.ways < 2 or s.shots < 1 or s.queries < 1:
            raise TfbitmetaError(f"bad episode {s.ways}-way {s.shots}-shot {s.queries} queries: need ways >= 2, "
                                 f"shots >= 1, queries >= 1")
        if s.ways > c:
            raise TfbitmetaError(f"{s.ways}-way episodes need {s.ways} classes; the {split_name} split has {c}")
        if s.shots + s.queries > drawers:
            raise TfbitmetaError(f"{s.shots} shots + {s.queries} queries per class exceed the {drawers} images "
                                 f"per class")

    def episode(self, index: int) -> Episode:
        s = self.setting
        rng = np.random.default_rng([self.seed, index])
        classes = rng.choice(self.images.shape[0], s.ways, replace=False)
        picks = np.stack([rng.choice(self.images.shape[1], s.shots + s.queries, replace=False) for _ in classes])
        imgs = self.images[classes[:, None], picks]  # (N, K+Q, H, W, C)
        labels = np.arange(s.ways, dtype=np.int32)
        return Episode(
            support=imgs[:, :s.shots].reshape(-1, *imgs.shape[2:]),
            support_labels=np.repeat(labels, s.shots),
            query=imgs[:, s.shots:].reshape(-1, *imgs.shape[2:]),
            query_labels=np.repeat(labels, s.queries),
            classes=classes,
            picks=picks,
        )
