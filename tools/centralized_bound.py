"""The centralized upper bound of a federated benchmark (issue 12, target >= 90 % test accuracy), summarized from
a finished ``tfbitmeta simulate --algorithm centralized`` run directory into ``benchmarks/results/`` (JSON + PNG).

The pooled learner's front end is evaluated at every client's bitwidth (BatchNorm calibrated on the pooled training
data) through the server backend on all test images; the JSON carries the accuracy by bitwidth, the training
curve (per round: step size, server and exit cross-entropy), train seconds and seconds per round.  The command is
in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

TARGET = 0.90


def summarize(run: Path, command: str) -> dict:
    from tfbitmeta.data import datasets

    meta = json.loads((run / "run.json").read_text())
    res = json.loads((run / "results.json").read_text())
    if meta.get("algorithm", {}).get("name") != "centralized":
        raise SystemExit(f"{run} is not a centralized run")
    cfg = meta["config"]
    y = datasets.load(cfg["dataset"], seed=cfg["seed"]).y_test.astype(np.int64)
    preds = np.load(run / "predictions.npz")
    server = (preds["server_probs"].argmax(-1) == y).mean(-1)
    exits = (preds["exit_probs"].argmax(-1) == y).mean(-1)
    bits = [c["bits"] for c in meta["clients"]]
    by_bits = {str(b): float(np.mean([server[k] for k in range(len(bits)) if bits[k] == b])) for b in dict.fromkeys(bits)}
    exit_by_bits = {str(b): float(np.mean([exits[k] for k in range(len(bits)) if bits[k] == b]))
                    for b in dict.fromkeys(bits)}
    rounds = res["rounds"]
    steps = cfg["rounds"] * cfg["local_steps"] * cfg["clients"]
    secs = res["round_seconds"]
    best = max(by_bits.values())
    worst = min(by_bits.values())
    return {
        "meta": {"command": command, "summarized_by": "uv run python " + shlex.join(sys.argv),
                 "note": "front end of each client (its bitwidth; BatchNorm calibrated on the pooled training data) "
                         "+ the server backend (FP), every test image"},
        "summary": {"server_test_accuracy_by_bits": by_bits, "server_test_accuracy_best": best,
                    "server_test_accuracy_worst": worst, "exit_test_accuracy_by_bits": exit_by_bits,
                    "target": f">= {TARGET:.2f} (test accuracy of the centralized model on all "
                              f"{len(y)} {cfg['dataset']} test images, at every bitwidth)",
                    "met": bool(worst >= TARGET), "lr_schedule": cfg.get("lr_schedule", "constant"),
                    "train_seconds": res["train_seconds"], "seconds_per_round_mean": float(np.mean(secs)),
                    "seconds_per_round_median_after_first": float(np.median(secs[1:])) if len(secs) > 1 else None,
                    "steps": steps, "examples": steps * cfg["batch_size"]},
        "curve": {k: [r.get(k) for r in rounds] for k in ("round", "lr", "server_ce", "exit_loss")},
        "clients": [{"client": k, "architecture": c["architecture"], "bits": c["bits"],
                     "server_test_accuracy": float(server[k]), "exit_test_accuracy": float(exits[k])}
                    for k, c in enumerate(meta["clients"])],
        "config": cfg, "mean_table": res["mean"], "round_seconds": secs}


def plot(d: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = d["curve"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(c["round"], c["server_ce"], label="server CE (train)")
    a.plot(c["round"], c["exit_loss"], label="exit CE (train)")
    a.set_xlabel("round")
    a.set_ylabel("cross-entropy")
    lr = a.twinx()
    lr.plot(c["round"], c["lr"], color="grey", ls=":", label="step size")
    lr.set_ylabel("step size")
    a.legend(fontsize=8)
    s = d["summary"]
    keys = list(s["server_test_accuracy_by_bits"])
    xs = np.arange(len(keys))
    b.bar(xs - 0.2, [100 * s["server_test_accuracy_by_bits"][k] for k in keys], 0.4, label="server backend")
    b.bar(xs + 0.2, [100 * s["exit_test_accuracy_by_bits"][k] for k in keys], 0.4, label="early exit")
    b.axhline(100 * TARGET, color="k", ls="--", lw=1, label="target")
    b.set_xticks(xs, [f"{k} bit" for k in keys])
    b.set_ylim(50, 100)
    b.set_ylabel("test accuracy (%)")
    b.legend(fontsize=8)
    fig.suptitle(f"centralized upper bound, {d['config']['dataset']}: {s['steps']} steps, {s['lr_schedule']} schedule")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished centralized run directory")
    ap.add_argument("--command", required=True, help="the exact simulate command that made the run")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/federated_centralized_fashion_mnist.json"))
    args = ap.parse_args()
    d = summarize(args.run, args.command)
    args.out.write_text(json.dumps(d, indent=2) + "\n")
    plot(d, args.out.with_suffix(".png"))
    s = d["summary"]
    print(json.dumps({k: s[k] for k in ("server_test_accuracy_by_bits", "exit_test_accuracy_by_bits", "met",
                                        "train_seconds", "seconds_per_round_mean")}, indent=1))


if __name__ == "__main__":
    main()
