"""The server side: one shared backend (fallback classifier: conv 32, flatten, dense 64, dense classes) and the projection head of the contrastive loss.

Pure functions of a weight dict, in float (the server runs full precision), like ``architectures``.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import tensorflow as tf

from tfbitmeta.federated.architectures import FEATURE_CHANNELS

HIDDEN, PROJECTION = 64, 32


def init_server(num_classes: int, seed: int, feature_shape: tuple) -> OrderedDict:
    rng = np.random.default_rng(seed + 104729)

    def he(shape, fan_in):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    flat = int(np.prod(feature_shape[:2])) * 32
    return OrderedDict([
        ("conv/kernel", he((3, 3, FEATURE_CHANNELS, 32), 9 * FEATURE_CHANNELS)), ("conv/bias", np.zeros(32, np.float32)),
        ("fc1/kernel", he((flat, HIDDEN), flat)), ("fc1/bias", np.zeros(HIDDEN, np.float32)),
        ("fc2/kernel", he((HIDDEN, num_classes), HIDDEN) * 0.5), ("fc2/bias", np.zeros(num_classes, np.float32)),
        ("proj/kernel", he((HIDDEN, PROJECTION), HIDDEN)), ("proj/bias", np.zeros(PROJECTION, np.float32)),
    ])


def representation(w: dict, feats):
    h = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(feats, w["conv/kernel"], 1, "SAME"), w["conv/bias"]))
    h = tf.reshape(h, [tf.shape(h)[0], -1])
    return tf.nn.relu(tf.matmul(h, w["fc1/kernel"]) + w["fc1/bias"])


def logits(w: dict, feats):
    return tf.matmul(representation(w, feats), w["fc2/kernel"]) + w["fc2/bias"]


def nt_xent(u_a, u_b, temperature: float):
    """NT-Xent (SimCLR) between two views of the same images, per group: ``u_a``, ``u_b`` (..., N, P); row i of
    the two views are positives, every other row of either view (same group) is a negative.  Projections are
    L2-normalised here.  Returns the mean loss per group, shape (...)."""
    z = tf.math.l2_normalize(tf.concat([u_a, u_b], -2), axis=-1)
    n = tf.shape(u_a)[-2]
    sim = tf.matmul(z, z, transpose_b=True) / temperature
    sim = sim - 1e9 * tf.eye(2 * n)  # an anchor is not its own negative
    targets = tf.concat([tf.range(n, 2 * n), tf.range(0, n)], 0)
    targets = tf.broadcast_to(targets, tf.shape(sim)[:-1])
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(targets, sim), axis=-1)


def project(w: dict, feats):
    return tf.matmul(representation(w, feats), w["proj/kernel"]) + w["proj/bias"]


def flops(w: dict, feature_shape: tuple) -> float:
    """Multiply-accumulates x 2 of the backend's classifier path for one image."""
    h, wd, c = feature_shape
    conv = h * wd * int(np.prod(w["conv/kernel"].shape))
    return 2.0 * float(conv + np.prod(w["fc1/kernel"].shape) + np.prod(w["fc2/kernel"].shape))
