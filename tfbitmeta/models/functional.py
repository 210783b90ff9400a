"""Calling a Keras model as a pure function of its weights.

Federated training passes weights around as tensors (TFF computations take and return values, never
variables), yet the forward pass must stay the Keras layers' own.  :func:`bound` temporarily rebinds each weight
attribute of a model's layers (``kernel``, ``bias``, BatchNorm statistics ...) to given tensors, so ``model(...)``
inside the block computes with those tensors and ``tf.GradientTape`` differentiates with respect to them.  Works
eagerly, in ``tf.function`` and in TFF's graph-mode computations, and creates no variables or assign ops.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict

import tensorflow as tf

WEIGHT_ATTRS = ("kernel", "depthwise_kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance")


def weight_slots(model: tf.keras.Model) -> "OrderedDict[str, tuple]":
    """``"<layer>/<attr>" -> (layer, attr)`` for every weight the model's layers read in ``call``."""
    slots = OrderedDict()
    for layer in model.layers:
        for attr in WEIGHT_ATTRS:
            v = layer.__dict__.get(attr)
            if isinstance(v, tf.Variable):
                slots[f"{layer.name}/{attr}"] = (layer, attr)
    return slots


def weights(model: tf.keras.Model) -> "OrderedDict[str, tf.Variable]":
    return OrderedDict((k, getattr(layer, attr)) for k, (layer, attr) in weight_slots(model).items())


def trainable_names(model: tf.keras.Model) -> list[str]:
    return [k for k, v in weights(model).items() if v.trainable]


@contextlib.contextmanager
def bound(model: tf.keras.Model, values: dict):
    """Within the block the model computes with ``values`` (name -> tensor) instead of its variables; names
    not in ``values`` keep their variable."""
    saved = []
    try:
        for name, (layer, attr) in weight_slots(model).items():
            if name in values:
                saved.append((layer, attr, layer.__dict__[attr]))
                object.__setattr__(layer, attr, values[name])
        yield model
    finally:
        for layer, attr, var in reversed(saved):
            object.__setattr__(layer, attr, var)


def values(model: tf.keras.Model) -> "OrderedDict":
    """Current weights as numpy arrays."""
    return OrderedDict((k, v.numpy()) for k, v in weights(model).items())


def assign(model: tf.keras.Model, values_: dict) -> None:
    for k, v in weights(model).items():
        if k in values_:
            v.assign(values_[k])
