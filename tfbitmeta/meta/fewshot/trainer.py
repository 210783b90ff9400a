"""The few-shot trainer: meta-training episodes, bitwidth tasks, validation-based checkpoint selection.

The step loop is :class:`tfbitmeta.meta.loop.TrainingLoop` (checkpoints, resume, validation, best weights);
one few-shot "epoch" is ``steps_per_epoch`` (100) optimizer steps, after which validation episodes of unseen
(validation-alphabet) classes are scored at 2/4/8 bit and fp (adaptive methods) or the trained bitwidth, and the
best mean is kept as the model.  Training episodes are augmented (:mod:`tfbitmeta.data.augment`) when
``augment`` is set; validation and test episodes never are.  Optimizer: Adam (as the reference,
docs/fewshot.md), learning rate cosine-decayed to 0 over the run's steps (``lr_decay="cosine"``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfbitmeta.data.augment import AffineJitter
from tfbitmeta.data.episodes import EpisodeSampler, Setting
from tfbitmeta.data.omniglot import load_omniglot
from tfbitmeta.data.pipeline import Normalization
from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.meta.fewshot.config import (RECIPE, SEED_OFFSETS, STANDARD_SETTINGS, FewShotConfig, make_algorithm,
                                           model_space)
from tfbitmeta.meta.fewshot.evaluation import episode_accuracy, episode_arrays, evaluate_run
from tfbitmeta.meta.loop import FitResult, TrainingLoop, checkpoint_bytes
from tfbitmeta.runs import RunDir, TrainConfig, open_training_run, restore_weights, save_weights
from tfbitmeta.models import BitModel, ModelConfig, build
from tfbitmeta.quant.bitwidth import FP, BitSpace, Config, config_name

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


class FewShotTrainer:
    def __init__(self, run: RunDir, bm: BitModel, fcfg: FewShotConfig, tcfg: TrainConfig, data, norm: Normalization,
                 progress: bool = True):
        self.run, self.bm, self.fcfg, self.tcfg, self.data, self.norm = run, bm, fcfg, tcfg, data, norm
        self.model = bm.keras
        self.total_steps = tcfg.steps if tcfg.steps else tcfg.epochs * fcfg.steps_per_epoch
        if self.total_steps <= 0:
            raise TfbitmetaError("nothing to train: epochs and steps must be positive", param="steps")
        lr = tcfg.lr
        if fcfg.lr_decay == "cosine":
            lr = tf.keras.optimizers.schedules.CosineDecay(tcfg.lr, self.total_steps)
        elif fcfg.lr_decay != "none":
            raise TfbitmetaError(f"unknown lr decay {fcfg.lr_decay!r}: cosine or none")
        self.optimizer = tf.keras.optimizers.Adam(learning_rate=lr)
        self.augment = AffineJitter() if fcfg.augment else None
        self.algo = make_algorithm(bm, fcfg, self.optimizer, tcfg.clip)
        train_vars = self.algo.outer_vars if fcfg.kind == "maml" else self.algo.variables
        self.optimizer.build(train_vars)
        self.sampler = TaskSampler(fcfg, tcfg.seed)
        self.train_episodes = EpisodeSampler(data.train.images, fcfg.setting, tcfg.seed + SEED_OFFSETS["train"], "train")
        drawers = int(data.val.images.shape[1])
        val_ways = min(fcfg.val_ways, fcfg.ways) if fcfg.kind == "maml" else fcfg.val_ways  # a MAML head's N
        val_setting = Setting(min(val_ways, data.val.num_classes), fcfg.shots,
                              max(1, min(15, drawers - fcfg.shots)))
        self.val_episodes = EpisodeSampler(data.val.images, val_setting, tcfg.seed + SEED_OFFSETS["val"], "validation")
        self.loop = TrainingLoop(run, self.model, self.optimizer, self.total_steps,
                                 min(fcfg.steps_per_epoch, self.total_steps), tcfg.ckpt_every, tcfg.patience,
                                 self.sampler.n, fcfg.method, progress)
        self._val_cache = None

    def _images(self, x: np.ndarray, index: int):
        """Normalized training images, augmented by the (seed, index) draw of the handwriting jitter."""
        return self.norm.apply(self.augment(x, self.tcfg.seed, index) if self.augment else x)

    def _inputs(self, step: int):
        if self.fcfg.kind == "maml":
            xs, xq, ys, yq = [], [], [], []
            for b in range(self.sampler.n):
                i = step * self.sampler.n + b
                e = self.train_episodes.episode(i)
                x = self._images(np.concatenate([e.support, e.query]), i)
                ns = len(e.support)
                xs.append(x[:ns])
                xq.append(x[ns:])
                ys.append(e.support_labels)
                yq.append(e.query_labels)
            return tf.stack(xs), tf.constant(np.stack(ys)), tf.stack(xq), tf.constant(np.stack(yq))
        e = self.train_episodes.episode(step)
        return self._images(np.concatenate([e.support, e.query]), step)

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


def prepare(out: Path, tcfg: TrainConfig, fcfg: FewShotConfig, width: float | None = None, scheme: str = "exact",
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
        width = RECIPE[fcfg.kind].width if width is None else width
        first_last = first_last if first_last is not None else ("fp" if scheme == "dorefa" else 8)
        mcfg = ModelConfig(family="conv4", input_shape=norm.model_input_shape(1),
                           num_classes=fcfg.ways if fcfg.kind == "maml" else 0, width=width, scheme=scheme,
                           first_last=first_last, bn_mode="calibrated", candidates=model_space(fcfg.train_bits))
    bm = build(mcfg)
    if not resume:
        run.write_meta(mcfg, norm, tcfg, data.describe(), {"state": "training"}, extra={"fewshot": fcfg.to_dict()})
    return FewShotTrainer(run, bm, fcfg, tcfg, data, norm, progress)


def _after_training_settings(trainer: FewShotTrainer) -> str | None:
    """The standard settings the test split (and a MAML head) can run, else the trained setting (``None``)."""
    limit = trainer.data.test.num_classes
    if trainer.fcfg.kind == "maml":
        limit = min(limit, trainer.fcfg.ways)
    fits = [t for t in STANDARD_SETTINGS.split(",") if Setting.parse(t).ways <= limit]
    return ",".join(fits) or None


def train(out: Path, tcfg: TrainConfig, fcfg: FewShotConfig, width: float | None = None, scheme: str = "exact",
          first_last=None, resume: bool = False, progress: bool = True) -> dict:
    trainer = prepare(out, tcfg, fcfg, width, scheme, first_last, resume, progress)
    fit = trainer.fit(resume=resume)
    trainer.finalize()
    trainer.run.update_status(state="done", steps=fit.steps, backward_passes=fit.backward_passes,
                              train_seconds=round(fit.seconds, 2), best_val=fit.best_val,
                              checkpoint_bytes=checkpoint_bytes(trainer.run.path / "model"))
    result = evaluate_run(trainer.run.path, "all", trainer.fcfg.eval_episodes, _after_training_settings(trainer),
                          progress=progress)
    result["history"] = fit.history
    result["fit"] = dataclasses.asdict(fit)
    return result
