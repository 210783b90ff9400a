"""Aggregation of the shared extractor bank, HeteroFL-style: every parameter is averaged over the clients whose
architecture slice contains it, weighted by their data size; a parameter no participating client holds keeps its
value.  Early-exit heads stay with their client in HARMONY; the baselines average them too (FedAvg: a mask of ones) and
SplitGP mixes each client's weights with the average (``personalize``).

Split into a client-side contribution and a server-side combination so that the sum in between can be a
``tff.federated_sum``."""
from __future__ import annotations

from collections import OrderedDict

import tensorflow as tf


def contribution(global_bank, local_bank, mask, num_examples):
    """What one client sends: (n * mask * (local - global), n * mask); zero when its delta is not finite."""
    delta = OrderedDict((k, local_bank[k] - global_bank[k]) for k in global_bank)
    ok = tf.reduce_all([tf.reduce_all(tf.math.is_finite(d)) for d in delta.values()])
    n = tf.where(ok, tf.cast(num_examples, tf.float32), 0.0)
    weighted = OrderedDict((k, tf.where(ok, n * mask[k] * delta[k], tf.zeros_like(delta[k]))) for k in delta)
    weights = OrderedDict((k, n * mask[k]) for k in delta)
    return weighted, weights


def combine(global_bank, weighted_sum, weight_sum):
    return OrderedDict((k, global_bank[k] + tf.math.divide_no_nan(weighted_sum[k], weight_sum[k])) for k in global_bank)


def heterofl_average(global_bank, local_banks, masks, num_examples):
    """Plain-TF reference of ``contribution`` -> sum -> ``combine`` (used by the local executor and tests)."""
    parts = [contribution(global_bank, b, m, n) for b, m, n in zip(local_banks, masks, num_examples)]
    ws = OrderedDict((k, tf.add_n([p[0][k] for p in parts])) for k in global_bank)
    ns = OrderedDict((k, tf.add_n([p[1][k] for p in parts])) for k in global_bank)
    return combine(global_bank, ws, ns)


def personalize(local, global_, lam):
    """SplitGP's personalized mixing ``lam * local + (1 - lam) * global`` (lam = 0: take the global model)."""
    return OrderedDict((k, lam * local[k] + (1.0 - lam) * global_[k]) for k in global_)
