"""Personalization at deployment (docs/harmony.md, "Personalization"): a client fine-tunes its exit head on its
own training data, on top of the shared extractor it received, before it deploys.

The shared extractor and the shared (federated) head stay untouched: they are the client's server path and its
router.  Only the personal copy of the head changes, so the features the server reads carry no trace of it.
The fine-tuning steps are client steps like any other and count in the run's budget.

The loop is MEBQAT-style like the client round: every step averages the cross-entropy at the client's own
bitwidth and at one sampled candidate bitwidth, so the fine-tuned head keeps working at every bitwidth.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import tensorflow as tf


def fine_tune_head(space, arch: int, bank: dict, head: dict, x: np.ndarray, y: np.ndarray, own_bits: np.ndarray,
                   candidate_bits: list, steps: int, lr: float, batch_size: int, seed: int) -> OrderedDict:
    """``steps`` SGD steps on the exit head of architecture ``arch`` (bank frozen) over batches of the client's
    ``(x, y)``; returns the new head.  ``own_bits`` / ``candidate_bits``: (2,) bitwidth vectors."""
    head = OrderedDict((k, tf.Variable(np.asarray(v), dtype=tf.float32)) for k, v in head.items())
    bank_t = OrderedDict((k, tf.constant(np.asarray(v))) for k, v in bank.items())
    own = tf.constant(np.asarray(own_bits, np.float32))
    cands = tf.constant(np.stack([np.asarray(b, np.float32) for b in candidate_bits]))

    @tf.function
    def step(xb, yb, j):
        with tf.GradientTape() as tape:
            values = OrderedDict((k, v.read_value()) for k, v in head.items())
            with tape.stop_recording():  # the shared extractor is frozen: features only
                f_own = space.extract(arch, bank_t, xb, own)
                f_other = space.extract(arch, bank_t, xb, cands[j])
            lo_own = space.exit_logits(values, f_own, own)
            lo_other = space.exit_logits(values, f_other, cands[j])
            ce = lambda lo: tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(yb, lo))  # noqa: E731
            loss = 0.5 * (ce(lo_own) + ce(lo_other))
        grads = tape.gradient(loss, list(head.values()))
        ok = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
        for v, g in zip(head.values(), grads):
            v.assign(tf.where(ok, v - lr * g, v))
        return loss

    rng = np.random.default_rng(seed)
    for _ in range(int(steps)):
        b = rng.choice(len(x), min(batch_size, len(x)), replace=len(x) < batch_size)
        step(tf.constant(x[b]), tf.constant(y[b].astype(np.int32)), tf.constant(int(rng.integers(len(candidate_bits)))))
    return OrderedDict((k, v.numpy()) for k, v in head.items())
