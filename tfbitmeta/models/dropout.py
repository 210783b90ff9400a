"""Dropout whose randomness is part of the checkpoint.

Keras' Dropout draws from a generator that ``tf.train.Checkpoint`` does not save, so a resumed run would
draw different masks than an uninterrupted one.  This layer draws stateless masks seeded by
``(seed, counter)``; the counter is a (non-trainable) weight, saved and restored with the model.
"""
from __future__ import annotations

import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package="tfbitmeta")
class CheckpointedDropout(tf.keras.layers.Layer):
    """Dropout with stateless masks seeded by ``(seed, counter)``; the counter is saved with the model.

    Args:
        rate: the fraction of units dropped while training.
        seed: the mask seed (with the step counter).
        **kwargs: :class:`tf.keras.layers.Layer` arguments (``name``, ...).
    """

    def __init__(self, rate: float, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.rate = float(rate)
        self.seed = int(seed)

    def build(self, input_shape):
        self.counter = self.add_weight("counter", shape=(), dtype=tf.int64, initializer="zeros", trainable=False)

    def call(self, x, training=None):
        if not training or self.rate == 0.0:
            return x
        seed = tf.stack([tf.constant(self.seed, tf.int64), self.counter.assign_add(1)])
        keep = tf.random.stateless_uniform(tf.shape(x), seed=seed) >= self.rate
        return tf.where(keep, x / (1.0 - self.rate), tf.zeros_like(x))

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}
