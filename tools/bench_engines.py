"""Round time of the TFF process vs the same work in a plain TF loop (issue 12 item 6: target <= 1.5x).

Runs the same simulation (same seed, same batches) on ``--engine tf`` and ``--engine tff`` one after the other and
times each round; round 1 (tracing) and the steady-state rounds are reported separately, and the time to the end
of round 1 counting the process's construction (TFF traces the client computation there).  Writes
benchmarks/results/federated_engines.json.

    uv run python tools/bench_engines.py                 # the committed numbers (see benchmarks/README.md)
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

from tfbitmeta.federated.simulation import SimConfig, Simulation  # noqa: E402
from tfbitmeta.federated.workers import install_reaper  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--architectures", default="svhn_cnn-w4,svhn_cnn-w2,mobilenet_v2-w05")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/federated_engines.json"))
    args = ap.parse_args()
    install_reaper()
    runs = {}
    for engine in ("tf", "tff"):
        cfg = SimConfig(dataset=args.dataset, clients=args.clients, rounds=args.rounds, local_steps=args.local_steps,
                        batch_size=args.batch_size, architectures=args.architectures, engine=engine)
        t0 = time.perf_counter()
        sim = Simulation(cfg, progress=False)
        build = time.perf_counter() - t0
        try:
            seconds = [sim.run_round(r)["seconds"] for r in range(args.rounds)]
        finally:
            sim.process.close()
        runs[engine] = {"build_seconds": build, "round_seconds": seconds, "first_round_seconds": seconds[0],
                        "steady_round_seconds_median": float(np.median(seconds[1:])), "config": asdict(cfg)}
        print(engine, json.dumps(runs[engine]["round_seconds"]), flush=True)
    tf_, tff_ = runs["tf"], runs["tff"]
    summary = {"steady_ratio_tff_over_tf": tff_["steady_round_seconds_median"] / tf_["steady_round_seconds_median"],
               "first_round_ratio_tff_over_tf": tff_["first_round_seconds"] / tf_["first_round_seconds"],
               "to_first_round_done_ratio_tff_over_tf": (tff_["build_seconds"] + tff_["first_round_seconds"])
               / (tf_["build_seconds"] + tf_["first_round_seconds"]),
               "target_steady_ratio": "<= 1.5"}
    summary["met"] = bool(summary["steady_ratio_tff_over_tf"] <= 1.5)
    meta = {"command": "uv run python tools/bench_engines.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
            "date": time.strftime("%Y-%m-%d %H:%M")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
