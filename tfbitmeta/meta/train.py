"""From options to a trained, calibrated, evaluated run directory (used by the CLI and the benchmarks)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import tensorflow as tf

from tfbitmeta.data import datasets
from tfbitmeta.data.pipeline import Normalization, eval_batches
from tfbitmeta.meta.evaluate import accuracy_table, write_results
from tfbitmeta.meta.loop import FitResult, Trainer, checkpoint_bytes
from tfbitmeta.meta.methods import make_method
from tfbitmeta.runs import RunDir, TrainConfig, check_writable, open_training_run
from tfbitmeta.models import ModelConfig, build, min_input_size
from tfbitmeta.quant.bitwidth import DEFAULT_BITS, BitSpace, Config
from tfbitmeta.quant.quantizers import DEFAULT_SCHEME


@dataclasses.dataclass
class ModelOptions:
    family: str = "svhn_cnn"
    width: float = 2.0
    scheme: str = DEFAULT_SCHEME
    bits: tuple[int, ...] = DEFAULT_BITS
    w_eq_a: bool = False
    first_last: str | int = "auto"  # models.base.first_last_precision
    bn_mode: str = "calibrated"
    image_size: int | None = None
    exits: tuple[int, ...] | None = None
    exit_head: str = "grid"  # models.base.EXIT_HEADS; "gap" is the head runs had before (docs/method.md)


def set_determinism(seed: int):
    tf.keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def prepare(out: Path, tcfg: TrainConfig, mopts: ModelOptions, resume: bool = False):
    """Load data, build the model and the method; write or read run.json.  Returns (run, trainer parts)."""
    run, meta = open_training_run(out, resume)
    if resume:
        tcfg = TrainConfig.from_dict(meta["train"])
        mcfg = ModelConfig.from_dict(meta["model"])
        norm = Normalization.from_dict(meta["normalization"])
    set_determinism(tcfg.seed)
    splits = datasets.load(tcfg.dataset, seed=tcfg.seed).limit_train(tcfg.limit_train)
    if not resume:
        size = (mopts.image_size, mopts.image_size) if mopts.image_size else None
        min_size = min_input_size(mopts.family)
        if size is None and min(splits.image_shape[:2]) < min_size:
            size = (min_size, min_size)
            print(f"note: {splits.name} images are {splits.image_shape[0]}px; {mopts.family} needs >= {min_size}px, "
                  f"resizing to {min_size}x{min_size} (recorded in run.json)")
        norm = Normalization.fit(splits.x_train, size)
        space = BitSpace(mopts.bits, mopts.w_eq_a)
        mcfg = ModelConfig(family=mopts.family, input_shape=norm.model_input_shape(splits.image_shape[-1]),
                           num_classes=splits.num_classes, width=mopts.width, scheme=mopts.scheme,
                           first_last=mopts.first_last, bn_mode=mopts.bn_mode, candidates=space, exits=mopts.exits,
                           exit_head=mopts.exit_head)
    bm = build(mcfg)
    method = make_method(tcfg.method, mcfg.candidates, tcfg.seed, tcfg.num_tasks)
    if not resume:
        dataset = {"name": splits.name, "class_names": splits.class_names, "seed": tcfg.seed,
                   "train": len(splits.x_train), "val": len(splits.x_val), "test": len(splits.x_test)}
        run.write_meta(mcfg, norm, tcfg, dataset, {"state": "training"})
    return run, Trainer(run, bm, method, splits, norm, tcfg)


def train(out: Path, tcfg: TrainConfig, mopts: ModelOptions, resume: bool = False, progress: bool = True,
          eval_configs: list[Config] | None = None) -> dict:
    run, trainer = prepare(out, tcfg, mopts, resume)
    trainer.progress = progress
    fit: FitResult = trainer.fit(resume=resume)
    trainer.finalize()
    run.update_status(state="done", steps=fit.steps, backward_passes=fit.backward_passes,
                      train_seconds=round(fit.seconds, 2))
    configs = eval_configs or trainer.method.eval_configs
    modes = ("calibrated", "batch") if trainer.bm.cfg.bn_mode == "calibrated" else ("batch",)
    test = eval_batches(trainer.splits.x_test, trainer.splits.y_test, trainer.norm)
    rows = accuracy_table(trainer.model, test, configs, modes)
    meta = {"method": trainer.method.name, "dataset": trainer.splits.name, "model": trainer.bm.cfg.family,
            "scheme": trainer.bm.cfg.scheme, "steps": fit.steps, "backward_passes": fit.backward_passes,
            "configs_covered": len(trainer.method.covered), "train_seconds": round(fit.seconds, 2),
            "best_val": fit.best_val, "params": trainer.bm.count_params(),
            "checkpoint_bytes": checkpoint_bytes(run.path / "model"), "bn_mode": modes[0]}
    write_results(run.path, rows, meta, f"{trainer.method.name} on {trainer.splits.name} "
                                        f"({trainer.bm.cfg.family}, {trainer.bm.cfg.scheme})")
    return {"meta": meta, "rows": rows, "history": fit.history}


def evaluate(run_path: Path, bits: str = "all", batch_size: int = 256, out: Path | None = None,
             deployed: bool = True, progress=None) -> dict:
    """Fake-quant (Keras) accuracy per configuration and head; with ``deployed`` also what the exported integer
    files answer (the integer-exact reference, whole test set) and the early-exit report, side by side."""
    run = RunDir(run_path)
    meta = run.read_meta()
    bm = run.load_model("model" if (run.path / "model").exists() else "best")
    configs = bm.cfg.candidates.parse(bits)
    tcfg = TrainConfig.from_dict(meta["train"])
    splits = datasets.load(tcfg.dataset, seed=tcfg.seed)
    norm = run.normalization()
    modes = ("calibrated", "batch") if bm.cfg.bn_mode == "calibrated" else ("batch",)
    rows = accuracy_table(bm.keras, eval_batches(splits.x_test, splits.y_test, norm, batch_size), configs, modes)
    result_meta = {"method": tcfg.method, "dataset": splits.name, "model": bm.cfg.family, "scheme": bm.cfg.scheme,
                   "bn_mode": modes[0], "batch_size": batch_size}
    if deployed:
        from tfbitmeta.export.deployed import DEFAULT_MAX_LOSS, deployed_table

        table = deployed_table(bm, norm, splits, configs, progress=progress)
        for row in rows:
            d = table.get(row["bits"], {})
            if "skipped" in d:
                row["deployed"] = None
                continue
            row["logits@deployed"] = d["logits"]
            row["gap_pp"] = round(100 * (row["logits"] - d["logits"]), 2)
            for split, rep in d["exits"].items():
                row[f"exit{split}@deployed"] = rep["exit_head_accuracy"]
                row[f"exit{split}_fraction"] = rep["exit_fraction"]
                row[f"exit{split}_or_continue"] = rep["exit_or_continue_accuracy"]
                row[f"exit{split}_threshold"] = rep["threshold"]
        result_meta["deployed"] = {"reference": "integer-exact emulation of the exported TFLite files "
                                                "(tfbitmeta.export.emulate), one image per call",
                                   "exit_threshold": f"chosen on validation: smallest with exit-or-continue accuracy "
                                                     f">= full model - {100 * DEFAULT_MAX_LOSS:.1f} pp",
                                   "details": table}
    write_results(check_writable(out or run.path), rows, result_meta,
                  f"{tcfg.method} on {splits.name} ({bm.cfg.family}, {bm.cfg.scheme})")
    return {"meta": result_meta, "rows": rows}
