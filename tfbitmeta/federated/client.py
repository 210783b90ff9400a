"""Client work of one round (docs/federated.md): ``local_steps`` steps on the client's own data, each

1. **MEBQAT tasks** on the client's own architecture: the exit head's cross-entropy at T bitwidths (the device's
   own first, the others sampled from the candidate set), so one front end works at every candidate bitwidth;
   with ``inner`` the exit head first takes one SGD step on a support half-batch (first-order MAML);
2. **split exchange** (``split``): the query images' features through two simulated extractors -- view 0 its own
   architecture at its own bitwidth, view 1 a sampled architecture x bitwidth (``sample``) -- go to the server
   backend (:class:`~tfbitmeta.federated.server.ServerWork`), which answers with logits; the client turns them
   into dCE/dlogits with its labels (which never leave it), the server updates and returns dL/dfeatures;
3. one SGD step on the shared bank slices it used and on its exit head.

Every step size but the inner one is scaled by the round's broadcast ``lr_scale`` (the schedule,
:mod:`tfbitmeta.federated.schedule`).

The server side runs on the round's copy of the backend that this client's exchanges update (SplitFed-V1
simulation: the aggregator averages the copies), so the whole round of a client is one TFF client computation.
Returns the client's new state, its contribution to the aggregate and summed metrics.  A step whose update is
not finite is skipped and counted.
"""
from __future__ import annotations

from collections import OrderedDict

import tensorflow as tf

from tfbitmeta.federated.algorithms import Algorithm
from tfbitmeta.federated.server import ServerWork
from tfbitmeta.federated.space import ModelSpace


def _ce(logits, y):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))


def _finite(tree) -> tf.Tensor:
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tf.nest.flatten(tree)])


def mix(own, global_, lam: float):
    """``lam * own + (1 - lam) * global`` per entry (what a client keeps of its own model on receiving)."""
    if lam == 0.0:
        return OrderedDict(global_)
    if lam == 1.0:
        return OrderedDict(own)
    return OrderedDict((k, lam * own[k] + (1.0 - lam) * global_[k]) for k in global_)


