"""Few-shot MEBQAT on Omniglot: joint bitwidth and class adaptation (mebqat-spec §1.5, §1.6, §3).

Methods (``tfbitmeta train --method ...``):

* ``mebqat-maml``  -- FOMAML; every episode of the meta-batch draws its own (w, a) from the candidates.
* ``mebqat-proto`` -- ProtoNet; one episode per step shared by T configurations, losses averaged.
* ``fomaml``       -- FOMAML at one fixed bitwidth: ``--bits 4`` is the QAT+FOMAML baseline, ``--bits fp`` vanilla MAML.
* ``protonet``     -- ProtoNet at one fixed bitwidth: QAT+ProtoNet, or vanilla ProtoNet with ``--bits fp``.

Every model is built with the full few-shot candidate space (w in {2..8,16}, a in {2..8,16,fp}, plus (fp,fp):
73 configurations) so any of them can be evaluated at every bitwidth; the method decides what is trained.
The step loop is :class:`tfbitmeta.meta.loop.TrainingLoop` (checkpoints, resume, validation, best weights);
one few-shot "epoch" is ``steps_per_epoch`` (100) optimizer steps, after which validation episodes of unseen
(validation-alphabet) classes select the best weights.  Optimizer: Adam (mebqat-spec §1.3), no lr decay.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfbitmeta.data.episodes import EpisodeSampler, Setting
from tfbitmeta.data.omniglot import load_omniglot
from tfbitmeta.data.pipeline import Normalization
from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.meta.loop import FitResult, TrainingLoop, checkpoint_bytes
from tfbitmeta.meta.maml import FOMAML
from tfbitmeta.meta.protonet import ProtoNet
from tfbitmeta.runs import RunDir, TrainConfig, open_training_run, restore_weights, save_weights
from tfbitmeta.models import BitModel, ModelConfig, build
from tfbitmeta.quant.bitwidth import FP, BitSpace, Config, config_name, parse_bit

FEWSHOT_BITS = (2, 3, 4, 5, 6, 7, 8, 16, FP)
"""Per-tensor candidates of the few-shot experiments (no 1-bit): 73 valid (w, a) configurations."""

METHODS = {"mebqat-maml": "maml", "mebqat-proto": "protonet", "fomaml": "maml", "protonet": "protonet"}
ADAPTIVE_METHODS = ("mebqat-maml", "mebqat-proto")
SEED_OFFSETS = {"train": 0, "val": 10_000, "test": 20_000}  # episode streams per split are independent


@dataclasses.dataclass
class FewShotConfig:
    method: str = "mebqat-proto"
    data_dir: str = "../shared/data/omniglot"
    ways: int = 5
    shots: int = 1
    queries: int = 15  # per class, training episodes (the reference's ProtoNet uses 5 on Omniglot, MAML 15)
    meta_batch: int = 4  # episodes per MAML step
    num_tasks: int = 4  # bitwidth configurations per ProtoNet step (mebqat-proto)
    inner_steps: int = 5
    inner_lr: float = 0.1
    eval_inner_steps: int = 5
    train_bits: tuple[int, ...] = FEWSHOT_BITS  # candidates of mebqat-*, or the one bitwidth of a baseline
    val_episodes: int = 20
    eval_episodes: int = 100
    steps_per_epoch: int = 100

    @property
    def kind(self) -> str:
        return METHODS[self.method]

    @property
    def adaptive(self) -> bool:
        return self.method in ADAPTIVE_METHODS

    @property
    def setting(self) -> Setting:
        return Setting(self.ways, self.shots, self.queries)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train_bits"] = list(self.train_bits)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FewShotConfig":
        d = dict(d)
        d["train_bits"] = tuple(d["train_bits"])
        return cls(**d)


def parse_train_bits(method: str, spec: str) -> tuple[int, ...]:
    if method not in METHODS:
        raise TfbitmetaError(f"unknown few-shot method {method!r}; choose from {', '.join(METHODS)}")
    tokens = [t for t in spec.split(",") if t.strip()]
    if len(tokens) == 1 and tokens[0].strip().lower() == "all":
        bits = FEWSHOT_BITS
    else:
        bits = tuple(sorted({parse_bit(t) for t in tokens}))
    if method in ADAPTIVE_METHODS and len(bits) < 2:
        raise TfbitmetaError(f"{method} adapts across bitwidths: give several candidates (default: all)")
    if method not in ADAPTIVE_METHODS and len(bits) != 1:
        raise TfbitmetaError(f"{method} trains at one bitwidth: pass one value, e.g. --bits 4 (QAT baseline) or "
                             f"--bits fp (vanilla)")
    return bits


def model_space(train_bits) -> BitSpace:
    return BitSpace(tuple(sorted(set(FEWSHOT_BITS) | set(train_bits))))


class TaskSampler:
    """The bitwidth configuration(s) of each step: uniform over the valid pairs of the candidates, or fixed."""

    def __init__(self, fcfg: FewShotConfig, seed: int):
        self.seed = seed
        self.n = fcfg.meta_batch if fcfg.kind == "maml" else (fcfg.num_tasks if fcfg.adaptive else 1)
        self.configs = BitSpace(fcfg.train_bits).configs if fcfg.adaptive else [(fcfg.train_bits[0],) * 2]

    def tasks(self, step: int) -> np.ndarray:
        if len(self.configs) == 1:
            return np.asarray(self.configs * self.n, np.float32)
        rng = np.random.default_rng([self.seed, step, 2])
        return np.asarray([self.configs[i] for i in rng.integers(0, len(self.configs), self.n)], np.float32)

    @property
    def eval_configs(self) -> list[Config]:
        """Validation configurations: 2, 4, 8 bit and fp for adaptive methods, else the trained one."""
        if len(self.configs) == 1:
            return list(self.configs)
        return [c for c in ((2, 2), (4, 4), (8, 8), (FP, FP)) if c in self.configs] or self.configs[:1]


def make_algorithm(bm: BitModel, fcfg: FewShotConfig, optimizer=None, clip: float = 10.0):
    if fcfg.kind == "maml":
        return FOMAML(bm.keras, optimizer, fcfg.inner_lr, fcfg.inner_steps, clip)
    return ProtoNet(bm.keras, optimizer, clip)


def episode_arrays(ep, norm: Normalization):
    """Normalized (support, query) float tensors of an episode."""
    return norm.apply(ep.support), norm.apply(ep.query)


class FewShotTrainer:
    def __init__(self, run: RunDir, bm: BitModel, fcfg: FewShotConfig, tcfg: TrainConfig, data, norm: Normalization,
                 progress: bool = True):
        self.run, self.bm, self.fcfg, self.tcfg, self.data, self.norm = run, bm, fcfg, tcfg, data, norm
        self.model = bm.keras
        self.total_steps = tcfg.steps if tcfg.steps else tcfg.epochs * fcfg.steps_per_epoch
        if self.total_steps <= 0:
            raise TfbitmetaError("nothing to train: --epochs and --steps must be positive")
        self.optimizer = tf.keras.optimizers.Adam(learning_rate=tcfg.lr)
        self.algo = make_algorithm(bm, fcfg, self.optimizer, tcfg.clip)
        train_vars = self.algo.outer_vars if fcfg.kind == "maml" else self.algo.variables
        self.optimizer.build(train_vars)
        self.sampler = TaskSampler(fcfg, tcfg.seed)
        self.train_episodes = EpisodeSampler(data.train.images, fcfg.setting, tcfg.seed + SEED_OFFSETS["train"], "train")
        drawers = int(data.val.images.shape[1])
        val_setting = Setting(min(fcfg.ways, data.val.num_classes), fcfg.shots, max(1, min(15, drawers - fcfg.shots)))
        self.val_episodes = EpisodeSampler(data.val.images, val_setting, tcfg.seed + SEED_OFFSETS["val"], "validation")
        self.loop = TrainingLoop(run, self.model, self.optimizer, self.total_steps,
                                 min(fcfg.steps_per_epoch, self.total_steps), tcfg.ckpt_every, tcfg.patience,
                                 self.sampler.n, fcfg.method, progress)
        self._val_cache = None

    def _inputs(self, step: int):
        s = self.fcfg.setting
        if self.fcfg.kind == "maml":
            eps = [self.train_episodes.episode(step * self.sampler.n + b) for b in range(self.sampler.n)]
            xs = tf.stack([self.norm.apply(e.support) for e in eps])
            xq = tf.stack([self.norm.apply(e.query) for e in eps])
            ys = tf.constant(np.stack([e.support_labels for e in eps]))
            yq = tf.constant(np.stack([e.query_labels for e in eps]))
            return xs, ys, xq, yq
        e = self.train_episodes.episode(step)
        assert e.support.shape[0] == s.ways * s.shots
        return self.norm.apply(np.concatenate([e.support, e.query]))

    def fit(self, resume: bool = False) -> FitResult:
        spe = self.loop.spe
        s = self.fcfg.setting

        def batches(epoch, offset):
            for step in range(epoch * spe + offset, min((epoch + 1) * spe, self.total_steps)):
                yield step, self._inputs(step)

        def step_fn(step, inputs):
            _, data = inputs
            cfgs = self.sampler.tasks(step)
            if self.fcfg.kind == "maml":
                losses, acc = self.algo.train_step(*data, tf.constant(cfgs))
            else:
                losses, acc = self.algo.train_step(data, tf.constant(cfgs), s.ways, s.shots, s.queries)
            return losses.numpy(), {"acc": f"{float(acc):.2f}"}, {"train/query_acc": float(acc)}

        return self.loop.run_steps(batches, step_fn, self.validate, resume)

    def validate(self) -> dict[str, float]:
        """Mean accuracy over the validation episodes (unseen classes) per validation configuration."""
        if self._val_cache is None:
            eps = [self.val_episodes.episode(i) for i in range(self.fcfg.val_episodes)]
            self._val_cache = [(episode_arrays(e, self.norm), e) for e in eps]
        s = self.val_episodes.setting
        out = {}
        for cfg in self.sampler.eval_configs:
            accs = [episode_accuracy(self.algo, xs, xq, e, cfg, s, self.fcfg.eval_inner_steps)
                    for (xs, xq), e in self._val_cache]
            out[config_name(cfg)] = float(np.mean(accs))
        return out

    def finalize(self) -> None:
        restore_weights(self.model, self.run.path / "best")
        save_weights(self.model, self.run.path / "model", int(self.loop.step.numpy()))


def episode_accuracy(algo, xs, xq, ep, cfg: Config, setting: Setting, inner_steps: int) -> float:
    cfg = (float(cfg[0]), float(cfg[1]))
    if algo.kind == "maml":
        return algo.evaluate_episode(xs, tf.constant(ep.support_labels), xq, tf.constant(ep.query_labels), cfg,
                                     inner_steps)
    return algo.evaluate_episode(tf.concat([xs, xq], 0), cfg, setting.ways, setting.shots, setting.queries)


def prepare(out: Path, tcfg: TrainConfig, fcfg: FewShotConfig, width: float = 2.0, scheme: str = "exact",
            first_last=None, resume: bool = False, progress: bool = True) -> FewShotTrainer:
    from tfbitmeta.meta.train import set_determinism

    run, meta = open_training_run(out, resume)
    if resume and "fewshot" not in meta:
        raise TfbitmetaError(f"{out} is not a few-shot run")
    if resume:
        tcfg = TrainConfig.from_dict(meta["train"])
        fcfg = FewShotConfig.from_dict(meta["fewshot"])
        mcfg = ModelConfig.from_dict(meta["model"])
        norm = Normalization.from_dict(meta["normalization"])
    set_determinism(tcfg.seed)
    data = load_omniglot(fcfg.data_dir, seed=tcfg.seed)
    if fcfg.ways > data.train.num_classes:
        raise TfbitmetaError(f"{fcfg.ways}-way training needs {fcfg.ways} classes; train has {data.train.num_classes}")
    if not resume:
        fcfg = dataclasses.replace(fcfg, data_dir=str(Path(fcfg.data_dir).resolve()))
        x = data.train.images.reshape(-1, *data.train.images.shape[2:])
        norm = Normalization.fit(x)
        first_last = first_last if first_last is not None else ("fp" if scheme == "dorefa" else 8)
        mcfg = ModelConfig(family="conv4", input_shape=norm.model_input_shape(1),
                           num_classes=fcfg.ways if fcfg.kind == "maml" else 0, width=width, scheme=scheme,
                           first_last=first_last, bn_mode="calibrated", candidates=model_space(fcfg.train_bits))
    bm = build(mcfg)
    if not resume:
        run.write_meta(mcfg, norm, tcfg, data.describe(), {"state": "training"}, extra={"fewshot": fcfg.to_dict()})
    return FewShotTrainer(run, bm, fcfg, tcfg, data, norm, progress)


def train(out: Path, tcfg: TrainConfig, fcfg: FewShotConfig, width: float = 2.0, scheme: str = "exact",
          first_last=None, resume: bool = False, progress: bool = True) -> dict:
    from tfbitmeta.meta.fewshot_eval import evaluate_run

    trainer = prepare(out, tcfg, fcfg, width, scheme, first_last, resume, progress)
    fit = trainer.fit(resume=resume)
    trainer.finalize()
    trainer.run.update_status(state="done", steps=fit.steps, backward_passes=fit.backward_passes,
                              train_seconds=round(fit.seconds, 2), best_val=fit.best_val,
                              checkpoint_bytes=checkpoint_bytes(trainer.run.path / "model"))
    result = evaluate_run(trainer.run.path, "all", trainer.fcfg.eval_episodes, None, progress=progress)
    result["history"] = fit.history
    result["fit"] = dataclasses.asdict(fit)
    return result
