"""The one training-loop core shared by every trainer (mebqat, anyprec, dedicated, and the few-shot trainers
of :mod:`tfbitmeta.meta.fewshot`, which reuse :class:`TrainingLoop`).

Per optimizer step the method hands over T bitwidth configurations (a ``(T, 2)`` tensor, so no retrace).
Task 0 runs first; when the method distills, task 0 is full precision and its stop-gradient softmax is the
teacher of every quantized task (CE + soft-CE, weight 1:1).  Gradients are averaged over the T tasks,
clipped element-wise to ±clip and applied with AdamW (lr decayed x0.1 at 50/75/90 % of the steps).

Deviation from the reference, on purpose: the teacher output is the FP task's own forward pass instead of
one extra FP forward per quantized task (the only difference is the dropout mask); it saves T-1 forwards.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from tfbitmeta.data.datasets import Splits
from tfbitmeta.data.pipeline import Normalization, eval_batches, train_batches
from tfbitmeta.errors import BadArgument, DataMissing
from tfbitmeta.meta.evaluate import Predictor
from tfbitmeta.meta.methods import Method
from tfbitmeta.runs import RunDir, TrainConfig, restore_weights, save_weights
from tfbitmeta.models import BitModel
from tfbitmeta.quant.bitwidth import FP, config_name
from tfbitmeta.quant.calibration import calibrate_batchnorm


def lr_schedule(lr: float, total_steps: int):
    bounds = sorted({max(1, int(total_steps * f)) for f in (0.5, 0.75, 0.9)})
    return tf.keras.optimizers.schedules.PiecewiseConstantDecay(bounds, [lr * 0.1**i for i in range(len(bounds) + 1)])


def exit_distillation(final_logits, exit_logits):
    """Mean KL(final || exit) of an early exit to its own model's final head, the teacher behind a stop-gradient
    (so the term trains the exit head and the extractor under it, never the backend or the final head).  The soft
    cross-entropy minus the teacher's entropy: same gradient, and 0 when the exit matches the final head."""
    final = tf.stop_gradient(tf.nn.softmax(final_logits))
    return tf.reduce_mean(tf.reduce_sum(tf.math.xlogy(final, final) - final * tf.nn.log_softmax(exit_logits), -1))


