"""Benchmark of the hybrid split federated simulation on Fashion-MNIST, on the core stack (issue 12).

Runs ours (HARMONY-style), the ablations and the baselines with the same clients, data and budget (every learner
processes the same number of examples), then HARMONY once more on the other engine to measure the TFF overhead on
the same work.  Run directories (with predictions.npz: every client's exit and server probabilities on every test
image) stay in --runs.  Writes benchmarks/results/federated_fashion_mnist.json and .png.

    uv run python tools/bench_federated.py                      # the committed numbers (see benchmarks/README.md)
    uv run python tools/bench_federated.py --rounds 3 --out /tmp/fl   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from tfbitmeta.federated.algorithms import ALGORITHMS  # noqa: E402
from tfbitmeta.federated.simulation import SimConfig, evaluate_predictions, format_table, simulate  # noqa: E402
from tfbitmeta.federated.workers import install_reaper  # noqa: E402

ORDER = ["harmony", "splitgp", "fedavg", "local", "centralized", "harmony-no-contrastive", "harmony-no-sampling",
         "harmony-no-inner"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--architectures", default="svhn_cnn-w4,svhn_cnn-w2,mobilenet_v2-w05")
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--runs", type=Path, default=Path("runs/bench_federated"))
    ap.add_argument("--bits", default="2,4,8")
    ap.add_argument("--algorithms", default=",".join(ORDER))
    ap.add_argument("--engine", default="tff", choices=["tff", "tf"], help="engine of every algorithm's run")
    ap.add_argument("--engine-rounds", type=int, default=None,
                    help="rounds of the HARMONY run on the other engine (round-time ratio) [default: --rounds]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    install_reaper()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {}
    base = dict(dataset=args.dataset, clients=args.clients, rounds=args.rounds, local_steps=args.local_steps,
                batch_size=args.batch_size, architectures=args.architectures, bits=args.bits, seed=args.seed,
                tasks=args.tasks, lr=args.lr, inner_lr=args.lr, server_lr=args.lr)
    from tfbitmeta.data import datasets

    y_test = datasets.load(args.dataset, seed=args.seed).y_test.astype(np.int32)
    algorithms = [a for a in args.algorithms.split(",") if a]
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise SystemExit(f"unknown algorithm {', '.join(unknown)}: use {', '.join(ALGORITHMS)}")
    for alg in algorithms:
        t0 = time.perf_counter()
        run_dir = args.runs / alg
        sim, res = simulate(SimConfig(algorithm=alg, engine=args.engine, **base), out=run_dir, progress=True)
        preds = res.pop("predictions")
        meta = json.loads((run_dir / "run.json").read_text())
        # the whole model's test accuracy (front end of client 0 + server backend, every test image)
        res["server_test_accuracy"] = float(np.mean(preds["server_probs"][0].argmax(-1) == y_test))
        res["exit_test_accuracy_client0"] = float(np.mean(preds["exit_probs"][0].argmax(-1) == y_test))
        if ALGORITHMS[alg].split:  # the exit threshold trades accuracy for offloading: the sweep
            res["threshold_sweep"] = {str(t): {p: {m: r["mean"][p][m] for m in ("accuracy", "offload_ratio", "latency_ms")}
                                               for p in ("p0", "p1")}
                                      for t in THRESHOLDS for r in [evaluate_predictions(meta, preds, y_test, t)]}
        res["wall_seconds"] = time.perf_counter() - t0
        res["config"] = asdict(sim.cfg)
        res["history"] = sim.history
        runs[alg] = res
        print(f"\n== {alg} ({res['wall_seconds']:.0f} s)\n{format_table(res)}", flush=True)
        write(args, runs, {})  # partial results survive an interrupted benchmark
    # the same HARMONY work on the other engine: TFF overhead per round (round 1 = tracing, left out)
    engines = {}
    if "harmony" in runs:
        other = "tf" if args.engine == "tff" else "tff"
        n = args.engine_rounds or args.rounds
        sim, res = simulate(SimConfig(algorithm="harmony", engine=other, **{**base, "rounds": n}),
                            out=args.runs / f"harmony_{other}", progress=True)
        res.pop("predictions")
        engines = {args.engine: runs["harmony"]["round_seconds"][:n], other: res["round_seconds"]}
        same = abs(res["mean"]["p1"]["accuracy"] - runs["harmony"]["mean"]["p1"]["accuracy"])
        engines["accuracy_difference_p1"] = same
    write(args, runs, engines)
    print(json.dumps(write(args, runs, engines), indent=2))


def write(args, runs: dict, engines: dict) -> dict:
    summary = summarize(runs, engines)
    meta = {"command": "uv run python tools/bench_federated.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
            "budget": {"rounds": args.rounds, "local_steps": args.local_steps, "batch_size": args.batch_size,
                       "examples_per_learner_round": args.local_steps * args.batch_size,
                       "note": "every algorithm processes the same examples per round; centralized: one learner "
                               "with clients x local_steps steps"},
            "date": time.strftime("%Y-%m-%d"),
            "algorithms_done": list(runs), "complete": bool(engines)}
    (args.out / "federated_fashion_mnist.json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "runs": runs}, indent=2, default=_json))
    plot(runs, summary, args.out / "federated_fashion_mnist.png")
    return summary


def _json(o):
    return o.item() if isinstance(o, np.generic) else o.tolist() if isinstance(o, np.ndarray) else str(o)


THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99)


def summarize(runs: dict, engines: dict) -> dict:
    table = {a: {f"acc_p{p}": 100 * r["mean"][f"p{p}"]["accuracy"] for p in ("0", "0.5", "1")}
             | {"offload_p1": 100 * r["mean"]["p1"]["offload_ratio"], "latency_ms_p1": r["mean"]["p1"]["latency_ms"],
                "exit_acc_p1": 100 * r["mean"]["p1"]["exit_accuracy"], "server_acc_p1": None if r["mean"]["p1"]["server_accuracy"] is None else 100 * r["mean"]["p1"]["server_accuracy"],
                "train_seconds": r["train_seconds"], "round_seconds_median": float(np.median(r["round_seconds"][1:] or r["round_seconds"])),
                "server_test_accuracy": 100 * r["server_test_accuracy"]}
             for a, r in runs.items()}
    out = {"table_percent": table, "targets": {}}
    t = out["targets"]
    if {"harmony", "splitgp"} <= table.keys():
        d = table["harmony"]["acc_p1"] - table["splitgp"]["acc_p1"]
        t["with_ood_vs_splitgp_pp"] = {"value": d, "target": ">= +20", "met": bool(d >= 20)}
    if {"harmony", "local"} <= table.keys():
        d = table["harmony"]["acc_p0"] - table["local"]["acc_p0"]
        t["id_vs_local_pp"] = {"value": d, "target": ">= 0", "met": bool(d >= 0)}
    if "centralized" in table:
        v = table["centralized"]["server_test_accuracy"]
        t["centralized_test_accuracy"] = {"value": v, "target": ">= 90", "met": bool(v >= 90)}
    if {"harmony", "centralized"} <= table.keys():
        for p in ("0", "1"):
            d = table["centralized"][f"acc_p{p}"] - table["harmony"][f"acc_p{p}"]
            t[f"gap_to_centralized_p{p}_pp"] = {"value": d, "target": "<= 3", "met": bool(d <= 3)}
    if engines:
        tff_s, tf_s = np.median(engines["tff"][1:]), np.median(engines["tf"][1:])
        out["engines"] = {"tff_round_seconds_median": tff_s, "tf_round_seconds_median": tf_s,
                          "tff_first_round_seconds": engines["tff"][0], "tf_first_round_seconds": engines["tf"][0],
                          "accuracy_difference_p1": engines["accuracy_difference_p1"]}
        t["tff_over_tf_round_time"] = {"value": tff_s / tf_s, "target": "<= 1.5", "met": bool(tff_s / tf_s <= 1.5)}
    return out


def plot(runs: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algs = list(runs)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    x = np.arange(len(algs))
    for i, p in enumerate(("0", "0.5", "1")):
        axes[0].bar(x + (i - 1) * 0.27, [summary["table_percent"][a][f"acc_p{p}"] for a in algs], 0.27,
                    label=f"OOD p={p}")
    axes[0].set_xticks(x, algs, rotation=35, ha="right", fontsize=8)
    axes[0].set_ylabel("mean client accuracy (%)")
    axes[0].legend(fontsize=8)
    axes[0].set_title("accuracy without (p=0) and with OOD samples")
    axes[1].bar(x, [summary["table_percent"][a]["offload_p1"] for a in algs], color="tab:orange")
    ax2 = axes[1].twinx()
    ax2.plot(x, [summary["table_percent"][a]["latency_ms_p1"] for a in algs], "k.-")
    ax2.set_ylabel("modelled latency p=1 (ms)")
    axes[1].set_xticks(x, algs, rotation=35, ha="right", fontsize=8)
    axes[1].set_ylabel("offload ratio p=1 (%)")
    axes[1].set_title("fallback to the server")
    for a in algs:
        h = runs[a]["history"]
        axes[2].plot([r["round"] for r in h], [r["exit_loss"] for r in h], label=a)
    axes[2].set_xlabel("round")
    axes[2].set_ylabel("client exit cross-entropy")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
