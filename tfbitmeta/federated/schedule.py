"""The learning-rate schedule of a federated run (docs/federated.md, "Learning rate"): a multiplier of every
learner's step size per round, computed by the server from its round counter and broadcast with the shared
weights, so it is stateless for the clients and the same on the TFF and the plain-TF engine.

Every algorithm of a run gets the same schedule (the equal-budget rule): it scales the client step (``--lr``) and
the server backend's step (``server_lr``); the first-order MAML inner step (``inner_lr``) is part of the
algorithm, not of the optimizer, and stays as given.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from tfbitmeta.errors import TfbitmetaError

if TYPE_CHECKING:
    import tensorflow as tf

SCHEDULES = ("cosine", "constant")
DEFAULT = "cosine"


def lr_scale(name: str, rounds: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """``round -> multiplier`` (float32 scalar) for rounds ``0 .. rounds - 1``: ``"constant"`` is 1; ``"cosine"``
    is Keras' ``CosineDecay`` from 1 over the run's rounds (round r: ``(1 + cos(pi r / rounds)) / 2``)."""
    import tensorflow as tf  # lazy: the CLI reads SCHEDULES for its options

    if name not in SCHEDULES:
        raise TfbitmetaError(f"unknown learning-rate schedule {name!r}: use {', '.join(SCHEDULES)}",
                             param="lr_schedule")
    if name == "constant":
        return lambda r: tf.constant(1.0, tf.float32)
    decay = tf.keras.optimizers.schedules.CosineDecay(1.0, decay_steps=max(int(rounds), 1), alpha=0.0)
    return lambda r: tf.cast(decay(r), tf.float32)