def make_train_step(model: tf.keras.Model, optimizer, distill: bool, exit_weight: float, clip: float, image_shape,
                    exit_distill: float = 0.0):
    """``exit_distill``: weight of each early-exit head's KL divergence to the stop-gradient softmax of the
    final head of the same task (self-distillation: the exit learns where the full model is confident, so its
    confidence is a better early-exit signal; docs/export.md, "Early exits")."""
    variables = model.trainable_variables
    heads = list(model.output.keys())  # "logits" and "exitN"
    weights = {k: (1.0 if k == "logits" else exit_weight) for k in heads}
    ce = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def task_loss(x, y, cfg, teacher):
        bits = tf.tile(cfg[None], [tf.shape(x)[0], 1])
        out = model([x, bits], training=True)
        loss = 0.0
        quantized = tf.cast(cfg[0] < FP, tf.float32) if teacher is not None else 0.0
        for k, w in weights.items():
            task = ce(y, out[k])
            if teacher is not None:
                soft = -tf.reduce_mean(tf.reduce_sum(teacher[k] * tf.nn.log_softmax(out[k]), axis=-1))
                task = task + quantized * soft
            if k != "logits" and exit_distill:
                task = task + exit_distill * exit_distillation(out["logits"], out[k])
            loss = loss + w * task
        return loss, out

    @tf.function(input_signature=[tf.TensorSpec([None, *image_shape], tf.float32), tf.TensorSpec([None], tf.int32),
                                  tf.TensorSpec([None, 2], tf.float32)])
    def train_step(x, y, tasks):
        n = tf.shape(tasks)[0]
        with tf.GradientTape() as tape:
            loss0, out0 = task_loss(x, y, tasks[0], None)
        acc = tape.gradient(loss0, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        teacher = {k: tf.stop_gradient(tf.nn.softmax(v)) for k, v in out0.items()} if distill else None
        losses = tf.TensorArray(tf.float32, size=n).write(0, loss0)
        for t in tf.range(1, n):
            with tf.GradientTape() as tape:
                loss_t, _ = task_loss(x, y, tasks[t], teacher)
            grads = tape.gradient(loss_t, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            acc = [a + g for a, g in zip(acc, grads)]
            losses = losses.write(t, loss_t)
        nf = tf.cast(n, tf.float32)
        optimizer.apply_gradients(zip([tf.clip_by_value(a / nf, -clip, clip) for a in acc], variables))
        correct = tf.reduce_mean(tf.cast(tf.argmax(out0["logits"], -1, tf.int32) == y, tf.float32))
        return losses.stack(), correct

    return train_step


@dataclasses.dataclass
class FitResult:
    steps: int
    backward_passes: int
    seconds: float
    best_val: float
    history: list


class TrainingLoop:
    """The step loop every trainer runs: progress bar, TensorBoard, validation every ``steps_per_epoch`` steps
    with the best weights saved to ``best/``, checkpoints every ``ckpt_every`` steps, bit-exact resume and
    early stopping.  What a step does and what data it gets come from the trainer (``run``'s callbacks)."""

    def __init__(self, run: RunDir, model: tf.keras.Model, optimizer, total_steps: int, steps_per_epoch: int,
                 ckpt_every: int, patience: int | None, tasks_per_step: int, desc: str, progress: bool = True):
        self.run, self.model, self.optimizer = run, model, optimizer
        self.total_steps, self.spe, self.ckpt_every, self.patience = total_steps, steps_per_epoch, ckpt_every, patience
        self.tasks_per_step, self.desc, self.progress = tasks_per_step, desc, progress
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.best = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="best_val")
        self.bad_epochs = tf.Variable(0, dtype=tf.int64, trainable=False, name="bad_epochs")
        self.ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=self.step, best=self.best,
                                        bad_epochs=self.bad_epochs)
        self.manager = tf.train.CheckpointManager(self.ckpt, str(run.path / "ckpt"), max_to_keep=2)

    def restore(self) -> int:
        if self.manager.latest_checkpoint is None:
            raise DataMissing(f"no checkpoint to resume from in {self.run.path / 'ckpt'}", param="resume")
        restore_weights(self.model, self.run.path / "ckpt", optimizer=self.optimizer, step=self.step,
                        best=self.best, bad_epochs=self.bad_epochs)
        return int(self.step.numpy())

    def run_steps(self, batches, step_fn, validate, resume: bool = False) -> FitResult:
        """``batches(epoch, offset)`` iterates the inputs of one epoch from step ``offset`` in it;
        ``step_fn(step, inputs)`` does one optimizer step and returns ``(losses, postfix, scalars)``: the
        per-task losses, progress-bar fields and extra TensorBoard scalars; ``validate()`` returns
        ``{name: accuracy}`` whose mean selects the best weights."""
        start = self.restore() if resume else 0
        writer = tf.summary.create_file_writer(str(self.run.path / "tb"))
        history, t0 = [], time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=start, unit="step", disable=not self.progress,
                   desc=self.desc, dynamic_ncols=True)
        step = start
        stop = False
        while step < self.total_steps and not stop:
            epoch, offset = divmod(step, self.spe)
            for inputs in batches(epoch, offset):
                losses, postfix, scalars = step_fn(step, inputs)
                step += 1
                self.step.assign(step)
                losses = np.asarray(losses)
                bar.update(1)
                bar.set_postfix(loss=f"{losses.mean():.3f}", **postfix)
                if step % 10 == 0 or step == self.total_steps:
                    with writer.as_default(step=step):
                        tf.summary.scalar("train/loss", losses.mean())
                        for name, value in scalars.items():
                            tf.summary.scalar(name, value)
                end_of_epoch = step % self.spe == 0 or step == self.total_steps
                if end_of_epoch:
                    stop = self._end_epoch(step, writer, history, validate)
                if step % self.ckpt_every == 0 or end_of_epoch:
                    self.manager.save(checkpoint_number=step)
                if step >= self.total_steps or stop:
                    break
        bar.close()
        if self.manager.latest_checkpoint is None or not self.manager.latest_checkpoint.endswith(f"-{step}"):
            self.manager.save(checkpoint_number=step)
        seconds = time.perf_counter() - t0
        return FitResult(step, step * self.tasks_per_step, seconds, float(self.best.numpy()), history)

    def _end_epoch(self, step, writer, history, validate) -> bool:
        val = validate()
        score = float(np.mean(list(val.values())))
        history.append({"step": step, "val": val, "val_mean": score})
        with writer.as_default(step=step):
            for name, acc in val.items():
                tf.summary.scalar(f"val/acc_{name}", acc)
            tf.summary.scalar("val/acc_mean", score)
        writer.flush()
        if score > float(self.best.numpy()):
            self.best.assign(score)
            self.bad_epochs.assign(0)
            save_weights(self.model, self.run.path / "best", step)
        else:
            self.bad_epochs.assign_add(1)
        if self.progress:
            tqdm.write(f"step {step}: validation mean acc {100 * score:.2f}% (best {100 * float(self.best.numpy()):.2f}%)")
        return self.patience is not None and int(self.bad_epochs.numpy()) >= self.patience


