"""``tfbitmeta simulate``: the federated simulation driver (Flower's vocabulary: clients, server, strategy).

One round = broadcast of the shared bank, ``local_steps`` split exchanges (client features -> server logits ->
client dCE/dlogits -> server update + dL/dfeatures -> client meta step), then HeteroFL aggregation of the bank.
The same driver runs on TFF (``engine="tff"``) or on the plain-TF executor (``engine="tf"``).
"""
from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfbitmeta.data import datasets
from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.federated import architectures as A
from tfbitmeta.federated import backend, partition
from tfbitmeta.federated.client import ClientWork
from tfbitmeta.federated.executors import LocalExecutor, TffExecutor
from tfbitmeta.federated.latency import LatencyModel
from tfbitmeta.federated.server import ServerWork
from tfbitmeta.quant.bitwidth import DEFAULT_BITS, parse_bit

_BASE = dict(split=True, contrastive=True, sample=True, inner=True, share="bank", personal=True,
             labels_to_server=False, gamma=None, lam=0.0, single_arch=False, centralized=False)
ALGORITHMS = {
    # split: server backend + U-shaped exchange; share: what is aggregated ("bank": HeteroFL on the extractor bank,
    # heads personal; "all": bank and heads, everyone takes the average; "mix": SplitGP's lambda-mix; None: nothing);
    # personal: clients keep their inner-loop-adapted front end; labels_to_server: the SplitGP exchange
    "harmony": dict(_BASE),
    "harmony-no-contrastive": dict(_BASE, contrastive=False),
    "harmony-no-sampling": dict(_BASE, sample=False),
    "harmony-no-inner": dict(_BASE, inner=False),
    "splitgp": dict(_BASE, contrastive=False, sample=False, inner=False, share="mix", personal=False,
                    labels_to_server=True, gamma=0.5, lam=0.2),
    "fedavg": dict(_BASE, split=False, contrastive=False, sample=False, inner=False, share="all", personal=False,
                   single_arch=True),
    "local": dict(_BASE, split=False, contrastive=False, sample=False, inner=False, share=None, personal=False),
    "centralized": dict(_BASE, contrastive=False, sample=False, inner=False, share=None, personal=False,
                        labels_to_server=True, single_arch=True, centralized=True),
}
MIX = {"bank": (0.0, 1.0), "all": (0.0, 0.0)}  # (lambda of the bank, lambda of the head) when receiving the model
OOD_FRACTIONS = (0.0, 0.5, 1.0)


