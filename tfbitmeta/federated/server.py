"""Server work of the round: fallback logits for the clients' features, then one update of the shared backend
with the clients' dCE/dlogits (U-shaped exchange: the server never sees a label) plus the label-free
cross-extractor contrastive loss (NT-Xent between the two views of the same query image), returning
dL/dfeatures to each client.  Pure TF functions of tensors; a client whose features or logit gradients are not
finite is left out of the update (its returned gradient is zero) and counted."""
from __future__ import annotations

from collections import OrderedDict

import tensorflow as tf

from tfbitmeta.federated import backend


class ServerWork:
    def __init__(self, lr: float = 0.05, contrastive_weight: float = 0.5, temperature: float = 0.5):
        self.lr, self.mu, self.tau = lr, contrastive_weight, temperature

    @staticmethod
    def logits(weights, feats):
        """``feats``: (K, 2, Q, h, w, c) -> logits (K, 2, Q, classes)."""
        shape = tf.shape(feats)
        flat = tf.reshape(feats, tf.concat([[-1], shape[3:]], 0))
        out = backend.logits(weights, flat)
        return tf.reshape(out, tf.concat([shape[:3], [-1]], 0))

    def update(self, weights, feats, dlogits):
        """Returns (new weights, dL/dfeats (K, 2, Q, h, w, c), metrics).  K may vary between calls."""
        ok = tf.logical_and(tf.reduce_all(tf.math.is_finite(feats), axis=[1, 2, 3, 4, 5]),
                            tf.reduce_all(tf.math.is_finite(dlogits), axis=[1, 2, 3]))
        okf = tf.cast(ok, tf.float32)
        feats = tf.where(tf.reshape(ok, [-1, 1, 1, 1, 1, 1]), feats, tf.zeros_like(feats))
        dlogits = tf.where(tf.reshape(ok, [-1, 1, 1, 1]), dlogits, tf.zeros_like(dlogits))
        with tf.GradientTape() as tape:
            tape.watch(feats)
            tape.watch(weights)
            ce_surrogate = tf.reduce_sum(dlogits * self.logits(weights, feats))
            shape = tf.shape(feats)
            proj = backend.project(weights, tf.reshape(feats, tf.concat([[-1], shape[3:]], 0)))
            proj = tf.reshape(proj, tf.concat([shape[:3], [-1]], 0))  # (K, 2, Q, P)
            contrastive = tf.reduce_sum(backend.nt_xent(proj[:, 0], proj[:, 1], self.tau) * okf)
            total = ce_surrogate + self.mu * contrastive
        gw, gf = tape.gradient(total, (weights, feats))
        n = tf.maximum(tf.reduce_sum(okf), 1.0)
        new = OrderedDict((name, weights[name] - self.lr * gw[name] / n) for name in weights)
        metrics = OrderedDict(contrastive_loss=contrastive / n, clients_rejected=tf.reduce_sum(1.0 - okf))
        return new, gf, metrics
