"""``tfbitmeta simulate``: the federated simulation driver (docs/federated.md).

One round = the TFF process's ``next`` (distributor -> client work with the split exchange -> aggregator -> server
work), the same on the plain-TF engine.  At the end every client's deployable front end is its architecture's core
``BitModel`` with the weights it deploys and per-bitwidth BatchNorm statistics calibrated on its own training data;
the server backend's statistics are calibrated on features from every client.  The run directory is a
``tfbitmeta.runs`` run of kind ``federated``:

```
OUT/run.json                     kind, config, algorithm, normalization, dataset, clients (architecture, bits, ID
                                 classes, model config), server (model config, split), status
OUT/clients/client<k>/           the client's front-end BitModel checkpoint
OUT/server/                      the server backend's BitModel checkpoint
OUT/predictions.npz              per client, on every test image: exit_probs (K, N, C), server_probs (K, N, C)
OUT/results.json, results.png    per-client table, round history, timings
```
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
from tfbitmeta.data.pipeline import Normalization
from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.federated import algorithms, partition, routing
from tfbitmeta.federated.architectures import DEFAULT_ARCHITECTURES, SERVER, parse_architectures
from tfbitmeta.federated.client import ClientWork, mix
from tfbitmeta.federated.latency import LatencyModel
from tfbitmeta.federated.process import LocalProcess, TffProcess
from tfbitmeta.federated.schedule import DEFAULT as DEFAULT_SCHEDULE, lr_scale
from tfbitmeta.federated.server import ServerWork
from tfbitmeta.federated.space import ModelSpace
from tfbitmeta.models import build, min_input_size
from tfbitmeta.quant.bitwidth import FP, BitSpace, parse_bits
from tfbitmeta.quant.calibration import calibrate_batchnorm
from tfbitmeta.runs import RUN_VERSION, RunDir, check_writable, restore_weights, save_weights

OOD_FRACTIONS = (0.0, 0.5, 1.0)
CLIENT_BITS = (1, 2, 3, 4, 5, 6, 7, 8, FP)  # what a client's front end can run at
IMAGE_SIZE = 28  # inputs smaller than the model families need are resized to this


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
    architectures: str = DEFAULT_ARCHITECTURES
    bits: str = "2,4,8"
    tasks: int = 2
    lr: float = 0.05
    lr_schedule: str = DEFAULT_SCHEDULE  # per-round multiplier of every step size (federated/schedule.py)
    inner_lr: float = 0.05
    server_lr: float = 0.05
    contrastive_weight: float = 0.5
    temperature: float = 0.5
    threshold: float = 0.8
    dropout: float = 0.0
    engine: str = "tff"
    workers: list = field(default_factory=list)
    limit_train: int | None = None
    calib_images: int = 512
    finetune_steps: int = 10  # deployment fine-tuning of the exit head (algorithms with finetune_head)
    validation_fraction: float = 0.1  # of each client's training data, held out to calibrate its router
    keep_local: float | None = None   # calibrated routers: target share of validation ID images kept local
    #                                   [default: the algorithm's]
    seed: int = 0

    def check(self) -> None:
        algorithms.get(self.algorithm)
        if self.engine not in ("tff", "tf"):
            raise TfbitmetaError(f"unknown engine {self.engine!r}: use tff or tf")
        for name in ("clients", "rounds", "local_steps", "tasks"):
            if getattr(self, name) < 1:
                raise TfbitmetaError(f"{name} must be at least 1 (got {getattr(self, name)})", param=name)
        if self.dirichlet is not None:  # before any data is loaded; 0 must not fall back to class shards
            partition.check_alpha(self.dirichlet)
        if self.batch_size < 2:
            raise TfbitmetaError(f"batch_size must be at least 2 (support and query halves; got {self.batch_size})",
                                 param="batch_size")
        if not 0.0 <= self.dropout < 1.0:
            raise TfbitmetaError(f"dropout must be in [0, 1) (got {self.dropout})", param="dropout")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise TfbitmetaError(f"validation_fraction must be in [0, 1) (got {self.validation_fraction})",
                                 param="validation_fraction")
        if self.keep_local is not None and not 0.0 <= self.keep_local <= 1.0:
            raise TfbitmetaError(f"keep_local must be in [0, 1] (got {self.keep_local})", param="keep_local")
        if self.calibrated_keep_local() is not None and self.validation_fraction == 0.0:
            raise TfbitmetaError(f"{self.algorithm} calibrates its router on validation ID images: "
                                 "validation_fraction must be above 0", param="validation_fraction")
        parse_architectures(self.architectures)
        self.bit_list()
        lr_scale(self.lr_schedule, self.rounds)

    def calibrated_keep_local(self) -> float | None:
        """The keep-local target of a calibrated router (None: the algorithm routes on a fixed threshold)."""
        alg = algorithms.get(self.algorithm)
        if not alg.split or alg.centralized or (alg.keep_local is None and self.keep_local is None):
            return None
        return self.keep_local if self.keep_local is not None else alg.keep_local

    def bit_list(self) -> list[int]:
        bits = parse_bits(self.bits, all_bits=CLIENT_BITS, keep_order=True)  # 'all': every client bitwidth
        if any(b not in CLIENT_BITS for b in bits):
            raise TfbitmetaError(f"bits {self.bits!r}: client bitwidths must come from 1-8 and fp", param="bits")
        return list(bits)

    def algorithm_object(self) -> algorithms.Algorithm:
        return algorithms.get(self.algorithm, contrastive=self.contrastive_weight, temperature=self.temperature) \
            if algorithms.get(self.algorithm).contrastive else algorithms.get(self.algorithm)


def _bits(b: int) -> np.ndarray:
    return np.array([float(b), float(b)], np.float32)


class Simulation:
    def __init__(self, cfg: SimConfig, progress: bool = True):
        cfg.check()
        self.cfg, self.progress = cfg, progress
        self.alg = cfg.algorithm_object()
        data = datasets.load(cfg.dataset, seed=cfg.seed).limit_train(cfg.limit_train)
        self.data = data
        need = max(min_input_size(a.family) for a in [*parse_architectures(cfg.architectures), SERVER])
        size = (IMAGE_SIZE, IMAGE_SIZE) if min(data.image_shape[:2]) < need else None
        self.norm = Normalization.fit(data.x_train, size)
        self.x_train = self.norm.apply(data.x_train).numpy()
        self.y_train = data.y_train.astype(np.int32)
        self.num_classes, self.class_names = data.num_classes, list(data.class_names)
        if cfg.dirichlet is not None:
            self.parts = partition.dirichlet(self.y_train, cfg.clients, cfg.dirichlet, cfg.seed)
        else:
            self.parts = partition.shards(self.y_train, cfg.clients, cfg.classes_per_client, cfg.seed)
        self.archs = parse_architectures(cfg.architectures)
        self.bit_choices = cfg.bit_list()
        self.candidates = BitSpace(tuple(self.bit_choices), w_eq_a=True)
        self.space = ModelSpace(self.archs, self.norm.model_input_shape(data.image_shape[-1]), self.num_classes,
                                self.candidates, cfg.seed)
        alg = self.alg
        n_archs = len(self.archs)
        # client k: architecture k mod A, bitwidth cycling more slowly so that every pair occurs
        self.client_arch = [0 if alg.single_arch else k % n_archs for k in range(cfg.clients)]
        self.client_bits = [self.bit_choices[(k // n_archs + k) % len(self.bit_choices)] for k in range(cfg.clients)]
        if alg.centralized:  # one learner holding the pooled data
            self.learners = [partition.ClientData(np.arange(len(self.y_train)), np.arange(self.num_classes))]
        else:
            self.learners = self.parts
        self.validation = self._hold_out_validation()
        sp = self.space
        self.state = OrderedDict(bank=sp.init_bank, head=sp.init_head, server=sp.init_server, round=np.int32(0))
        self.client_states = [OrderedDict(bank=sp.init_bank, head=sp.init_head) for _ in self.learners]
        server = ServerWork(sp, cfg.server_lr, alg.contrastive, alg.temperature)
        self.client_work = ClientWork(sp, server, alg, cfg.lr, cfg.inner_lr)
        self.lr_scale = lr_scale(cfg.lr_schedule, cfg.rounds)
        self.rng = np.random.default_rng(cfg.seed + 1)
        self.history: list[dict] = []
        self.process = self._process()
        self.state = self.process.initialize()

    def _hold_out_validation(self) -> list[np.ndarray]:
        """Client k's validation ID images (indices into the training set), held out of what every learner trains
        on (the pooled learner too, so every algorithm sees the same data): the calibration set of the client's
        router (docs/harmony.md, "Routing")."""
        f = self.cfg.validation_fraction
        if f == 0.0:
            return [np.zeros(0, np.int64) for _ in self.parts]
        val = []
        for k, part in enumerate(self.parts):
            part.train, v = routing.hold_out_validation(part.train, self.y_train, f, self.cfg.seed + 1000 + k)
            val.append(v)
        if self.alg.centralized:
            self.learners[0].train = np.setdiff1d(self.learners[0].train, np.concatenate(val))
        return val

    def router_spec(self, k: int) -> dict | None:
        """What ``tfbitmeta convert`` needs to build client k's deployed router from the exported front end
        (docs/harmony.md, "Deployed routing"): the score, the keep-local target, the validation images that
        place the threshold and the training images that fit the Mahalanobis statistics.  None: no calibrated
        router (the manifest's fixed exit threshold decides)."""
        keep = self.cfg.calibrated_keep_local()
        if keep is None:
            return None
        spec = {"score": self.alg.router, "keep_local": float(keep),
                "validation": [int(i) for i in self.validation[k]]}
        if self.alg.router == "mahalanobis":
            spec["fit"] = [int(i) for i in np.sort(routing.fit_images(self.parts[k].train, self.cfg.seed, k))]
        return spec

    def _process(self):
        if self.cfg.engine == "tf":
            return LocalProcess(self.client_work, self.state, self.lr_scale)
        saved = self.rng.bit_generator.state  # the example for the type signatures must not shift the draws
        example = self._data(0)
        self.rng.bit_generator.state = saved
        return TffProcess(self.client_work, self.state, self.client_states[0], example, self.lr_scale,
                          workers=self.cfg.workers)

    # -- what one learner trains on in a round ---------------------------------------------------------------
    def _data(self, k: int) -> OrderedDict:
        cfg, alg = self.cfg, self.alg
        idx = self.learners[k].train
        if len(idx) == 0:
            raise TfbitmetaError(f"client {k} has no training data: use fewer clients or another partition",
                                 param="clients")
        steps = cfg.local_steps * (cfg.clients if alg.centralized else 1)  # same examples per round for everyone
        pick = self.rng.choice(idx, (steps, cfg.batch_size))
        bits = np.array(self.bit_choices)
        if alg.centralized:
            own, own_bits = 0, self.rng.choice(bits, steps)
        else:
            own, own_bits = self.client_arch[k], np.full(steps, self.client_bits[k])
        tasks = np.empty((steps, cfg.tasks, 2), np.float32)
        tasks[:, 0] = own_bits[:, None]
        if cfg.tasks > 1:
            tasks[:, 1:] = self.rng.choice(bits, (steps, cfg.tasks - 1))[..., None]
        if alg.sample:
            sim = self.rng.integers(len(self.archs), size=steps).astype(np.int32)
            sim_bits = np.repeat(self.rng.choice(bits, steps)[:, None], 2, 1).astype(np.float32)
        else:
            sim, sim_bits = np.full(steps, own, np.int32), tasks[:, 0].copy()
        return OrderedDict(x=self.x_train[pick], y=self.y_train[pick], own=np.int32(own), tasks=tasks, sim=sim,
                           sim_bits=sim_bits, weight=np.float32(len(idx)))

    # -- rounds ----------------------------------------------------------------------------------------------
    def run_round(self, r: int) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        n = len(self.learners)
        part = [k for k in range(n) if n == 1 or self.rng.random() >= cfg.dropout]
        rec = {"round": r + 1, "participants": len(part), "dropped": n - len(part),
               "lr": cfg.lr * float(self.lr_scale(int(self.state["round"])))}
        if part:
            data = [self._data(k) for k in part]
            self.state, states, m = self.process.next(self.state, [self.client_states[k] for k in part], data)
            for k, st in zip(part, states):
                self.client_states[k] = st
            steps = max(float(m["steps"]), 1.0)
            rec.update(exit_loss=float(m["exit_loss"]) / steps,
                       server_ce=float(m["server_ce"]) / steps if self.alg.split else None,
                       contrastive=float(m["contrastive"]) / steps if self.alg.contrastive else None,
                       rejected_updates=int(m["rejected"]))
            if not all(np.all(np.isfinite(v)) for v in self.state["bank"].values()):
                raise TfbitmetaError("the aggregated bank is not finite (a bug: non-finite updates must be rejected)")
        rec["seconds"] = time.perf_counter() - t0
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

    # -- what each client deploys ----------------------------------------------------------------------------
    def deployed_weights(self, k: int, personal: bool = True) -> tuple[dict, dict]:
        """(bank, head) client k deploys: what it keeps of its own model when it receives the aggregate (the
        shared bank for HARMONY and FedAvg, SplitGP's lambda-mix, its own for local; the pooled learner's for
        the centralized bound).  With ``finetune_head`` the head is the personal one fine-tuned from it
        (``personal=False``: the head received)."""
        st = self.client_states[self.learner_of(k)]
        own = lambda tree: {n: np.asarray(v) for n, v in tree.items()}  # noqa: E731
        bank = own(mix(st["bank"], self.state["bank"], self.alg.lam_bank if not self.alg.centralized else 1.0))
        head = own(mix(st["head"], self.state["head"], self.alg.lam_head if not self.alg.centralized else 1.0))
        if personal and self.alg.finetune_head and not self.alg.centralized and self.cfg.finetune_steps:
            head = self.personal_head(k, bank, head)
        return bank, head

    def personal_head(self, k: int, bank: dict, head: dict) -> dict:
        """Client k's exit head fine-tuned at deployment on its own training data (``finetune_steps`` steps from
        the shared head, bank frozen; docs/harmony.md), computed once per trained state."""
        from tfbitmeta.federated.personalize import fine_tune_head

        key = (k, int(self.state["round"]))
        cache = self.__dict__.setdefault("_personal_heads", {})
        if key not in cache:
            tr = self.parts[k].train
            own = np.array([self.client_bits[k]] * 2, np.float32)
            cands = [np.array([b, b], np.float32) for b in self.bit_choices]
            cache[key] = fine_tune_head(self.space, self.client_arch[k], bank, head, self.x_train[tr],
                                        self.y_train[tr], own, cands, self.cfg.finetune_steps, self.cfg.lr,
                                        self.cfg.batch_size, self.cfg.seed + 77 + k)
        return cache[key]

    def learner_of(self, k: int) -> int:
        """The learner whose trained weights client k deploys (the pooled one for the centralized bound)."""
        return 0 if self.alg.centralized else k

    def calibration_images(self, k: int) -> list[np.ndarray]:
        """Up to ``calib_images`` training images of the learner client k deploys, in batches: its own shard, or
        the pooled training set for the centralized bound (its BatchNorm must see every class it is tested on)."""
        idx = self.learners[self.learner_of(k)].train
        idx = np.random.default_rng([self.cfg.seed, 99, self.learner_of(k)]).permutation(idx)[:self.cfg.calib_images]
        x = self.x_train[idx]
        return [x[i:i + 256] for i in range(0, len(x), 256)]

    def finalize(self, out: Path) -> None:
        """Per-client front ends with calibrated BatchNorm, the server backend calibrated on every client's
        features; checkpoints into ``out``."""
        sp = self.space
        server_feats = []
        for k in range(self.cfg.clients):
            i = self.client_arch[k]
            bm = sp.client_model(i, *self.deployed_weights(k))
            images = self.calibration_images(k)
            calibrate_batchnorm(sp.fronts[i], images, self.candidates.diagonal)
            b = _bits(self.client_bits[k])
            server_feats += [sp.fronts[i]([x, np.tile(b, (len(x), 1))], training=False)["features"].numpy() for x in images]
            save_weights(bm.keras, out / "clients" / f"client{k}", int(self.state["round"]))
        sbm = sp.server_bitmodel(self.state["server"])
        rng = np.random.default_rng([self.cfg.seed, 7])
        pooled = np.concatenate(server_feats)[rng.permutation(sum(len(f) for f in server_feats))]
        calibrate_batchnorm(sbm.backend(SERVER.split), [pooled[i:i + 256] for i in range(0, len(pooled), 256)],
                            [(FP, FP)])
        save_weights(sbm.keras, out / "server", int(self.state["round"]))

    def write_run(self, out: Path, status: dict) -> None:
        sp = self.space
        clients = [{"client": k, "architecture": self.archs[self.client_arch[k]].name,
                    "split": self.archs[self.client_arch[k]].split, "bits": self.client_bits[k],
                    "id_classes": [int(c) for c in self.parts[k].id_classes],
                    "train_examples": int(len(self.parts[k].train)), "router": self.router_spec(k),
                    "model": sp.configs[self.client_arch[k]].to_dict()} for k in range(self.cfg.clients)]
        d = self.data
        RunDir(out).write_raw({
            "version": RUN_VERSION, "kind": "federated", "config": asdict(self.cfg), "algorithm": self.alg.to_dict(),
            "normalization": self.norm.to_dict(), "threshold": self.cfg.threshold,
            "dataset": {"name": d.name, "class_names": self.class_names, "seed": self.cfg.seed,
                        "train": len(d.x_train), "val": len(d.x_val), "test": len(d.x_test)},
            "candidate_bits": self.bit_choices, "feature_shape": list(sp.feature_shape), "clients": clients,
            "server": {"model": sp.server_config.to_dict(), "split": SERVER.split}, "status": status})


# -- evaluation of a finished run (from its checkpoints: what convert exports) ---------------------------------
class Deployed:
    """A federated run's deployable models, loaded from the run directory: per client its front end (exit
    probabilities and features at its bitwidth) and the server backend.  What issue-13-style analyses read."""

    def __init__(self, run_path: Path, space: ModelSpace | None = None):
        """``space``: the simulation's models, restored from the checkpoints instead of rebuilt."""
        self.run = RunDir(run_path)
        self.meta = self.run.read_meta()
        if self.meta.get("kind") != "federated":
            raise TfbitmetaError(f"{run_path} is not a federated run (kind {self.meta.get('kind')!r})")
        self.norm = Normalization.from_dict(self.meta["normalization"])
        self.space, self._models = space, {}
        from tfbitmeta.models import ModelConfig

        if space is not None:
            self.server_bm = space.server_bm
            restore_weights(self.server_bm.keras, self.run.path / "server")
        else:
            self.server_bm = self.run.load_model("server", ModelConfig.from_dict(self.meta["server"]["model"]))
        self.backend = self.server_bm.backend(self.meta["server"]["split"])

    def client(self, k: int):
        from tfbitmeta.models import ModelConfig

        c = self.meta["clients"][k]
        if self.space is not None:
            bm = self.space.models[[a.name for a in self.space.archs].index(c["architecture"])]
        else:
            bm = build(ModelConfig.from_dict(c["model"]))
        restore_weights(bm.keras, self.run.path / "clients" / f"client{k}")
        return bm

    def front_outputs(self, k: int, x: np.ndarray, bits: int | None = None, batch: int = 500):
        """(exit probabilities, features) of client k on normalized images ``x`` at its bitwidth (or ``bits``)."""
        c = self.meta["clients"][k]
        bm = self._models.get(k) or self.client(k)
        self._models = {k: bm}  # one client's weights loaded at a time
        fe = bm.front_end(c["split"])
        b = _bits(bits or c["bits"])
        probs, feats = [], []
        for i in range(0, len(x), batch):
            out = fe([x[i:i + batch], np.tile(b, (len(x[i:i + batch]), 1))], training=False)
            probs.append(tf.nn.softmax(out["exit"]).numpy())
            feats.append(out["features"].numpy())
        return np.concatenate(probs), np.concatenate(feats)

    def server_probs(self, feats: np.ndarray, batch: int = 500) -> np.ndarray:
        b = _bits(FP)
        return np.concatenate([tf.nn.softmax(self.backend([feats[i:i + batch], np.tile(b, (len(feats[i:i + batch]), 1))],
                                                          training=False)).numpy() for i in range(0, len(feats), batch)])

    def router(self, k: int, data) -> routing.ClientRouter | None:
        """Client k's calibrated router as ``convert`` builds it (:class:`routing.ClientRouter` from the run's
        ``clients[k].router``: fitted on its training images, threshold on its validation ID images of the
        dataset ``data``), here on the Keras front end's outputs.  None when the run has no calibrated router."""
        spec = self.meta["clients"][k].get("router")
        if not spec:
            return None
        val, fit = (np.asarray(spec[key], np.int64) for key in ("validation", "fit"))
        outputs = [dict(zip(("exit_probs", "features"), self.front_outputs(k, self.norm.apply(data.x_train[i]).numpy())))
                   for i in (val, fit)]
        return routing.ClientRouter.calibrate(routing.deployable(spec["score"]), spec["keep_local"], outputs[0],
                                              outputs[1], data.y_train[fit])


def predictions(deployed: Deployed, x_test: np.ndarray, data=None) -> dict:
    """Exit and server probabilities of every client on every (normalized) test image; with the dataset ``data``,
    also each calibrated router's scores of the test images and its threshold (NaN: the client has no router)."""
    n = len(deployed.meta["clients"])
    exit_p, server_p = [], []
    route_scores, thresholds = np.full((n, len(x_test)), np.nan), np.full(n, np.nan)
    for k in range(n):
        p, f = deployed.front_outputs(k, x_test)
        exit_p.append(p)
        server_p.append(deployed.server_probs(f))
        router = deployed.router(k, data) if data is not None else None
        if router is not None:
            route_scores[k], thresholds[k] = router.scores({"exit_probs": p, "features": f}), router.threshold
    out = {"exit_probs": np.stack(exit_p), "server_probs": np.stack(server_p)}
    if np.isfinite(thresholds).any():
        out.update(route_scores=route_scores, route_thresholds=thresholds)
    return out


def model_flops(model: tf.keras.Model) -> float:
    """FLOPs of a ``[x, bits]`` Keras model for one input, from the TF profiler (front end: extractor + exit
    head; backend: features to logits)."""
    from tensorflow.python.profiler import model_analyzer, option_builder

    fn = tf.function(lambda x, b: model([x, b], training=False)).get_concrete_function(
        tf.TensorSpec([1, *model.inputs[0].shape[1:]], tf.float32), tf.TensorSpec([1, 2], tf.float32))
    opts = option_builder.ProfileOptionBuilder(option_builder.ProfileOptionBuilder.float_operation()) \
        .with_empty_output().build()
    return float(model_analyzer.profile(fn.graph, options=opts).total_float_ops)


def evaluate_predictions(meta: dict, preds: dict, y_test: np.ndarray, threshold: float | None = None,
                         latency: LatencyModel | None = None, flops: dict | None = None) -> dict:
    """The per-client table: accuracy without (p=0) and with OOD test samples, offload ratio, modelled latency.

    A client offloads what its calibrated router sends away (``preds["route_scores"]`` below its threshold: what
    the exported front end and the device do); a client without one, or every client when ``threshold`` is
    given, offloads when the exit head's max-softmax is below ``threshold`` (default: the run's)."""
    latency = latency or LatencyModel()
    thr = meta["threshold"] if threshold is None else threshold
    feat_elems = int(np.prod(meta["feature_shape"]))
    flops = flops or {}
    clients, table = [], {}
    for c in meta["clients"]:
        k = c["client"]
        ep, sp = preds["exit_probs"][k], preds["server_probs"][k]
        routed = threshold is None and "route_thresholds" in preds and np.isfinite(preds["route_thresholds"][k])
        row = {key: c[key] for key in ("client", "architecture", "bits", "id_classes", "train_examples")}
        row["route"] = ({"score": routing.deployable(c["router"]["score"]), "keep_local": c["router"]["keep_local"],
                         "threshold": float(preds["route_thresholds"][k])}
                        if routed else {"score": "max_softmax", "threshold": float(thr)})
        for p in OOD_FRACTIONS:
            idx, is_ood = partition.test_indices(y_test, np.array(c["id_classes"]), p, meta["config"]["seed"] + k)
            y, e, s = y_test[idx], ep[idx].argmax(-1), sp[idx].argmax(-1)
            if not meta["algorithm"]["split"]:
                off = np.zeros(len(idx), bool)
            elif routed:
                off = preds["route_scores"][k][idx] < preds["route_thresholds"][k]
            else:
                off = ep[idx].max(-1) < thr
            pred = np.where(off, s, e)
            row[f"p{p:g}"] = {
                "accuracy": float(np.mean(pred == y)), "offload_ratio": float(np.mean(off)),
                "exit_accuracy": float(np.mean(e == y)),
                "server_accuracy": float(np.mean(s == y)) if meta["algorithm"]["split"] else None,
                "ood_accuracy": float(np.mean(pred[is_ood] == y[is_ood])) if is_ood.any() else None,
                "latency_ms": latency.mean_ms(k, flops.get(c["architecture"], 0.0), float(np.mean(off)), feat_elems,
                                              c["bits"], flops.get("server", 0.0)),
                "samples": int(len(idx))}
        clients.append(row)
    for p in OOD_FRACTIONS:
        key = f"p{p:g}"
        table[key] = {m: (None if clients[0][key][m] is None else float(np.mean([r[key][m] for r in clients])))
                      for m in ("accuracy", "offload_ratio", "exit_accuracy", "server_accuracy", "latency_ms")}
    return {"clients": clients, "mean": table, "latency_model": latency.describe(), "threshold": thr}


def evaluate_run(run_path: Path, threshold: float | None = None, write: bool = True,
                 space: ModelSpace | None = None) -> dict:
    """Evaluate a finished federated run from its checkpoints (``tfbitmeta evaluate RUN``): each client routes
    with its calibrated router (as exported), or on max-softmax at ``threshold`` when one is given."""
    dep = Deployed(run_path, space)
    meta = dep.meta
    data = datasets.load(meta["config"]["dataset"], seed=meta["config"]["seed"])
    preds = predictions(dep, dep.norm.apply(data.x_test).numpy(), data)
    flops = {"server": model_flops(dep.backend)}
    for c in meta["clients"]:
        if c["architecture"] not in flops:
            flops[c["architecture"]] = model_flops(dep.client(c["client"]).front_end(c["split"]))
    results = evaluate_predictions(meta, preds, data.y_test.astype(np.int32), threshold, flops=flops)
    if write:  # probabilities as float16; router scores (large negative distances) and thresholds at full width
        np.savez_compressed(dep.run.path / "predictions.npz",
                            **{k: v.astype(np.float16) if k.endswith("_probs") else v for k, v in preds.items()})
    return results


def simulate(cfg: SimConfig, out: Path | None, progress: bool = True) -> tuple[Simulation, dict]:
    """Run the rounds, deploy (calibrate, checkpoint) and evaluate; write the run directory ``out`` (a temporary
    one when None)."""
    import tempfile

    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="tfbitmeta-sim-")
        out = Path(tmp.name)
    out = check_writable(Path(out))
    sim = Simulation(cfg, progress=progress)
    try:
        t0 = time.perf_counter()
        sim.run()
        seconds = time.perf_counter() - t0
    finally:
        sim.process.close()
    sim.write_run(out, {"state": "deploying", "rounds": cfg.rounds})
    sim.finalize(out)
    results = evaluate_run(out, write=True, space=sim.space)
    results.update(train_seconds=seconds, round_seconds=[h["seconds"] for h in sim.history])
    sim.write_run(out, {"state": "done", "rounds": cfg.rounds, "train_seconds": round(seconds, 2)})
    (out / "results.json").write_text(json.dumps({"config": asdict(cfg), "algorithm": sim.alg.to_dict(),
                                                  "rounds": sim.history, **results}, indent=2))
    plot(results, sim.history, out / "results.png", cfg.algorithm)
    results["predictions"] = dict(np.load(out / "predictions.npz"))
    if tmp is not None:
        tmp.cleanup()
    return sim, results


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
    axes[1].plot([h["round"] for h in history], [h.get("exit_loss") for h in history], label="client exit CE")
    if history and history[0].get("server_ce") is not None:
        axes[1].plot([h["round"] for h in history], [h["server_ce"] for h in history], label="server CE")
    if history and history[0].get("contrastive") is not None:
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
    """Per-client and mean accuracy without (p=0) and with OOD samples, offload ratio, modelled latency and the
    rule that decided the offload (the client's calibrated router, or max-softmax at a threshold)."""
    head = f"{'client':>6} {'arch':<20} {'bits':>4} {'ID classes':<12} {'acc p=0':>8} {'p=0.5':>7} {'p=1':>7} " \
           f"{'offload p=1':>11} {'latency p=1':>11}  routing"
    lines = [head]

    def row(name, arch, bits, ids, m, route=""):
        return (f"{name:>6} {arch:<20} {bits:>4} {ids:<12} {100 * m['p0']['accuracy']:>7.1f}% "
                f"{100 * m['p0.5']['accuracy']:>6.1f}% {100 * m['p1']['accuracy']:>6.1f}% "
                f"{100 * m['p1']['offload_ratio']:>10.1f}% {m['p1']['latency_ms']:>9.1f}ms  {route}").rstrip()

    def rule(r):
        if r["score"] == "max_softmax" and "keep_local" not in r:
            return f"max-softmax < {r['threshold']:.2f}"
        return f"{r['score'].replace('_', '-')} router (keep {100 * r['keep_local']:.0f}% local)"
    for c in results["clients"]:
        lines.append(row(c["client"], c["architecture"], str(c["bits"]), ",".join(map(str, c["id_classes"])), c,
                         rule(c["route"]) if "route" in c else ""))
    lines.append(row("mean", "", "", "", results["mean"]))
    return "\n".join(lines)
