"""TFLite export of a MEBQAT model: bit-exactness of the integer reference, deployed vs fake-quant accuracy,
early exits at the validation-chosen threshold, size vs the physical limit, latency.

Writes benchmarks/results/tflite_export.{json,png} (command in benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import tensorflow as tf

from tfbitmeta.export.convert import AGREEMENT_TARGET, analyzer_types, export


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", default="runs/fm")
    ap.add_argument("--bits", default="1,2,3,4,5,6,8,fp")
    ap.add_argument("--out-models", default="runs/bench_export/models")
    ap.add_argument("--verify-images", type=int, default=10000)
    ap.add_argument("--out", default="benchmarks/results/tflite_export")
    ap.add_argument("--int8-weights", action="store_true", help="1-4 bit weights in INT8 (tfbitmeta convert --int8-weights)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    manifest = export(Path(args.run), args.bits, "all", Path(args.out_models), verify=True, int4=not args.int8_weights,
                      n_verify=args.verify_images, measure_latency=True)
    models = Path(args.out_models)
    rows = []
    for f in manifest["files"]:
        v, size = f["verify"], f["size"]
        ref = v["integer_reference"]
        pol = f.get("exit_policy") or {}
        rows.append({"file": f["path"], "kind": f["kind"], "bits": f["bits"]["name"], "exit_or_split": f["split"],
                     "verify_passed": v["passed"], "integer_file": ref.get("integer"),
                     "bit_exact_vs_interpreter": ref.get("bit_exact"),
                     "max_code_diff": max((o.get("max_code_diff", 0) for o in ref.get("outputs", {}).values()), default=None),
                     "ops": ref.get("ops"), "weights_match_checkpoint": (v.get("weights") or {}).get("passed"),
                     "deployed_minus_fake_quant_pp": round(100 * (v["tflite_accuracy"] - v["keras_accuracy"]), 2),
                     "exit_policy_test": pol.get("test"), "exit_policy_validation": pol.get("validation"),
                     "weights": f["weights"], "analyzer_types": sorted(analyzer_types(models / f["path"])),
                     "top1_agreement": v["top1_agreement"], "max_abs_dprob": v["max_abs_dprob"],
                     "tflite_accuracy": v["tflite_accuracy"], "keras_accuracy": v["keras_accuracy"],
                     "pipeline_top1_agreement": v.get("pipeline_top1_agreement"),
                     "pipeline_accuracy": v.get("pipeline_accuracy"),
                     "bytes": f["bytes"], "weight_buffers_bytes": size["weight_buffers_bytes"],
                     "weights_limit_bytes": size["weights_limit_bytes"],
                     "fixed_overhead_bytes": size["fixed_overhead_bytes"],
                     "buffers_over_limit": size["weight_buffers_bytes"] / max(1, size["weights_limit_bytes"]),
                     "latency_ms_1_thread": f["latency_ms"]["1_threads"], "latency_ms_2_threads": f["latency_ms"]["2_threads"],
                     "exit_threshold": f.get("exit_threshold")})
    fp = {(r["kind"], r["exit_or_split"]): r for r in rows if r["bits"] == "fp"}
    for r in rows:
        ref = fp[(r["kind"], r["exit_or_split"])]
        r["latency_vs_float32_1_thread"] = r["latency_ms_1_thread"] / ref["latency_ms_1_thread"]
        r["latency_vs_float32_2_threads"] = r["latency_ms_2_threads"] / ref["latency_ms_2_threads"]
    quant = [r for r in rows if r["bits"] != "fp"]
    integer = [r for r in rows if r["integer_file"]]
    summary = {
        "integer_files": len(integer),
        "integer_files_bit_exact": sum(bool(r["bit_exact_vs_interpreter"]) for r in integer),
        "all_verify_passed": all(r["verify_passed"] for r in rows),
        "max_abs_deployed_minus_fake_quant_pp": max(abs(r["deployed_minus_fake_quant_pp"]) for r in rows),
        "pipeline_deployed_minus_fake_quant_pp": {r["bits"]: round(100 * (r["pipeline_accuracy"] - r["keras_accuracy"]), 2)
                                                  for r in rows if r["kind"] == "backend"},
        "exits": {r["bits"]: r["exit_policy_test"] for r in rows if r["kind"] == "front_end"},
        "min_agreement": min(r["top1_agreement"] for r in rows),
        "files_below_agreement_target": [r["file"] for r in rows if r["top1_agreement"] < AGREEMENT_TARGET],
        "max_buffers_over_limit": max(r["buffers_over_limit"] for r in quant),
        "int8_latency_ratio_1_thread": {r["file"]: round(r["latency_vs_float32_1_thread"], 3) for r in quant
                                        if r["weights"] == "int8"},
        "int4_latency_ratio_1_thread": {r["file"]: round(r["latency_vs_float32_1_thread"], 3) for r in quant
                                        if r["weights"] != "int8"},
        "targets": {"integer_reference_bit_exact_everywhere": all(r["bit_exact_vs_interpreter"] for r in integer),
                    "deployed_gap_le_0.3pp": all(abs(r["deployed_minus_fake_quant_pp"]) <= 0.3 for r in rows
                                                 if r["kind"] == "backend"),
                    "exit_ge_60pct_at_le_1pp": {r["bits"]: bool(r["exit_policy_test"]["exit_fraction"] >= 0.6
                                                                 and r["exit_policy_test"]["loss_pp"] <= 1.0)
                                                for r in rows if r["kind"] == "front_end"},
                    "agreement_ge_99.5pct_everywhere": all(r["top1_agreement"] >= AGREEMENT_TARGET for r in rows),
                    "buffers_le_1.2x_limit": all(r["buffers_over_limit"] <= 1.2 for r in quant),
                    "int8_latency_le_0.6x_float32": all(r["latency_vs_float32_1_thread"] <= 0.6 for r in quant
                                                        if r["weights"] == "int8")},
    }
    out = {"command": f"uv run python tools/bench_export.py --run {args.run} --bits {args.bits} "
                      f"--verify-images {args.verify_images} --out {args.out}"
                      + (" --int8-weights" if args.int8_weights else ""),
           "tensorflow": tf.__version__, "seconds": round(time.perf_counter() - t0, 1), "summary": summary,
           "rows": rows, "weights_1_to_4_bit": "int8" if args.int8_weights else "int4", "manifest_input": manifest["input"], "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    p = Path(args.out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.with_suffix(".json").write_text(json.dumps(out, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for kind, marker in (("front_end", "o"), ("backend", "s")):
        rs = [r for r in rows if r["kind"] == kind]
        xs = [r["bits"] for r in rs]
        axes[0].plot(xs, [100 * r["top1_agreement"] for r in rs], marker=marker, label=kind)
        axes[1].plot(xs, [r["bytes"] / 1024 for r in rs], marker=marker, label=f"{kind} file")
        axes[1].plot(xs, [r["weights_limit_bytes"] / 1024 for r in rs], linestyle="--", label=f"{kind} weight limit")
        axes[2].plot(xs, [r["latency_ms_1_thread"] for r in rs], marker=marker, label=f"{kind}, 1 thread")
    axes[0].axhline(100 * AGREEMENT_TARGET, color="gray", linestyle=":", label="target")
    axes[0].set_ylabel("top-1 agreement TFLite vs fake-quant Keras (%)")
    axes[1].set_ylabel("KiB")
    axes[2].set_ylabel("median batch-1 latency (ms)")
    for ax in axes:
        ax.set_xlabel("bitwidth")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("TFLite export of the MEBQAT Fashion-MNIST model (TF 2.14 interpreter, 2-core CPU)")
    fig.tight_layout()
    fig.savefig(p.with_suffix(".png"), dpi=110)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