@dataclass
class SimConfig:
    algorithm: str = "harmony"
    dataset: str = "fashion_mnist"
    clients: int = 10
    classes_per_client: int = 2
    dirichlet: float | None = None
    rounds: int = 30
    local_steps: int = 5
    batch_size: int = 32
    architectures: str = "cnn-w1,cnn-w05,mobilenet"
    bits: str = "2,4,8"
    lr: float = 0.05
    inner_lr: float = 0.05
    server_lr: float = 0.05
    contrastive_weight: float = 0.5
    temperature: float = 0.5
    exit_weight: float = 1.0
    threshold: float = 0.8
    dropout: float = 0.0
    engine: str = "tff"
    workers: list = field(default_factory=list)
    limit_train: int | None = None
    seed: int = 0

    def check(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise TfbitmetaError(f"unknown algorithm {self.algorithm!r}: use {', '.join(ALGORITHMS)}")
        if self.engine not in ("tff", "tf"):
            raise TfbitmetaError(f"unknown engine {self.engine!r}: use tff or tf")
        if self.clients < 1 or self.rounds < 1 or self.local_steps < 1:
            raise TfbitmetaError("--clients, --rounds and --local-steps must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise TfbitmetaError(f"--dropout must be in [0, 1) (got {self.dropout})")
        A.parse_architectures(self.architectures)
        self.bit_list()

    def bit_list(self) -> list[int]:
        bits = [parse_bit(t) for t in self.bits.split(",") if t.strip()]
        bad = [b for b in bits if b not in DEFAULT_BITS or b == 16]
        if bad or not bits:
            raise TfbitmetaError(f"--bits {self.bits!r}: client bitwidths must come from 1-8 and fp")
        return list(dict.fromkeys(bits))


def _bits(b: int) -> np.ndarray:
    return np.array([float(b), float(b)], np.float32)


def _tree_np(tree):
    return tf.nest.map_structure(lambda t: np.array(t), tree)


class Simulation:
    def __init__(self, cfg: SimConfig, progress: bool = True):
        cfg.check()
        self.cfg, self.progress = cfg, progress
        self.alg = ALGORITHMS[cfg.algorithm]
        data = datasets.load(cfg.dataset, seed=cfg.seed)
        x_train, y_train = data.x_train, data.y_train
        if cfg.limit_train:
            x_train, y_train = x_train[:cfg.limit_train], y_train[:cfg.limit_train]
        mean, std = float(x_train.mean() / 255.0), float(x_train.std() / 255.0) + 1e-6
        self.norm_stats = (mean, std)  # x = (pixels / 255 - mean) / std
        self.norm = lambda x: ((x.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
        self.x_train, self.y_train = self.norm(x_train), y_train.astype(np.int32)
        self.x_test, self.y_test = self.norm(data.x_test), data.y_test.astype(np.int32)
        self.num_classes, self.class_names = data.num_classes, data.class_names
        if cfg.dirichlet:
            self.parts = partition.dirichlet(self.y_train, cfg.clients, cfg.dirichlet, cfg.seed)
        else:
            self.parts = partition.shards(self.y_train, cfg.clients, cfg.classes_per_client, cfg.seed)
        self.archs = A.parse_architectures(cfg.architectures)
        self.bit_choices = cfg.bit_list()
        alg = self.alg
        # client k: architecture k mod A, bitwidth cycling more slowly so that every pair occurs
        self.client_arch = [0 if alg["single_arch"] else k % len(self.archs) for k in range(cfg.clients)]
        self.client_bits = [self.bit_choices[(k // len(self.archs) + k) % len(self.bit_choices)] for k in range(cfg.clients)]
        # who trains: the clients, or (centralized upper bound) one learner holding the pooled data
        if alg["centralized"]:
            every = np.arange(len(self.y_train))
            self.learners = [partition.ClientData(every, np.arange(self.num_classes))]
        else:
            self.learners = self.parts
        self.global_bank = A.init_bank(self.archs, self.x_train.shape[-1], cfg.seed)
        self.feature_shape = A.feature_shape(self.x_train.shape[1:])
        self.global_head = A.init_head(self.num_classes, cfg.seed, self.feature_shape)
        self.server_w = backend.init_server(self.num_classes, cfg.seed, self.feature_shape)
        zeros = OrderedDict((n, np.zeros_like(v)) for n, v in self.global_bank.items())
        shared_head = alg["share"] in ("all", "mix")
        self.states = [OrderedDict(bank=self.global_bank, mask=zeros,
                                   head=self.global_head if shared_head else A.init_head(self.num_classes, cfg.seed + k, self.feature_shape),
                                   personal=self.global_bank, rejected=np.int32(0)) for k in range(len(self.learners))]
        gamma = alg["gamma"]
        self.client_work = ClientWork(self.archs, self.global_bank, lr=cfg.lr, inner_lr=cfg.inner_lr, inner=alg["inner"],
                                      exit_weight=cfg.exit_weight if gamma is None else gamma,
                                      server_weight=1.0 if gamma is None else 1.0 - gamma)
        self.server_work = ServerWork(lr=cfg.server_lr,
                                      contrastive_weight=cfg.contrastive_weight if alg["contrastive"] else 0.0,
                                      temperature=cfg.temperature)
        self.rng = np.random.default_rng(cfg.seed + 1)
        self.history: list[dict] = []
        self.executor = self._executor()

    # -- set-up ------------------------------------------------------------------------------------------
    def _executor(self):
        mix = MIX.get(self.alg["share"], (self.alg["lam"], self.alg["lam"]))
        if self.cfg.engine == "tf":
            return LocalExecutor(self.client_work, self.server_work, mix)
        saved = self.rng.bit_generator.state  # example values for the type signatures must not shift the draws
        ex_batch, ex_ctl = self._batch(0), self._ctl(0)
        self.rng.bit_generator.state = saved
        feats = np.zeros((1,) + self.client_work.features(
            _tf(self.states[0]["bank"]), _tf(self.states[0]["head"]), _tf(ex_batch), _tf(ex_ctl)).shape, np.float32)
        return TffExecutor(self.client_work, self.server_work, self.states[0], ex_batch, ex_ctl, self.server_w, feats,
                           mix=mix, workers=self.cfg.workers or None)

    def _batch(self, k: int) -> OrderedDict:
        idx = self.learners[k].train
        if len(idx) == 0:
            raise TfbitmetaError(f"client {k} has no training data: use fewer --clients or another partition")
        b = self.cfg.batch_size
        s, q = self.rng.choice(idx, b), self.rng.choice(idx, b)
        return OrderedDict(x_s=self.x_train[s], y_s=self.y_train[s], x_q=self.x_train[q], y_q=self.y_train[q])

    def _ctl(self, k: int) -> OrderedDict:
        if self.alg["centralized"]:  # one model for every client: train it at every client bitwidth
            own, own_bits = 0, int(self.rng.choice(self.bit_choices))
        else:
            own, own_bits = self.client_arch[k], self.client_bits[k]
        if self.alg["sample"]:
            sim, sim_bits = int(self.rng.integers(len(self.archs))), int(self.rng.choice(self.bit_choices))
        elif self.alg["centralized"]:
            sim, sim_bits = own, int(self.rng.choice(self.bit_choices))
        else:
            sim, sim_bits = own, own_bits
        return OrderedDict(own=np.int32(own), own_bits=_bits(own_bits), sim=np.int32(sim), sim_bits=_bits(sim_bits))

    # -- one round ---------------------------------------------------------------------------------------
    def run_round(self, r: int) -> dict:
        cfg, ex, alg = self.cfg, self.executor, self.alg
        t0 = time.perf_counter()
        n = len(self.learners)
        part = [k for k in range(n) if n == 1 or self.rng.random() >= cfg.dropout]
        rec = {"round": r + 1, "participants": len(part), "dropped": n - len(part)}
        if not part:
            rec.update(seconds=time.perf_counter() - t0)
            self.history.append(rec)
            return rec
        states = [self.states[k] for k in part]
        steps = cfg.local_steps * (cfg.clients if alg["centralized"] else 1)  # same number of examples per round
        ce, exit_loss, contrastive, rejected = [], [], [], 0.0
        for _ in range(steps):
            batches = [self._batch(k) for k in part]
            ctls = [self._ctl(k) for k in part]
            feats = ex.features(states, batches, ctls)
            if alg["split"]:
                stacked = np.stack(feats)
                logits = list(ex.server_logits(self.server_w, stacked))
                if alg["labels_to_server"]:
                    dlogits, losses = ex.server_label_gradients(logits, [b["y_q"] for b in batches])
                else:
                    dlogits, losses = ex.logit_gradients(logits, batches)
                self.server_w, dfeats, sm = ex.server_update(self.server_w, stacked, np.stack(dlogits))
                ce.append(float(np.nanmean(losses)))
                contrastive.append(float(sm["contrastive_loss"]))
                rejected += float(sm["clients_rejected"])
                dfeats = list(dfeats)
            else:
                dfeats = [np.zeros_like(f) for f in feats]
            out = ex.client_update(states, batches, ctls, dfeats)
            states = [st for st, _ in out]
            exit_loss.append(float(np.nanmean([float(m["exit_loss"]) for _, m in out])))
            rejected += float(sum(1 - int(bool(m["finite"])) for _, m in out))
        for k, st in zip(part, states):
            self.states[k] = _tree_np(st)
        if alg["share"]:
            sizes = [len(self.learners[k].train) for k in part]
            self.global_bank = ex.aggregate(self.global_bank, [st["bank"] for st in states],
                                            [st["mask"] for st in states], sizes)
            if alg["share"] != "bank":
                ones = OrderedDict((name, np.ones_like(v)) for name, v in self.global_head.items())
                self.global_head = ex.aggregate(self.global_head, [st["head"] for st in states], [ones] * len(states), sizes)
            if not all(np.all(np.isfinite(v)) for v in self.global_bank.values()):
                raise TfbitmetaError("the aggregated bank is not finite (a bug: non-finite updates must be rejected)")
            self.states = [_tree_np(st) for st in ex.distribute(self.global_bank, self.global_head, self.states)]
        rec.update(server_ce=float(np.mean(ce)) if ce else None, exit_loss=float(np.mean(exit_loss)),
                   contrastive=float(np.mean(contrastive)) if contrastive else None,
                   rejected_updates=int(rejected), seconds=time.perf_counter() - t0)
        self.history.append(rec)
        return rec

    def run(self) -> list[dict]:
        from tqdm import tqdm

        bar = tqdm(range(self.cfg.rounds), desc=f"{self.cfg.algorithm} [{self.cfg.engine}]", unit="round",
                   disable=not self.progress)
        for r in bar:
            rec = self.run_round(r)
            bar.set_postfix(loss=f"{rec.get('exit_loss') or 0:.3f}", clients=rec["participants"])
        return self.history

    # -- inference and evaluation ------------------------------------------------------------------------
    def front_end(self, k: int):
        """Client k's personalized front end: (weights of its architecture, exit head, bits)."""
        arch = self.archs[self.client_arch[k]]
        st = self.states[0 if self.alg["centralized"] else k]
        weights = st["personal"] if self.alg["personal"] else st["bank"]
        return A.slice_bank(_tf(weights), arch), arch, _tf(st["head"]), self.client_bits[k]

    def predict(self, k: int, x: np.ndarray, threshold: float | None = None):
        """Early exit when the exit head's confidence >= threshold, else the server backend on the features.
        Returns (prediction, offloaded, exit prediction, server prediction)."""
        w, arch, head, b = self.front_end(k)
        bits = tf.constant(_bits(b))
        thr = self.cfg.threshold if threshold is None else threshold
        feats = A.extract(w, arch, tf.constant(x), bits)
        probs = tf.nn.softmax(A.exit_logits(head, feats, bits)).numpy()
        exit_pred = probs.argmax(-1)
        if not self.alg["split"]:
            return exit_pred, np.zeros(len(x), bool), exit_pred, exit_pred
        server_pred = backend.logits(_tf(self.server_w), feats).numpy().argmax(-1)
        offload = probs.max(-1) < thr
        return np.where(offload, server_pred, exit_pred), offload, exit_pred, server_pred

    def loss(self, n: int = 64) -> dict:
        """Mean cross-entropy of the clients' exit heads and of the server backend on the first ``n`` training
        examples of every client, with the front ends the clients would deploy."""
        exit_ce, server_ce = [], []
        for k in range(self.cfg.clients):
            idx = self.parts[k].train[:n]
            w, arch, head, b = self.front_end(k)
            bits = tf.constant(_bits(b))
            feats = A.extract(w, arch, tf.constant(self.x_train[idx]), bits)
            y = self.y_train[idx]
            exit_ce.append(float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                y, A.exit_logits(head, feats, bits)))))
            server_ce.append(float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                y, backend.logits(_tf(self.server_w), feats)))))
        return {"exit_ce": float(np.mean(exit_ce)), "server_ce": float(np.mean(server_ce))}

    def evaluate(self, latency: LatencyModel | None = None, threshold: float | None = None) -> dict:
        latency = latency or LatencyModel()
        image_shape = self.x_train.shape[1:]
        server_flops = backend.flops(self.server_w, self.feature_shape)
        clients, table = [], {}
        for k in range(self.cfg.clients):
            arch = self.archs[self.client_arch[k]]
            client_flops = A.flops(arch, image_shape) + 2.0 * np.prod(self.feature_shape) * self.num_classes
            row = {"client": k, "architecture": arch.name, "bits": self.client_bits[k],
                   "id_classes": self.parts[k].id_classes.tolist(), "train_examples": int(len(self.parts[k].train))}
            for p in OOD_FRACTIONS:
                idx, is_ood = partition.test_indices(self.y_test, self.parts[k].id_classes, p, self.cfg.seed + k)
                pred, off, exit_pred, server_pred = self.predict(k, self.x_test[idx], threshold)
                y = self.y_test[idx]
                row[f"p{p:g}"] = {
                    "accuracy": float(np.mean(pred == y)), "offload_ratio": float(np.mean(off)),
                    "exit_accuracy": float(np.mean(exit_pred == y)), "server_accuracy": float(np.mean(server_pred == y)),
                    "ood_accuracy": float(np.mean(pred[is_ood] == y[is_ood])) if is_ood.any() else None,
                    "latency_ms": latency.mean_ms(k, client_flops, float(np.mean(off)), int(np.prod(self.feature_shape)),
                                                  self.client_bits[k], server_flops),
                    "samples": int(len(idx))}
            clients.append(row)
        for p in OOD_FRACTIONS:
            key = f"p{p:g}"
            table[key] = {m: float(np.mean([c[key][m] for c in clients]))
                          for m in ("accuracy", "offload_ratio", "exit_accuracy", "server_accuracy", "latency_ms")}
        return {"clients": clients, "mean": table, "latency_model": latency.describe(),
                "threshold": self.cfg.threshold if threshold is None else threshold}


def _tf(tree):
    return tf.nest.map_structure(tf.constant, tree)


def save(sim: Simulation, results: dict, out: Path) -> None:
    """results.json, the round history, per-client front ends and the server backend (npz), PNG plots."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"config": asdict(sim.cfg), "rounds": sim.history, **results}, indent=2))
    ck = out / "checkpoints"
    ck.mkdir(exist_ok=True)
    for k in range(sim.cfg.clients):
        w, arch, head, b = sim.front_end(k)
        np.savez(ck / f"client{k}.npz", **{f"extractor/{n}": v.numpy() for n, v in w.items()},
                 **{f"head/{n}": v.numpy() for n, v in head.items()}, architecture=arch.name, bits=b)
    np.savez(ck / "server.npz", **sim.server_w)
    np.savez(ck / "bank.npz", **sim.global_bank)
    plot(results, sim.history, out / "results.png", sim.cfg.algorithm)


def plot(results: dict, history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    clients = results["clients"]
    xs = np.arange(len(clients))
    for i, p in enumerate(OOD_FRACTIONS):
        axes[0].bar(xs + (i - 1) * 0.27, [100 * c[f"p{p:g}"]["accuracy"] for c in clients], 0.27, label=f"OOD p={p:g}")
    axes[0].set_xlabel("client")
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=7)
    axes[1].plot([h["round"] for h in history], [h["exit_loss"] for h in history], label="client exit CE")
    if history and history[0].get("server_ce") is not None:
        axes[1].plot([h["round"] for h in history], [h["server_ce"] for h in history], label="server CE")
        axes[1].plot([h["round"] for h in history], [h["contrastive"] for h in history], label="contrastive")
    axes[1].set_xlabel("round")
    axes[1].legend(fontsize=7)
    axes[2].bar([f"p={p:g}" for p in OOD_FRACTIONS], [100 * results["mean"][f"p{p:g}"]["offload_ratio"] for p in OOD_FRACTIONS])
    axes[2].set_ylabel("offload ratio (%)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(results: dict) -> str:
    """Per-client and mean accuracy without (p=0) and with OOD samples, offload ratio and modelled latency."""
    head = f"{'client':>6} {'arch':<14} {'bits':>4} {'ID classes':<12} {'acc p=0':>8} {'p=0.5':>7} {'p=1':>7} " \
           f"{'offload p=1':>11} {'latency p=1':>11}"
    lines = [head]

    def row(name, arch, bits, ids, m):
        return (f"{name:>6} {arch:<14} {bits:>4} {ids:<12} {100 * m['p0']['accuracy']:>7.1f}% "
                f"{100 * m['p0.5']['accuracy']:>6.1f}% {100 * m['p1']['accuracy']:>6.1f}% "
                f"{100 * m['p1']['offload_ratio']:>10.1f}% {m['p1']['latency_ms']:>9.1f}ms")
    for c in results["clients"]:
        lines.append(row(c["client"], c["architecture"], str(c["bits"]), ",".join(map(str, c["id_classes"])), c))
    lines.append(row("mean", "", "", "", results["mean"]))
    return "\n".join(lines)


def simulate(cfg: SimConfig, out: Path | None, progress: bool = True) -> tuple[Simulation, dict]:
    """Run the rounds, evaluate, and (with ``out``) write results.json, results.png and the checkpoints."""
    if out is not None:
        out = Path(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TfbitmetaError(f"cannot write to --out {out}: {e.strerror}") from None
    sim = Simulation(cfg, progress=progress)
    try:
        t0 = time.perf_counter()
        sim.run()
        seconds = time.perf_counter() - t0
        results = sim.evaluate()
        results["train_seconds"] = seconds
        results["round_seconds"] = [h["seconds"] for h in sim.history]
    finally:
        sim.executor.close()
    if out is not None:
        save(sim, results, out)
    return sim, results
