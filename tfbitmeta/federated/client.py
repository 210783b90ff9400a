"""Client work of the HARMONY-style round (docs/federated.md, "Ours"), as pure TF functions of tensors.

Per local step a client sees a support and a query batch of its own data and simulates two extractors:

* view 0: its own architecture at its own bitwidth;
* view 1: an architecture and bitwidth sampled by the orchestrator ("simulate diverse extractors across
  architectures"; with ``sample_archs=False`` view 1 repeats view 0).

Each view's weights are the bank slice adapted by one SGD step on the support batch ("across parameters",
inner loop; ``inner=False`` skips it).  The client sends the query features of both views (never labels); the
server answers with logits; the client returns dCE/dlogits (its labels stay local); the server answers with
dL/dfeatures; the client then takes a first-order meta step on the bank (the gradient at the adapted weights)
and trains its personal exit head.  Its personal front end is the adapted own-architecture slice.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import tensorflow as tf

from tfbitmeta.federated.architectures import Arch, exit_logits, extract, pad_to_bank, slice_bank, slice_mask


def _ce(logits, y):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))


def _finite(tree) -> tf.Tensor:
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tf.nest.flatten(tree)])


class ClientWork:
    """The client computations; ``archs`` fixes the architecture index space shared with the orchestrator."""

    def __init__(self, archs: list[Arch], bank_template: dict, lr: float = 0.05, inner_lr: float = 0.05,
                 inner: bool = True, exit_weight: float = 1.0, server_weight: float = 1.0):
        self.archs = list(archs)
        self.server_weight = server_weight  # SplitGP's (1 - gamma); 1 for HARMONY
        self.template = OrderedDict((k, np.asarray(v)) for k, v in bank_template.items())  # shapes only
        self.lr, self.inner_lr, self.inner, self.exit_weight = lr, inner_lr, inner, exit_weight
        masks = [slice_mask(bank_template, a) for a in self.archs]
        self._masks = OrderedDict((k, np.stack([m[k] for m in masks])) for k in bank_template)  # numpy: graph-safe

    # -- one view --------------------------------------------------------------------------------------
    def _adapted(self, bank, head, arch: Arch, bits, x_s, y_s):
        w = slice_bank(bank, arch)
        if not self.inner:
            return w
        with tf.GradientTape() as tape:
            tape.watch(w)
            loss = _ce(exit_logits(head, extract(w, arch, x_s, bits), bits), y_s)
        g = tape.gradient(loss, w)
        return {k: w[k] - self.inner_lr * g[k] for k in w}

    def _switch(self, idx, fn):
        return tf.switch_case(tf.cast(idx, tf.int32), [lambda a=a: fn(a) for a in self.archs])

    def mask(self, idx) -> OrderedDict:
        return OrderedDict((k, tf.gather(tf.constant(m), tf.cast(idx, tf.int32))) for k, m in self._masks.items())

    # -- exchange 1: features of the query batch through both simulated extractors -----------------------
    def features(self, bank, head, batch, ctl):
        views = []
        for i, (idx, bits) in enumerate(((ctl["own"], ctl["own_bits"]), (ctl["sim"], ctl["sim_bits"]))):
            views.append(self._switch(idx, lambda a, bits=bits: extract(
                self._adapted(bank, head, a, bits, batch["x_s"], batch["y_s"]), a, batch["x_q"], bits)))
        return tf.stack(views)  # (2, Q, h, w, c)

    # -- exchange 2: the client turns the server's logits into dCE/dlogits (labels stay here) -------------
    def logit_gradients(self, logits, y_q):
        """``logits``: (2, Q, classes) -> (server_weight * dCE/dlogits of the mean CE over both views, that CE).
        In SplitGP mode the server runs this same function on labels the clients sent it."""
        y = tf.tile(y_q[None], [tf.shape(logits)[0], 1])
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = _ce(tf.reshape(logits, [-1, tf.shape(logits)[-1]]), tf.reshape(y, [-1]))
        return self.server_weight * tape.gradient(loss, logits), loss

    # -- exchange 3: the meta step with the server's feature gradients -------------------------------------
    def update(self, state, batch, ctl, dfeats):
        """Returns the new client state and metrics.  A step whose gradients are not finite is skipped."""
        bank, head = state["bank"], state["head"]
        grads, head_grads, exit_losses = [], [], []
        personal = None
        for i, (idx, bits) in enumerate(((ctl["own"], ctl["own_bits"]), (ctl["sim"], ctl["sim_bits"]))):
            def view(a, bits=bits, i=i):
                w = self._adapted(bank, head, a, bits, batch["x_s"], batch["y_s"])
                with tf.GradientTape() as tape:
                    tape.watch(w)
                    tape.watch(head)
                    h = extract(w, a, batch["x_q"], bits)
                    exit_loss = _ce(exit_logits(head, h, bits), batch["y_q"])
                    loss = self.exit_weight * exit_loss + tf.reduce_sum(dfeats[i] * h)
                gw, gh = tape.gradient(loss, (w, head))
                return (pad_to_bank(gw, self.template), OrderedDict(gh), pad_to_bank(w, self.template), exit_loss)
            g, gh, adapted, el = self._switch(idx, view)
            grads.append(g)
            head_grads.append(gh)
            exit_losses.append(el)
            if i == 0:
                personal = adapted
        g = OrderedDict((k, grads[0][k] + grads[1][k]) for k in bank)
        gh = OrderedDict((k, head_grads[0][k] + head_grads[1][k]) for k in head)
        ok = _finite((g, gh))
        new_bank = OrderedDict((k, tf.where(ok, bank[k] - self.lr * g[k], bank[k])) for k in bank)
        new_head = OrderedDict((k, tf.where(ok, head[k] - self.lr * gh[k], head[k])) for k in head)
        m_own, m_sim = self.mask(ctl["own"]), self.mask(ctl["sim"])
        new_mask = OrderedDict((k, tf.maximum(state["mask"][k], tf.maximum(m_own[k], m_sim[k]))) for k in bank)
        new_personal = OrderedDict((k, tf.where(ok, personal[k], state["personal"][k])) for k in bank)
        new_state = OrderedDict(bank=new_bank, mask=new_mask, head=new_head, personal=new_personal,
                                rejected=state["rejected"] + tf.cast(tf.logical_not(ok), tf.int32))
        return new_state, OrderedDict(exit_loss=tf.reduce_mean(tf.stack(exit_losses)), finite=ok)
