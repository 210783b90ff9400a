"""Batch-1 latency of a model big enough that kernels dominate: int8 / INT4 vs float32, 1 and 2 threads.

Exports RUN (e.g. a mobilenet_v2 width-1 run) at the given bitwidths with ``tfbitmeta convert``'s exporter and
times every front end, backend and the whole pipeline (front end + backend) on one image:

* ``signature``: the signature runner, as the device runtime, the server and the Android app call the files
  (TF 2.14 does not apply the XNNPACK delegate on this path for these dynamic-batch files);
* ``xnnpack``: the classic ``invoke()`` path with the default delegates on a batch-1 interpreter, which lets
  TF 2.14 apply XNNPACK (float32 and per-channel int8 kernels; INT4 weights stay on the built-in kernels).

Also checks on a few images that the integer reference reproduces the integer files bit for bit (depthwise conv,
ADD and the other MobileNetV2 ops).  Writes benchmarks/results/latency_<model>.json (command in
benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfbitmeta.data import datasets
from tfbitmeta.export import emulate
from tfbitmeta.export.convert import export, run_tflite
from tfbitmeta.runs import RunDir, TrainConfig


def _time(fn, runs: int) -> float:
    fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(ts))


def latency(path: Path, threads: int, mode: str, runs: int) -> tuple[float, bool]:
    """(median ms, whether an XNNPACK delegate was created)."""
    if mode == "signature":
        it = tf.lite.Interpreter(model_path=str(path), num_threads=threads)
        r = it.get_signature_runner()
        name, d = next(iter(r.get_input_details().items()))
        x = np.random.default_rng(0).normal(size=[1, *d["shape_signature"][1:]]).astype(np.float32)
        return _time(lambda: r(**{name: x}), runs), False
    it = tf.lite.Interpreter(model_path=str(path), num_threads=threads)
    d = it.get_input_details()[0]
    it.resize_tensor_input(d["index"], [1, *d["shape_signature"][1:]], strict=False)
    it.allocate_tensors()
    x = np.random.default_rng(0).normal(size=[1, *d["shape_signature"][1:]]).astype(np.float32)

    def call():
        it.set_tensor(d["index"], x)
        it.invoke()
    ms = _time(call, runs)
    delegated = any("Delegate" in op.get("op_name", "") for op in it._get_ops_details())
    return ms, delegated


def _say(msg: str) -> None:
    """Progress on stderr, with the process's peak memory so far (a big model's emulation is memory-hungry)."""
    import resource
    import sys
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"[{time.strftime('%H:%M:%S')} peak {peak:.1f} GB] {msg}", file=sys.stderr, flush=True)


def untrained_run(out: Path, family: str, width: float, dataset: str, bits: str) -> None:
    """A run directory with freshly initialized weights and BN statistics calibrated on training images: latency
    does not depend on the weight values, and training MobileNetV2 on 2 shared cores does not fit the budget."""
    from tfbitmeta.quant.bitwidth import parse_bits
    from tfbitmeta.meta.loop import calibration_images
    from tfbitmeta.runs import save_weights
    from tfbitmeta.meta.train import ModelOptions, prepare
    from tfbitmeta.quant.calibration import calibrate_batchnorm


    shutil.rmtree(out, ignore_errors=True)
    tcfg = TrainConfig(dataset=dataset, steps=1, calib_batches=2)
    run, trainer = prepare(out, tcfg, ModelOptions(family=family, width=width, bits=parse_bits(bits), w_eq_a=True))
    calibrate_batchnorm(trainer.model, calibration_images(trainer.splits, trainer.norm, tcfg), trainer.method.covered)
    save_weights(trainer.model, run.path / "model", 0)
    run.update_status(state="untrained (latency benchmark only)")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", required=True)
    ap.add_argument("--untrained", default=None, help="model family: create RUN with untrained weights first")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--bits", default="4,8,fp")
    ap.add_argument("--out-models", default="runs/bench_latency/models")
    ap.add_argument("--runs", type=int, default=100, help="timed calls per file and setting (median)")
    ap.add_argument("--reference-images", type=int, default=50)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/latency_<model>")
    args = ap.parse_args()

    if args.untrained:
        _say(f"creating an untrained {args.untrained} width {args.width:g} run in {args.run}")
        untrained_run(Path(args.run), args.untrained, args.width, args.dataset, args.bits)
    run = RunDir(Path(args.run))
    meta = run.read_meta()
    model = f"{meta['model']['family']}_w{meta['model']['width']:g}"
    _say(f"exporting {model} at {args.bits}")
    manifest = export(Path(args.run), args.bits, "all", Path(args.out_models), verify=False, measure_latency=False,
                      progress=lambda m: None)
    models = Path(args.out_models)
    norm = run.normalization()
    data = datasets.load(TrainConfig.from_dict(meta["train"]).dataset)
    px = norm.pixels(data.x_test[:args.reference_images]).numpy()
    rows = []
    for f in manifest["files"]:
        _say(f"timing {f['path']}")
        row = {"file": f["path"], "kind": f["kind"], "bits": f["bits"]["name"], "split": f["split"],
               "weights": f["weights"], "bytes": f["bytes"]}
        for mode in ("signature", "xnnpack"):
            for t in (1, 2):
                ms, delegated = latency(models / f["path"], t, mode, args.runs)
                row[f"{mode}_{t}_threads_ms"] = round(ms, 4)
                if mode == "xnnpack":
                    row["xnnpack_delegated"] = delegated
        rows.append(row)
    # the integer reference on the big model's files (front end on pixels, backend on its features)
    reference = {}
    for f in manifest["files"]:
        if f["kind"] != "front_end" or f["bits"]["name"] == "fp":
            continue
        _say(f"integer reference on {f['path']} ({len(px)} images)")
        front = (models / f["path"]).read_bytes()
        back = (models / f"backend_{f['bits']['name']}_split{f['split']}.tflite").read_bytes()
        fr = emulate.compare(front, {"image": px})
        br = emulate.compare(back, {"features": run_tflite(front, px)["features"]})
        reference[f["bits"]["name"]] = {"front_end_bit_exact": fr["bit_exact"], "backend_bit_exact": br["bit_exact"],
                                        "ops": sorted(set(fr["ops"]) | set(br["ops"])), "images": len(px)}
    pipeline = {}
    for b in sorted({r["bits"] for r in rows}):
        fr = next(r for r in rows if r["bits"] == b and r["kind"] == "front_end")
        br = next(r for r in rows if r["bits"] == b and r["kind"] == "backend")
        pipeline[b] = {k: round(fr[k] + br[k], 4) for k in fr if k.endswith("_ms")}
        pipeline[b]["bytes"] = fr["bytes"] + br["bytes"]
        pipeline[b]["weights"] = fr["weights"]
    fp = pipeline.get("fp")
    ratios = {b: {k: round(v / fp[k], 3) for k, v in p.items() if k.endswith("_ms")} for b, p in pipeline.items()} if fp else {}
    out = {"command": "uv run python tools/bench_latency.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
           "weights": meta["status"].get("state"),
           "model": model, "params": manifest["model"]["params"], "input": manifest["input"]["shape"],
           "machine": {"cpus": os.cpu_count(), "tensorflow": tf.__version__,
                       "load_average_at_end": os.getloadavg()},
           "rows": rows, "pipeline": pipeline, "pipeline_vs_float32": ratios, "integer_reference": reference,
           "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    p = Path(args.out or f"benchmarks/results/latency_{model}").with_suffix(".json")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("model", "params", "pipeline", "pipeline_vs_float32", "integer_reference")},
                     indent=2))


if __name__ == "__main__":
    main()
