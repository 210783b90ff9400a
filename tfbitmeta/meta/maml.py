"""First-order MAML with the bitwidth as input (MEBQAT-MAML, QAT+FOMAML, vanilla FOMAML), docs/method.md, "Few-shot variants".

Per episode: copy theta, ``inner_steps`` SGD steps (lr ``inner_lr``) of quantization-aware training on the
support set *at the episode's bitwidth*, then the gradient of the query loss at the adapted weights (first
order: no back-propagation through the inner steps).  The outer step averages these gradients over the
meta-batch, clips them to ±clip element-wise and applies Adam.

BatchNorm as in the reference MAML network: gamma fixed to 1 (never trained), beta learned in the outer loop
only (excluded from the inner SGD); normalization always with the current batch's statistics (support while
adapting, query when predicting -- transductive).  The adapted weights live in the model's own variables during
an episode; theta is restored afterwards (also in evaluation, which adapts a copy per episode).
"""
from __future__ import annotations

import tensorflow as tf

from tfbitmeta.quant.layers import BitBatchNorm


def _bn_params(model):
    bns = [m for m in model.submodules if isinstance(m, BitBatchNorm)]
    return {id(b.gamma) for b in bns}, {id(b.beta) for b in bns}


def _logits(model, x, cfg):
    bits = tf.tile(cfg[None], [tf.shape(x)[0], 1])
    return model([x, bits], training=True)["logits"]  # batch-statistics BN


def _ce(y, logits):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))


class FOMAML:
    kind = "maml"

    def __init__(self, model: tf.keras.Model, optimizer=None, inner_lr: float = 0.1, inner_steps: int = 5,
                 clip: float = 10.0):
        self.model, self.optimizer = model, optimizer
        self.inner_lr, self.inner_steps, self.clip = inner_lr, inner_steps, clip
        gammas, betas = _bn_params(model)
        self.outer_vars = [v for v in model.trainable_variables if id(v) not in gammas]  # gamma fixed to 1
        self.inner_vars = [v for v in self.outer_vars if id(v) not in betas]  # beta: outer loop only
        self._inner_idx = [i for i, v in enumerate(self.outer_vars) if id(v) not in betas]
        self._train = tf.function(self._train_step)
        self._eval = {}

    def _adapt(self, xs, ys, cfg, steps):
        for _ in range(steps):
            with tf.GradientTape() as tape:
                loss = _ce(ys, _logits(self.model, xs, cfg))
            grads = tape.gradient(loss, self.inner_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            for v, g in zip(self.inner_vars, grads):
                v.assign_sub(self.inner_lr * g)

    def _train_step(self, xs, ys, xq, yq, cfgs):
        """xs (B, N*K, H, W, C), ys (B, N*K), xq (B, N*Q, ...), yq (B, N*Q), cfgs (B, 2)."""
        theta = [tf.identity(v) for v in self.outer_vars]
        n = tf.shape(cfgs)[0]
        acc_g = [tf.zeros_like(v) for v in self.outer_vars]
        losses = tf.TensorArray(tf.float32, size=n)
        accs = tf.TensorArray(tf.float32, size=n)
        for b in tf.range(n):
            for v, t in zip(self.outer_vars, theta):
                v.assign(t)
            self._adapt(xs[b], ys[b], cfgs[b], self.inner_steps)
            with tf.GradientTape() as tape:
                logits = _logits(self.model, xq[b], cfgs[b])
                loss = _ce(yq[b], logits)
            grads = tape.gradient(loss, self.outer_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            acc_g = [a + g for a, g in zip(acc_g, grads)]
            losses = losses.write(b, loss)
            accs = accs.write(b, tf.reduce_mean(tf.cast(tf.argmax(logits, -1, tf.int32) == yq[b], tf.float32)))
        for v, t in zip(self.outer_vars, theta):
            v.assign(t)
        nf = tf.cast(n, tf.float32)
        self.optimizer.apply_gradients(zip([tf.clip_by_value(a / nf, -self.clip, self.clip) for a in acc_g],
                                           self.outer_vars))
        return losses.stack(), tf.reduce_mean(accs.stack())

    def train_step(self, xs, ys, xq, yq, cfgs):
        return self._train(xs, ys, xq, yq, cfgs)

    def _compiled_eval(self, steps: int):
        if steps not in self._eval:
            def ev(xs, ys, xq, yq, cfg):
                theta = [tf.identity(v) for v in self.outer_vars]
                self._adapt(xs, ys, cfg, steps)
                logits = _logits(self.model, xq, cfg)
                loss = _ce(yq, logits)
                acc = tf.reduce_mean(tf.cast(tf.argmax(logits, -1, tf.int32) == yq, tf.float32))
                with tf.control_dependencies([loss, acc]):
                    for v, t in zip(self.outer_vars, theta):
                        v.assign(t)
                return tf.identity(loss), tf.identity(acc)

            self._eval[steps] = tf.function(ev)
        return self._eval[steps]

    def episode_loss(self, xs, ys, xq, yq, cfg, steps=None):
        """Query loss and accuracy after adapting a copy of theta on the support set (theta unchanged)."""
        fn = self._compiled_eval(self.inner_steps if steps is None else steps)
        return fn(xs, ys, xq, yq, tf.constant(cfg, tf.float32))

    def evaluate_episode(self, xs, ys, xq, yq, cfg, steps: int) -> float:
        """Fine-tune on the support set at ``cfg`` (QAT, ``steps`` SGD steps), accuracy on the query set."""
        return float(self._compiled_eval(steps)(xs, ys, xq, yq, tf.constant(cfg, tf.float32))[1])