class ClientWork:
    def __init__(self, space: ModelSpace, server: ServerWork, alg: Algorithm, lr: float, inner_lr: float):
        self.space, self.server, self.alg, self.lr, self.inner_lr = space, server, alg, lr, inner_lr

    def logit_gradients(self, logits, y):
        """The client's side of the U-shaped exchange: dCE/dlogits of the server's logits (V, N, classes) on the
        views the algorithm trains the server on, and that CE."""
        views = tf.constant([0.0, 1.0] if self.alg.server_views == "sampled" else [1.0, 1.0])
        with tf.GradientTape() as tape:
            tape.watch(logits)
            per_view = tf.stack([_ce(logits[v], y) for v in range(2)])
            ce = tf.reduce_sum(views * per_view) / tf.reduce_sum(views)
        return self.alg.server_weight * tape.gradient(ce, logits), ce

    def _own_features(self, own, bank, x, tasks):
        """Features of the batch through the client's own architecture at each of the T task bitwidths (T, B, ...)."""
        T = tasks.shape[0]
        if len(self.space.archs) == 1 or self.alg.single_arch:  # every client runs architecture 0
            return tf.stack([self.space.extract(0, bank, x, tasks[t]) for t in range(T)])
        branches = [lambda i=i: tf.stack([self.space.extract(i, bank, x, tasks[t]) for t in range(T)])
                    for i in range(len(self.space.archs))]
        return tf.switch_case(tf.cast(own, tf.int32), branches)

    def step(self, bank, head, sw, x, y, own, tasks, sim, sim_bits, lr_scale=1.0):
        alg, space = self.alg, self.space
        half = tf.shape(x)[0] // 2
        y_s, x_q, y_q = y[:half], x[half:], y[half:]
        with tf.GradientTape() as tape:
            tape.watch((bank, head))
            own_feats = self._own_features(own, bank, x, tasks)          # (T, B, ...): support and query halves
            exit_losses = []
            for t in range(tasks.shape[0]):
                h = head
                if alg.inner:  # one SGD step of the exit head on the support half (first-order MAML)
                    with tf.GradientTape() as inner:
                        inner.watch(head)
                        inner_loss = _ce(space.exit_logits(head, own_feats[t, :half], tasks[t]), y_s)
                    g = inner.gradient(inner_loss, head, unconnected_gradients=tf.UnconnectedGradients.ZERO)
                    h = OrderedDict((k, head[k] - self.inner_lr * tf.stop_gradient(g[k])) for k in head)
                exit_losses.append(_ce(space.exit_logits(h, own_feats[t, half:], tasks[t]), y_q))
            exit_loss = tf.add_n(exit_losses) / len(exit_losses)
            loss = alg.exit_weight * exit_loss
            server_ce, contrastive = tf.constant(0.0), tf.constant(0.0)
            new_sw = sw
            if alg.split:
                feats_own = own_feats[0, half:]
                feats_sim = space.extract_switch(sim, bank, x_q, sim_bits) if alg.sample else feats_own
                feats = tf.stack([feats_own, feats_sim])
                with tape.stop_recording():
                    if alg.labels_to_server:
                        new_sw, dfeats, server_ce = self.server.update_with_labels(sw, feats, y_q, alg.server_weight,
                                                                                   lr_scale)
                    else:
                        logits = self.server.logits(sw, feats)
                        dlogits, server_ce = self.logit_gradients(logits, y_q)
                        new_sw, dfeats, contrastive = self.server.update(sw, feats, dlogits, lr_scale)
                loss = loss + tf.reduce_sum(tf.stop_gradient(dfeats) * feats)
        gb, gh = tape.gradient(loss, (bank, head), unconnected_gradients=tf.UnconnectedGradients.ZERO)
        ok = tf.logical_and(_finite((gb, gh)), _finite(new_sw))
        lr = self.lr * lr_scale
        bank = OrderedDict((k, tf.where(ok, bank[k] - lr * gb[k], bank[k])) for k in bank)
        head = OrderedDict((k, tf.where(ok, head[k] - lr * gh[k], head[k])) for k in head)
        sw = OrderedDict((k, tf.where(ok, new_sw[k], sw[k])) for k in sw)
        metrics = tf.stack([tf.where(ok, exit_loss, 0.0), tf.where(ok, server_ce, 0.0),
                            tf.where(ok, contrastive, 0.0), 1.0 - tf.cast(ok, tf.float32)])
        return bank, head, sw, metrics

    def round(self, shared, state, data):
        """``shared``: the broadcast (bank, head, server, lr_scale); ``state``: the client's own (bank, head); ``data``: its
        batches and the sampled architectures / bitwidths of the round.  Returns (new state, contribution,
        metrics)."""
        alg = self.alg
        bank = mix(state["bank"], shared["bank"], alg.lam_bank)
        head = mix(state["head"], shared["head"], alg.lam_head)
        sw = OrderedDict(shared["server"])
        start_bank, start_head = bank, head
        mask = OrderedDict((k, tf.zeros_like(v)) for k, v in bank.items())
        sums = tf.zeros([4])
        for s in tf.range(tf.shape(data["x"])[0]):
            bank, head, sw, m = self.step(bank, head, sw, data["x"][s], data["y"][s], data["own"], data["tasks"][s],
                                          data["sim"][s], data["sim_bits"][s], shared["lr_scale"])
            sums = sums + m
            own_mask = self.space.mask_switch(data["own"])
            sim_mask = self.space.mask_switch(data["sim"][s]) if alg.sample else own_mask
            mask = OrderedDict((k, tf.maximum(mask[k], tf.maximum(own_mask[k], sim_mask[k]))) for k in mask)
        n = data["weight"]
        contribution = OrderedDict(
            bank=OrderedDict((k, n * mask[k] * (bank[k] - start_bank[k])) for k in bank),
            bank_weight=OrderedDict((k, n * mask[k]) for k in bank),
            head=OrderedDict((k, n * (head[k] - start_head[k])) for k in head),
            server=OrderedDict((k, n * (sw[k] - shared["server"][k])) for k in sw),
            weight=n)
        metrics = OrderedDict(exit_loss=sums[0], server_ce=sums[1], contrastive=sums[2], rejected=sums[3],
                              steps=tf.cast(tf.shape(data["x"])[0], tf.float32))
        return OrderedDict(bank=bank, head=head), contribution, metrics
