"""MEBQAT vs any-precision vs dedicated QAT on Fashion-MNIST at the same number of optimizer steps, and tfmot's
own 8-bit QAT of the same layers (same data, steps, batches) next to our 8-bit export of the one MEBQAT model
(the ``tfmot`` row: ``bench_tfmot.side_by_side``).

Writes benchmarks/results/mebqat_fashion_mnist.{json,png}.  See benchmarks/README.md for the exact command.
``--only`` re-runs a subset; the other runs come from their run directories in ``--work`` or, when those are
absent, from ``--previous`` (an earlier result JSON), and ``provenance`` says which run each row comes from.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from bench_tfmot import side_by_side
from tfbitmeta.data import datasets
from tfbitmeta.meta.evaluate import Predictor, plot_accuracy
from tfbitmeta.runs import RunDir, TrainConfig
from tfbitmeta.meta.train import ModelOptions, train
from tfbitmeta.quant.bitwidth import DEFAULT_BITS, FP, config_name
from tfbitmeta.quant.quantizers import DEFAULT_SCHEME, SCHEMES

EVAL_BITS = (2, 3, 4, 5, 6, 8, FP)


def batch1_agreement(run_dir: Path, dataset: str, seed: int, n: int, configs) -> dict:
    """Accuracy of batch-1 inference vs batched inference on the first n test images (calibrated BN)."""
    run = RunDir(run_dir)
    bm = run.load_model()
    splits = datasets.load(dataset, seed=seed)
    x = run.normalization().apply(splits.x_test[:n])
    y = splits.y_test[:n]
    p = Predictor(bm.keras, "calibrated")
    out = {}
    for cfg in configs:
        batched = np.argmax(p(x, cfg)["logits"].numpy(), -1)
        single = np.array([np.argmax(p(x[i:i + 1], cfg)["logits"].numpy(), -1)[0] for i in range(n)])
        out[config_name(cfg)] = {"batched_acc": float(np.mean(batched == y)), "batch1_acc": float(np.mean(single == y)),
                                 "agreement": float(np.mean(batched == single))}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--model", default="svhn_cnn")
    ap.add_argument("--width", type=float, default=2)
    ap.add_argument("--scheme", choices=list(SCHEMES), default=DEFAULT_SCHEME)
    ap.add_argument("--steps", type=int, default=1290)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/bench_mebqat")
    ap.add_argument("--out", default="benchmarks/results/mebqat_fashion_mnist")
    ap.add_argument("--batch1-images", type=int, default=500)
    ap.add_argument("--only", default=None,
                    help="comma list of runs to (re)train, e.g. mebqat,tfmot or dedicated_4 (tfmot needs mebqat's run)")
    ap.add_argument("--previous", default=None,
                    help="earlier result JSON: runs not re-run whose directory is absent are taken from it")
    args = ap.parse_args()

    work = Path(args.work)
    base = dict(dataset=args.dataset, steps=args.steps, batch_size=args.batch_size, seed=args.seed, ckpt_every=500)
    mopts = dict(family=args.model, width=args.width, scheme=args.scheme)
    eval_cfgs = [(b, b) for b in EVAL_BITS]
    plan = {
        "mebqat": (TrainConfig(method="mebqat", **base), ModelOptions(bits=DEFAULT_BITS, **mopts),
                   [(b, b) for b in DEFAULT_BITS]),
        "anyprec": (TrainConfig(method="anyprec", **base), ModelOptions(bits=EVAL_BITS, w_eq_a=True, **mopts),
                    eval_cfgs),
    }
    for b in EVAL_BITS:
        plan[f"dedicated_{config_name((b, b))}"] = (TrainConfig(method="dedicated", **base),
                                                    ModelOptions(bits=(b,), w_eq_a=True, **mopts), [(b, b)])
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - set(plan) - {"tfmot"}
    if unknown:
        ap.error(f"unknown run(s) {', '.join(sorted(unknown))}; choose from {', '.join([*plan, 'tfmot'])}")
    previous = json.loads(Path(args.previous).read_text()) if args.previous else None
    prev_source = previous and f"previous run {previous['finished']} ({previous['command']})"
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    results, provenance = {}, {}
    for name, (tcfg, mo, cfgs) in plan.items():
        d = work / name
        if only is None or name in only:
            shutil.rmtree(d, ignore_errors=True)
            print(f"== training {name}", flush=True)
            train(d, tcfg, mo, progress=True, eval_configs=cfgs)
            provenance[name] = f"this run (started {started})"
        elif not (d / "results.json").exists() and previous and name in previous["runs"]:
            results[name] = previous["runs"][name]
            provenance[name] = prev_source
            continue
        else:
            provenance[name] = f"run directory {d} (not re-trained)"
        results[name] = json.loads((d / "results.json").read_text())
    splits = datasets.load(args.dataset, seed=args.seed)
    if only is None or "tfmot" in only:
        print("== tfmot 8-bit QAT beside the mebqat model's 8-bit export", flush=True)
        tfmot = side_by_side(work / "mebqat", splits, work / "tfmot", args.steps, args.batch_size, TrainConfig().lr,
                             args.seed, int(round(args.width)))
        provenance["tfmot"] = f"this run (started {started}), beside mebqat's {provenance['mebqat']}"
    elif previous and "tfmot" in previous:
        tfmot, provenance["tfmot"] = previous["tfmot"], prev_source
    else:
        tfmot = None

    batch1 = batch1_agreement(work / "mebqat", args.dataset, args.seed, args.batch1_images, eval_cfgs)

    def acc(name, cfg, key="logits"):
        rows = {r["bits"]: r for r in results[name]["rows"]}
        return rows[config_name(cfg)][key]

    table = []
    for cfg in eval_cfgs:
        name = config_name(cfg)
        row = {"bits": name, "mebqat": acc("mebqat", cfg), "anyprec": acc("anyprec", cfg),
               "dedicated": acc(f"dedicated_{name}", cfg),
               "mebqat_batch_bn": acc("mebqat", cfg, "logits@batch_bn"),
               "mebqat_exit": acc("mebqat", cfg, f"exit{3}") if f"exit{3}" in results["mebqat"]["rows"][0] else None}
        row["gap_to_dedicated_pp"] = 100 * (row["dedicated"] - row["mebqat"])
        row["mebqat_minus_anyprec_pp"] = 100 * (row["mebqat"] - row["anyprec"])
        table.append(row)
    gaps = [r["gap_to_dedicated_pp"] for r in table]
    m, a = results["mebqat"]["meta"], results["anyprec"]["meta"]
    bp_m = m["backward_passes"] / m["configs_covered"]
    bp_a = a["backward_passes"] / a["configs_covered"]
    ded = [results[f"dedicated_{config_name(c)}"]["meta"] for c in eval_cfgs]
    summary = {
        "mean_gap_to_dedicated_pp": float(np.mean(gaps)), "worst_gap_to_dedicated_pp": float(np.max(gaps)),
        "mean_mebqat_minus_anyprec_pp": float(np.mean([r["mebqat_minus_anyprec_pp"] for r in table])),
        "backward_per_config": {"mebqat": bp_m, "anyprec": bp_a, "ratio": bp_m / bp_a},
        "backward_passes_total": {"mebqat": m["backward_passes"], "anyprec": a["backward_passes"],
                                  "dedicated_all": sum(d["backward_passes"] for d in ded)},
        "wall_clock_s": {"mebqat": m["train_seconds"], "anyprec": a["train_seconds"],
                         "dedicated_all": round(sum(d["train_seconds"] for d in ded), 2)},
        "checkpoint_bytes": {"mebqat": m["checkpoint_bytes"], "anyprec": a["checkpoint_bytes"],
                             "dedicated_all": sum(d["checkpoint_bytes"] for d in ded)},
        "batch1_vs_batched": batch1,
        "targets": {"mean_gap_le_0.5pp": bool(np.mean(gaps) <= 0.5), "worst_gap_le_1.5pp": bool(np.max(gaps) <= 1.5),
                    "mebqat_ge_anyprec": bool(np.mean([r["mebqat_minus_anyprec_pp"] for r in table]) >= 0),
                    "backward_ratio_le_6pct": bool(bp_m / bp_a <= 0.06),
                    "batch1_equals_batched": all(v["agreement"] == 1.0 for v in batch1.values())},
    }
    out = {"command": "uv run python tools/bench_mebqat.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                       vars(args).items() if v is not None),
           "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                       "tensorflow": tf.__version__},
           "settings": {k: v for k, v in vars(args).items()}, "table": table, "summary": summary,
           "tfmot": tfmot, "runs": {k: {"meta": v["meta"], "rows": v["rows"]} for k, v in results.items()},
           "provenance": provenance, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    outp = Path(args.out)
    outp.parent.mkdir(parents=True, exist_ok=True)
    outp.with_suffix(".json").write_text(json.dumps(out, indent=2))
    ded_rows = [{"bits": r["bits"], "logits": r["dedicated"]} for r in table]
    plot_accuracy({"MEBQAT (one model)": results["mebqat"]["rows"], "any-precision (one model)": results["anyprec"]["rows"],
                   "dedicated (one model per bitwidth)": ded_rows}, outp.with_suffix(".png"),
                  f"{args.dataset}, {args.model} x{args.width:g}, {args.scheme}, {args.steps} steps each")
    print(json.dumps({"table": table, "summary": summary, "tfmot": tfmot and {k: tfmot[k] for k in ("ratios",)},
                      "provenance": provenance}, indent=2))


if __name__ == "__main__":
    main()
