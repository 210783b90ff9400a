"""Prototypical networks with the bitwidth as input (MEBQAT-PN, QAT+ProtoNet, vanilla ProtoNet).

Episodes are class-major.  Prototypes are the class means of the support embeddings; the logits of a query are
the *negative squared Euclidean* distances to the prototypes (Snell et al.; docs/method.md, "Few-shot variants"); loss = CE on the
queries.  BatchNorm normalizes with the statistics of the batch the model sees: support and query embedded
together (the reference's transductive setting, docs/method.md, "BatchNorm").
"""
from __future__ import annotations

import tensorflow as tf


def prototypes(z_support, ways: int, shots: int):
    """(N*K, D) class-major support embeddings -> (N, D) class means."""
    return tf.reduce_mean(tf.reshape(z_support, [ways, shots, -1]), axis=1)


def squared_distances(z_query, protos):
    """(Q, D), (N, D) -> (Q, N) squared Euclidean distances ||q - p||^2."""
    return tf.reduce_sum(tf.square(z_query[:, None, :] - protos[None, :, :]), axis=-1)


def proto_logits(z_support, z_query, ways: int, shots: int):
    return -squared_distances(z_query, prototypes(z_support, ways, shots))


def proto_loss(z, ways: int, shots: int, queries: int):
    """Loss and accuracy of one episode from the embeddings of ``concat(support, query)`` (class-major)."""
    ns = ways * shots
    logits = proto_logits(z[:ns], z[ns:], ways, shots)
    y = tf.repeat(tf.range(ways), queries)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
    acc = tf.reduce_mean(tf.cast(tf.argmax(logits, -1, tf.int32) == y, tf.float32))
    return loss, acc


def _embed(model, x, cfg):
    bits = tf.tile(cfg[None], [tf.shape(x)[0], 1])
    return model([x, bits], training=True)["logits"]  # training=True: batch-statistics BN (transductive)


class ProtoNet:
    """Training step (T bitwidth configurations share one episode, losses averaged) and episode evaluation."""

    kind = "protonet"

    def __init__(self, model: tf.keras.Model, optimizer=None, clip: float = 10.0):
        self.model, self.optimizer, self.clip = model, optimizer, clip
        self.variables = model.trainable_variables
        self._steps, self._evals = {}, {}

    def train_step(self, x, cfgs, ways: int, shots: int, queries: int):
        """x: normalized ``concat(support, query)``; cfgs: (T, 2).  Returns (per-task losses, mean accuracy)."""
        key = (ways, shots, queries)
        if key not in self._steps:
            self._steps[key] = self._make_step(ways, shots, queries)
        return self._steps[key](x, cfgs)

    def _make_step(self, ways, shots, queries):
        model, variables, opt, clip = self.model, self.variables, self.optimizer, self.clip

        @tf.function
        def step(x, cfgs):
            n = tf.shape(cfgs)[0]
            acc_g = [tf.zeros_like(v) for v in variables]
            losses = tf.TensorArray(tf.float32, size=n)
            accs = tf.TensorArray(tf.float32, size=n)
            for t in tf.range(n):
                with tf.GradientTape() as tape:
                    loss, acc = proto_loss(_embed(model, x, cfgs[t]), ways, shots, queries)
                grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
                acc_g = [a + g for a, g in zip(acc_g, grads)]
                losses = losses.write(t, loss)
                accs = accs.write(t, acc)
            nf = tf.cast(n, tf.float32)
            opt.apply_gradients(zip([tf.clip_by_value(a / nf, -clip, clip) for a in acc_g], variables))
            return losses.stack(), tf.reduce_mean(accs.stack())

        return step

    def episode_loss(self, x, cfg, ways, shots, queries):
        """Loss and accuracy of one episode at one configuration, no update."""
        return proto_loss(_embed(self.model, x, tf.constant(cfg, tf.float32)), ways, shots, queries)

    def evaluate_episode(self, x, cfg, ways: int, shots: int, queries: int) -> float:
        key = (ways, shots, queries)
        if key not in self._evals:
            model = self.model

            @tf.function
            def ev(x, cfg):
                return proto_loss(_embed(model, x, cfg), ways, shots, queries)[1]

            self._evals[key] = ev
        return float(self._evals[key](x, tf.constant(cfg, tf.float32)))