class Trainer:
    """Runs one method on one model with the :class:`TrainingLoop`; checkpoints every ``ckpt_every`` steps and
    resumes bit-exactly."""

    def __init__(self, run: RunDir, bitmodel: BitModel, method: Method, splits: Splits, norm: Normalization,
                 cfg: TrainConfig, progress: bool = True):
        self.run, self.bm, self.method, self.splits, self.norm, self.cfg = run, bitmodel, method, splits, norm, cfg
        self.model = bitmodel.keras
        self.spe = len(splits.x_train) // cfg.batch_size
        if self.spe == 0:
            raise BadArgument(f"batch size {cfg.batch_size} is larger than the training set "
                              f"({len(splits.x_train)} images)", param="batch_size")
        self.total_steps = cfg.steps if cfg.steps else cfg.epochs * self.spe
        if self.total_steps <= 0:
            raise BadArgument("nothing to train: epochs and steps must be positive", param="steps")
        self.optimizer = tf.keras.optimizers.AdamW(learning_rate=lr_schedule(cfg.lr, self.total_steps),
                                                   weight_decay=cfg.weight_decay)
        self.optimizer.build(self.model.trainable_variables)
        self.loop = TrainingLoop(run, self.model, self.optimizer, self.total_steps, self.spe, cfg.ckpt_every,
                                 cfg.patience, method.num_tasks, method.name, progress)
        self.step, self.best, self.bad_epochs = self.loop.step, self.loop.best, self.loop.bad_epochs
        self.ckpt, self.manager = self.loop.ckpt, self.loop.manager
        self.train_step = make_train_step(self.model, self.optimizer, method.distill, cfg.exit_weight, cfg.clip,
                                          bitmodel.cfg.input_shape, cfg.exit_distill)
        self.val = eval_batches(splits.x_val, splits.y_val, norm)
        self.val_predictor = Predictor(self.model, "batch")

    @property
    def progress(self) -> bool:
        return self.loop.progress

    @progress.setter
    def progress(self, value: bool):
        self.loop.progress = value

    def restore(self) -> int:
        return self.loop.restore()

    def validate(self) -> dict[str, float]:
        """Validation accuracy (final head) at the method's evaluation configurations, batch-statistics BN."""
        p = self.val_predictor
        return {config_name(c): p.accuracy(self.val, c)["logits"] for c in self.method.eval_configs}

    def fit(self, resume: bool = False) -> FitResult:
        def batches(epoch, offset):
            return train_batches(self.splits.x_train, self.splits.y_train, self.norm, self.cfg.batch_size,
                                 self.cfg.seed, epoch, start_batch=offset)

        def step_fn(step, batch):
            x, y = batch
            tasks = self.method.tasks(step)
            losses, acc = self.train_step(x, y, tf.constant(tasks))
            losses = losses.numpy()
            scalars = {f"train/loss_{config_name((int(c[0]), int(c[1])))}": loss for c, loss in zip(tasks, losses)}
            return losses, {"acc0": f"{float(acc):.2f}"}, scalars

        return self.loop.run_steps(batches, step_fn, self.validate, resume)

    def finalize(self) -> None:
        """Best-on-validation weights, BN statistics calibrated per configuration, saved to ``model/``."""
        restore_weights(self.model, self.run.path / "best")
        if self.bm.cfg.bn_mode == "calibrated":
            images = calibration_images(self.splits, self.norm, self.cfg)
            calibrate_batchnorm(self.model, images, self.method.covered, progress=self.progress)
        save_weights(self.model, self.run.path / "model", int(self.step.numpy()))


def calibration_images(splits: Splits, norm: Normalization, cfg: TrainConfig, batch_size: int = 256):
    """A fixed, seeded sample of training images for BN calibration (list of batches)."""
    n = min(len(splits.x_train), cfg.calib_batches * batch_size)
    idx = np.random.default_rng([cfg.seed, 99]).permutation(len(splits.x_train))[:n]
    x = norm.apply(splits.x_train[idx])
    return [x[i:i + batch_size] for i in range(0, n, batch_size)]


def checkpoint_bytes(directory: Path) -> int:
    return int(sum(p.stat().st_size for p in Path(directory).glob("*") if p.is_file() and p.name != "checkpoint"))


__all__ = ["TrainingLoop", "Trainer", "FitResult", "make_train_step", "exit_distillation", "lr_schedule"]
