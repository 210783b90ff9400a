"""The model space of a federated run: every client architecture and the server backend, built from the core model
families (``tfbitmeta.models``), and the weight trees that travel in the round.

* ``bank``: per family, the trainable extractor + adapter weights of its widest member (``"<family>/<layer>/<attr>"``).
  A narrower member reads the leading slice of each tensor (HeteroFL); :meth:`ModelSpace.mask` says which entries
  an architecture holds.
* ``head``: a client's early-exit head (``"<layer>/<attr>"`` without the ``exit<s>_`` prefix).  It reads the common
  features, so it has the same shapes for every architecture.
* ``server``: the backend's trainable weights, plus the projection head of the contrastive loss.

Forward passes are the Keras models' own, called on these tensors with :func:`tfbitmeta.models.functional.bound`.
BatchNorm trains on batch statistics; the per-bitwidth statistics are calibrated per client at the end
(:meth:`ModelSpace.client_model`).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import tensorflow as tf

from tfbitmeta.errors import BadArgument
from tfbitmeta.federated.architectures import FEATURE_CHANNELS, SERVER, Arch, model_config
from tfbitmeta.models import BitModel, build
from tfbitmeta.models.functional import bound, weights
from tfbitmeta.quant.bitwidth import FP, BitSpace

PROJECTION = 64


def _tile(bits, x):
    return tf.tile(tf.reshape(tf.cast(bits, tf.float32), [1, 2]), [tf.shape(x)[0], 1])


def _head_key(name: str) -> str | None:
    """``exit3_conv/kernel`` -> ``conv/kernel``; None for weights outside the exit head."""
    layer = name.split("/", 1)[0]
    if layer.startswith("exit") and "_" in layer:
        return name.split("_", 1)[1]
    return None


class ModelSpace:
    def __init__(self, archs: list[Arch], input_shape, num_classes: int, candidates: BitSpace, seed: int = 0,
                 channels: int = FEATURE_CHANNELS):
        self.archs, self.input_shape, self.num_classes = list(archs), tuple(input_shape), num_classes
        self.candidates = candidates
        tf.keras.utils.set_random_seed(seed)
        self.configs = [model_config(a, input_shape, num_classes, candidates, channels) for a in self.archs]
        self.models: list[BitModel] = [build(c) for c in self.configs]
        self.fronts = [bm.front_end(a.split) for bm, a in zip(self.models, self.archs)]
        self.extractors = [bm.extractor(a.split) for bm, a in zip(self.models, self.archs)]
        # every exit head reads the common features, so one head model (architecture 0's layers) serves training
        self.exit_model = self.models[0].exit_head(self.archs[0].split)
        # the server runs at full precision: its BatchNorm needs the FP slot
        server_bits = BitSpace(tuple(sorted(set(candidates.bits) | {FP})), w_eq_a=True)
        self.server_config = model_config(SERVER, input_shape, num_classes, server_bits, channels)
        self.server_bm = build(self.server_config)
        self.server_model = self.server_bm.backend_with_projection(SERVER.split, PROJECTION)
        self.feature_shape = tuple(int(d) for d in self.fronts[0].output["features"].shape[1:])
        for a, fe in zip(self.archs, self.fronts):
            got = tuple(fe.output["features"].shape[1:])
            if got != self.feature_shape:  # every front end must hand the backend the same features
                raise BadArgument(f"architecture {a.name} gives features of shape {got}, {self.archs[0].name} "
                                  f"{self.feature_shape}: the clients' front ends must match", param="architectures")
        # the bank: per family, the widest member's trainable extractor weights
        self.widest = {}
        for i, a in enumerate(self.archs):
            w = self.widest.get(a.family)
            if w is None or a.width > self.archs[w].width:
                self.widest[a.family] = i
        self._names = []   # per architecture: {model weight name: bank key or head key}
        bank, head = OrderedDict(), None
        for i, (a, fe) in enumerate(zip(self.archs, self.fronts)):
            names, h = {}, OrderedDict()
            for name, var in weights(fe).items():
                if not var.trainable:
                    continue
                hk = _head_key(name)
                if hk is not None:
                    names[name] = ("head", hk)
                    h[hk] = var.numpy()
                else:
                    names[name] = ("bank", f"{a.family}/{name}")
            self._names.append(names)
            if head is None:
                head = h
            if self.widest[a.family] == i:
                for name, (where, key) in names.items():
                    if where == "bank":
                        bank[key] = weights(fe)[name].numpy()
        self.init_bank, self.init_head = bank, head
        self.init_server = OrderedDict((k, v.numpy()) for k, v in weights(self.server_model).items() if v.trainable)
        self._masks = [self._mask(i) for i in range(len(self.archs))]

    # -- HeteroFL slices --------------------------------------------------------------------------------
    def _shapes(self, i):
        return {name: tuple(v.shape) for name, v in weights(self.fronts[i]).items()}

    def _mask(self, i) -> OrderedDict:
        shapes = self._shapes(i)
        mask = OrderedDict((k, np.zeros(v.shape, np.float32)) for k, v in self.init_bank.items())
        for name, (where, key) in self._names[i].items():
            if where == "bank":
                mask[key][tuple(slice(0, n) for n in shapes[name])] = 1.0
        return mask

    def mask(self, i: int) -> OrderedDict:
        """1 where architecture ``i`` holds a bank entry, 0 elsewhere."""
        return self._masks[i]

    def arch_values(self, i: int, bank: dict, head: dict) -> dict:
        """Architecture ``i``'s weights (model weight name -> tensor): leading slices of the bank, and the head."""
        shapes = self._shapes(i)
        out = {}
        for name, (where, key) in self._names[i].items():
            if where == "head":
                if key in head:
                    out[name] = head[key]
            else:
                out[name] = bank[key][tuple(slice(0, n) for n in shapes[name])]
        return out

    # -- forward passes (Keras layers on given tensors) ------------------------------------------------------
    def extract(self, i: int, bank, x, bits, training: bool = True):
        """Architecture ``i``'s extractor (+ adapter) on ``x`` at ``bits`` ((2,) tensor): the common features."""
        ex = self.extractors[i]
        with bound(ex, self.arch_values(i, bank, {})):
            return ex([x, _tile(bits, x)], training=training)

    def extract_switch(self, index, bank, x, bits, training: bool = True):
        """:meth:`extract` for an architecture index given as a tensor (one branch runs)."""
        if len(self.archs) == 1:
            return self.extract(0, bank, x, bits, training)
        branches = [lambda i=i: self.extract(i, bank, x, bits, training) for i in range(len(self.archs))]
        return tf.switch_case(tf.cast(index, tf.int32), branches)

    def exit_logits(self, head, feats, bits, training: bool = True):
        """The early-exit head (the client's ``head`` weights) on common features."""
        names = {f"exit{self.archs[0].split}_{k.split('/', 1)[0]}/{k.split('/', 1)[1]}": v for k, v in head.items()}
        with bound(self.exit_model, names):
            return self.exit_model([feats, _tile(bits, feats)], training=training)

    def mask_switch(self, index) -> OrderedDict:
        onehot = tf.one_hot(tf.cast(index, tf.int32), len(self.archs))
        return OrderedDict((k, tf.add_n([onehot[i] * tf.constant(self._masks[i][k]) for i in range(len(self.archs))]))
                           for k in self.init_bank)

    def server(self, weights_, feats, training: bool = True):
        """The backend (full precision) on ``feats`` (N, *feature_shape): (logits, projection)."""
        with bound(self.server_model, weights_):
            out = self.server_model([feats, _tile(tf.constant([float(FP), float(FP)]), feats)], training=training)
        return out["logits"], out["projection"]

    # -- deployable Keras models of one client ----------------------------------------------------------------
    def client_model(self, i: int, bank: dict, head: dict) -> BitModel:
        """Architecture ``i``'s BitModel with a client's weights assigned (its BN statistics still to calibrate)."""
        bm = self.models[i]
        values = self.arch_values(i, {k: np.asarray(v) for k, v in bank.items()}, head)
        for name, var in weights(self.fronts[i]).items():
            if name in values:
                var.assign(np.asarray(values[name]))
        return bm

    def server_bitmodel(self, weights_: dict) -> BitModel:
        for name, var in weights(self.server_model).items():
            if name in weights_:
                var.assign(np.asarray(weights_[name]))
        return self.server_bm
