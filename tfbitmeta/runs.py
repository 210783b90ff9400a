"""A run directory: what was trained, how to rebuild it, and its checkpoints (every trainer writes one).

``run.json`` names the run's ``kind`` -- ``mebqat`` (``tfbitmeta train``), ``fewshot`` (the few-shot methods) or
``federated`` (``tfbitmeta simulate``) -- and ``convert``, ``evaluate`` and ``serve --run`` dispatch on it
(:func:`run_kind`).  A MEBQAT run:

```
OUT/run.json          kind, model config, normalization, dataset, training config, status (version 1)
OUT/ckpt/             training checkpoints (model, optimizer, step, best score) for --resume
OUT/best/             best-on-validation weights (selection never looks at test data)
OUT/model/            final weights: best weights with calibrated per-bitwidth BN statistics
OUT/results.json, OUT/accuracy_vs_bits.png, OUT/tb/ (TensorBoard)
```
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import tensorflow as tf

from tfbitmeta.data.pipeline import Normalization
from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.models import BitModel, ModelConfig, build

RUN_VERSION = 1
KINDS = ("mebqat", "fewshot", "federated")


def run_kind(meta: dict) -> str:
    """The run's kind; runs written before ``kind`` existed are few-shot when they carry a ``fewshot`` section."""
    kind = meta.get("kind") or ("fewshot" if "fewshot" in meta else "mebqat")
    if kind not in KINDS:
        raise TfbitmetaError(f"unknown run kind {kind!r} in run.json: expected one of {', '.join(KINDS)}")
    return kind


@dataclasses.dataclass
class TrainConfig:
    method: str = "mebqat"
    dataset: str = "digits"
    epochs: int = 3
    steps: int | None = None  # total optimizer steps; overrides epochs when given
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    num_tasks: int = 4
    exit_weight: float = 0.5
    exit_distill: float = 1.0  # early exits also learn the final head's softmax (meta/loop.make_train_step)
    clip: float = 10.0
    seed: int = 0
    ckpt_every: int = 100
    calib_batches: int = 10
    limit_train: int | None = None
    patience: int | None = None  # early stopping on validation score, in epochs

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d.setdefault("exit_distill", 0.0)  # runs written before the field existed trained without it
        return cls(**d)


def check_writable(out: Path) -> Path:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TfbitmetaError(f"cannot write to {out}: {e.strerror or e}", param="out") from None
    return out


def open_training_run(out: Path, resume: bool) -> tuple["RunDir", dict | None]:
    """The run directory a trainer writes to, and (with ``resume``) its metadata, read before anything is created
    in ``out``.  A new run refuses an ``out`` that already holds one."""
    meta = RunDir(out).read_meta() if resume else None
    run = RunDir(check_writable(out))
    if not resume and run.exists() and (run.path / "ckpt").exists():
        raise TfbitmetaError(f"{out} already holds a run: resume it or choose another output folder", param="resume")
    return run, meta


class RunDir:
    def __init__(self, path):
        self.path = Path(path)

    # -- metadata ----------------------------------------------------------------------------------
    @property
    def meta_file(self) -> Path:
        return self.path / "run.json"

    def exists(self) -> bool:
        return self.meta_file.is_file()

    def write_meta(self, model_cfg: ModelConfig, norm: Normalization, train_cfg: TrainConfig, dataset: dict,
                   status: dict | None = None, extra: dict | None = None, kind: str | None = None):
        kind = kind or ("fewshot" if "fewshot" in (extra or {}) else "mebqat")
        self.write_raw({"version": RUN_VERSION, "kind": kind, "model": model_cfg.to_dict(),
                        "normalization": norm.to_dict(), "dataset": dataset, "train": dataclasses.asdict(train_cfg),
                        "status": status or {}, **(extra or {})})

    def write_raw(self, meta: dict):
        """Write ``meta`` (which must carry ``version`` and ``kind``) atomically."""
        tmp = self.meta_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, self.meta_file)

    def kind(self) -> str:
        return run_kind(self.read_meta())

    def read_meta(self) -> dict:
        if not self.path.exists():
            raise TfbitmetaError(f"no run at {self.path}: train one there with `tfbitmeta train`", param="run")
        if not self.exists():
            raise TfbitmetaError(f"{self.path} is not a tfbitmeta run (no run.json)")
        try:
            meta = json.loads(self.meta_file.read_text())
            if meta.get("version") != RUN_VERSION:
                raise TfbitmetaError(f"{self.meta_file} has version {meta.get('version')}, expected {RUN_VERSION}")
            if run_kind(meta) == "federated":
                for c in meta["clients"]:
                    ModelConfig.from_dict(c["model"])
                ModelConfig.from_dict(meta["server"]["model"])
            else:
                ModelConfig.from_dict(meta["model"])
            return meta
        except (ValueError, KeyError, TypeError) as e:
            raise TfbitmetaError(f"corrupt run metadata {self.meta_file}: {e}") from None

    def update_status(self, **status):
        meta = json.loads(self.meta_file.read_text())
        meta["status"].update(status)
        tmp = self.meta_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, self.meta_file)

    # -- models and weights ------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.read_meta()["model"])

    def normalization(self) -> Normalization:
        return Normalization.from_dict(self.read_meta()["normalization"])

    def load_model(self, which: str = "model", cfg: ModelConfig | None = None) -> BitModel:
        """Rebuild the model from run.json (or ``cfg``) and restore weights from ``which`` (``model/`` = final,
        ``best/``; a federated run's ``clients/<k>/`` or ``server/``)."""
        bm = build(cfg or self.model_config())
        restore_weights(bm.keras, self.path / which)
        return bm


def restore_weights(model: tf.keras.Model, directory: Path, **extra) -> str:
    latest = tf.train.latest_checkpoint(str(directory))
    if latest is None:
        raise TfbitmetaError(f"no checkpoint in {directory}")
    try:
        tf.train.Checkpoint(model=model, **extra).restore(latest).expect_partial().assert_existing_objects_matched()
    except (tf.errors.OpError, ValueError, AssertionError, IndexError) as e:  # IndexError: truncated data file
        msg = str(e).strip().splitlines()[0][:200]
        raise TfbitmetaError(f"corrupt or incompatible checkpoint {latest}: {msg}") from None
    return latest


def save_weights(model: tf.keras.Model, directory: Path, step: int):
    mgr = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), str(directory), max_to_keep=1)
    mgr.save(checkpoint_number=step)
