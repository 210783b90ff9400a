"""Server work of the split exchange, as functions of tensors: the backend's fallback logits for the clients'
features, and its update from the clients' dCE/dlogits (U-shaped exchange: no label reaches these functions) plus
the label-free contrastive loss between two views of the same images (NT-Xent), returning dL/dfeatures.

``update_with_labels`` is SplitGP's exchange (the client sends its labels); only that baseline calls it.  The label
check (tests/test_federated.py) reads the TFF type signatures of these functions.
"""
from __future__ import annotations

from collections import OrderedDict

import tensorflow as tf

from tfbitmeta.federated.space import ModelSpace


def nt_xent(u_a, u_b, temperature: float):
    """NT-Xent (SimCLR) between two views ``(N, P)`` of the same N images: row i of the two views are positives,
    every other row a negative.  Returns the mean loss."""
    z = tf.math.l2_normalize(tf.concat([u_a, u_b], 0), axis=-1)
    n = tf.shape(u_a)[0]
    sim = tf.matmul(z, z, transpose_b=True) / temperature - 1e9 * tf.eye(2 * n)
    targets = tf.concat([tf.range(n, 2 * n), tf.range(0, n)], 0)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(targets, sim))


class ServerWork:
    def __init__(self, space: ModelSpace, lr: float, contrastive: float = 0.5, temperature: float = 0.5):
        self.space, self.lr, self.mu, self.tau = space, lr, contrastive, temperature

    def logits(self, weights, feats):
        """``feats`` (V, N, *feature_shape) -> logits (V, N, classes)."""
        shape = tf.shape(feats)
        flat = tf.reshape(feats, tf.concat([[-1], shape[2:]], 0))
        logits, _ = self.space.server(weights, flat)
        return tf.reshape(logits, tf.concat([shape[:2], [-1]], 0))

    def update(self, weights, feats, dlogits, lr_scale):
        """One SGD step (``lr * lr_scale``) on the surrogate ``<dlogits, logits> + mu * NT-Xent(view 0, view 1)``.
        Returns (new weights, dL/dfeats, contrastive loss); a non-finite step leaves the weights and returns zero
        gradients."""
        with tf.GradientTape() as tape:
            tape.watch(feats)
            tape.watch(weights)
            shape = tf.shape(feats)
            logits, proj = self.space.server(weights, tf.reshape(feats, tf.concat([[-1], shape[2:]], 0)))
            logits = tf.reshape(logits, tf.concat([shape[:2], [-1]], 0))
            proj = tf.reshape(proj, tf.concat([shape[:2], [-1]], 0))
            contrastive = nt_xent(proj[0], proj[1], self.tau) if self.mu else tf.constant(0.0)
            total = tf.reduce_sum(tf.stop_gradient(dlogits) * logits) + self.mu * contrastive
        gw, gf = tape.gradient(total, (weights, feats), unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return self._apply(weights, gw, gf, contrastive, lr_scale)

    def update_with_labels(self, weights, feats, labels, server_weight: float, lr_scale):
        """SplitGP: the server receives the labels and computes the cross-entropy of both views itself."""
        with tf.GradientTape() as tape:
            tape.watch(feats)
            tape.watch(weights)
            logits = self.logits(weights, feats)
            y = tf.tile(labels[None], [tf.shape(logits)[0], 1])
            ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
            total = server_weight * ce
        gw, gf = tape.gradient(total, (weights, feats), unconnected_gradients=tf.UnconnectedGradients.ZERO)
        new, gf, _ = self._apply(weights, gw, gf, tf.constant(0.0), lr_scale)
        return new, gf, ce

    def _apply(self, weights, gw, gf, metric, lr_scale):
        ok = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in [*gw.values(), gf]])
        lr = self.lr * lr_scale
        new = OrderedDict((k, tf.where(ok, weights[k] - lr * gw[k], weights[k])) for k in weights)
        return new, tf.where(ok, gf, tf.zeros_like(gf)), metric
