"""Few-shot MEBQAT on Omniglot vs bitwidth-dedicated QAT and vanilla (FP) meta-learning, MAML and ProtoNet.

Six models, all Conv-4 (width 2 = 32 channels, ``exact`` scheme), trained 5-way 1-shot on the train alphabets:
mebqat-maml, fomaml@QAT_BITS, fomaml@fp (vanilla), mebqat-proto, protonet@QAT_BITS, protonet@fp (vanilla).
Each is evaluated at every bitwidth {2..8,16,fp} on the same test episodes of unseen (test-alphabet) classes:
5-way 1-shot for all, 20-way 1-shot for the ProtoNet models (a MAML classifier is 5-way).

Writes benchmarks/results/fewshot_omniglot.{json,png}.  See benchmarks/README.md for the exact command.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from tfbitmeta.data.episodes import Setting
from tfbitmeta.data.omniglot import load_omniglot
from tfbitmeta.meta.fewshot import FEWSHOT_BITS, FewShotConfig, parse_train_bits, train
from tfbitmeta.meta.fewshot_eval import evaluate_algorithm, load_run, plot_rows
from tfbitmeta.runs import TrainConfig
from tfbitmeta.quant.bitwidth import bit_name


def models(qat_bits: str):
    return [  # (label, method, bits, family)
        ("MEBQAT-MAML", "mebqat-maml", "all", "maml"),
        (f"QAT+FOMAML@{qat_bits}", "fomaml", qat_bits, "maml"),
        ("vanilla FOMAML (fp)", "fomaml", "fp", "maml"),
        ("MEBQAT-PN", "mebqat-proto", "all", "protonet"),
        (f"QAT+ProtoNet@{qat_bits}", "protonet", qat_bits, "protonet"),
        ("vanilla ProtoNet (fp)", "protonet", "fp", "protonet"),
    ]


def acc(rows, label, setting, bits):
    for r in rows[label]:
        if r["setting"] == setting and r["bits"] == bits:
            return r
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", default="../shared/data/omniglot")
    ap.add_argument("--width", type=float, default=2.0)
    ap.add_argument("--maml-steps", type=int, default=250)
    ap.add_argument("--proto-steps", type=int, default=500)
    ap.add_argument("--meta-batch", type=int, default=4)
    ap.add_argument("--qat-bits", default="4")
    ap.add_argument("--episodes", type=int, default=100, help="test episodes per setting and bitwidth")
    ap.add_argument("--val-episodes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default="runs/bench_fewshot")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs in --runs instead of retraining")
    ap.add_argument("--out", default="benchmarks/results/fewshot_omniglot")
    args = ap.parse_args()

    t_start = time.perf_counter()
    data = load_omniglot(args.data_dir, seed=args.seed)
    configs = [(b, b) for b in FEWSHOT_BITS]
    rows, runs_meta = {}, {}
    for label, method, bits, family in models(args.qat_bits):
        out = Path(args.runs) / f"{method}_{bits}"
        steps = args.maml_steps if family == "maml" else args.proto_steps
        fcfg = FewShotConfig(method=method, data_dir=args.data_dir, ways=5, shots=1,
                             queries=15 if family == "maml" else 5, meta_batch=args.meta_batch,
                             train_bits=parse_train_bits(method, bits), val_episodes=args.val_episodes,
                             eval_episodes=1)
        if not (args.reuse and (out / "model").exists()):
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            print(f"training {label} ({steps} steps) -> {out}", flush=True)
            train(out, TrainConfig(method=method, dataset="omniglot", steps=steps, lr=1e-3, seed=args.seed,
                                   ckpt_every=1000), fcfg, width=args.width, progress=False)
        meta, fc, bm, algo, norm = load_run(out)
        settings = [Setting(5, 1, 15)] + ([Setting(20, 1, 15)] if family == "protonet" else [])
        t0 = time.perf_counter()
        rows[label] = []
        for s in settings:
            rows[label] += evaluate_algorithm(algo, data.test, norm, s, configs, args.episodes, args.seed,
                                              fc.eval_inner_steps)
        st = meta["status"]
        runs_meta[label] = {"method": method, "train_bits": bits, "run": str(out), "steps": st.get("steps"),
                            "backward_passes": st.get("backward_passes"), "train_seconds": st.get("train_seconds"),
                            "best_val": st.get("best_val"), "eval_seconds": round(time.perf_counter() - t0, 1),
                            "params": bm.count_params()}
        line = "  ".join(f"{r['setting']}@{r['bits']}={100 * r['acc']:.1f}" for r in rows[label])
        print(f"{label}: {line}", flush=True)

    q = bit_name(int(args.qat_bits) if args.qat_bits != "fp" else 32)
    targets = []
    for fam, meb, qat, van in (("MAML", "MEBQAT-MAML", f"QAT+FOMAML@{args.qat_bits}", "vanilla FOMAML (fp)"),
                               ("ProtoNet", "MEBQAT-PN", f"QAT+ProtoNet@{args.qat_bits}", "vanilla ProtoNet (fp)")):
        for setting in [s for s in ("5w1s", "20w1s") if any(r["setting"] == s for r in rows[meb])]:
            m, b = acc(rows, meb, setting, q), acc(rows, qat, setting, q)
            gap = 100 * (m["acc"] - b["acc"])
            targets.append({"target": f"{meb} within 2 pp of {qat} at {q} bit ({setting})", "mebqat": m["acc"],
                            "baseline": b["acc"], "diff_pp": round(gap, 2), "met": bool(gap >= -2.0)})
            m2, v2 = acc(rows, meb, setting, "2"), acc(rows, van, setting, "2")
            gain = 100 * (m2["acc"] - v2["acc"])
            targets.append({"target": f"{meb} >= 20 pp above {van} at 2 bit ({setting})", "mebqat": m2["acc"],
                            "baseline": v2["acc"], "diff_pp": round(gain, 2), "met": bool(gain >= 20.0)})
    result = {
        "meta": {"command": "uv run python tools/bench_fewshot.py " + " ".join(
                     f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("reuse", "out")),
                 "dataset": data.describe(), "model": f"conv4 width {args.width} ({int(16 * args.width)} channels)",
                 "scheme": "exact", "train_setting": "5w1s", "episodes": args.episodes,
                 "total_seconds": round(time.perf_counter() - t_start, 1), "machine": platform.platform(),
                 "runs": runs_meta},
        "targets": targets,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot_rows(rows, out.with_suffix(".png"), "Omniglot")
    for t in targets:
        print(f"{'MET ' if t['met'] else 'MISS'} {t['target']}: {100 * t['mebqat']:.2f} vs {100 * t['baseline']:.2f} "
              f"({t['diff_pp']:+.2f} pp)")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')} in {time.perf_counter() - t_start:.0f} s")
    return np.all([t["met"] for t in targets])


if __name__ == "__main__":
    main()
