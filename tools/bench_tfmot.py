"""tfmot's own 8-bit QAT next to our 8-bit export of the one MEBQAT model, same data, steps and architecture.

* ours: ``tfbitmeta`` MEBQAT (svhn_cnn, exact scheme, candidates 1-8/16/fp), exported at 8 bit as front end
  (exit 3) + backend (split 3), the deployed pipeline of the device/server split;
* tfmot: the same layer stack built from plain Keras layers, ``tfmot.quantization.keras.quantize_model`` (default
  8-bit scheme), trained with the same optimizer, schedule, batches and number of steps, converted with the
  standard converter (``optimizations=[DEFAULT]``, float interface, int8 inside).

Per model: Keras (fake-quant) test accuracy, TFLite test accuracy, top-1 agreement Keras vs TFLite, file bytes,
batch-1 latency (1 and 2 threads), and whether our integer reference (tfbitmeta.export.emulate) reproduces the
file bit for bit.  Writes benchmarks/results/tfmot_fashion_mnist.json (command in benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfbitmeta.data import datasets
from tfbitmeta.data.pipeline import Normalization, train_batches
from tfbitmeta.export import deployed, emulate
from tfbitmeta.export.convert import _quiet, latency_ms, run_tflite
from tfbitmeta.meta.evaluate import Predictor
from tfbitmeta.meta.loop import lr_schedule
from tfbitmeta.runs import RunDir, TrainConfig
from tfbitmeta.meta.train import ModelOptions, set_determinism, train
from tfbitmeta.quant.bitwidth import DEFAULT_BITS


def plain_svhn_cnn(input_shape, num_classes: int, ep: int, dropout: float = 0.5) -> tf.keras.Model:
    """tfbitmeta's svhn_cnn (models/svhn_cnn.py) from standard Keras layers, for tfmot."""
    L = tf.keras.layers
    size = min(input_shape[:2])
    final_k = (((size - 4) // 2) // 2) - 4
    x = inp = tf.keras.Input(input_shape)
    x = L.ReLU()(L.MaxPool2D(2)(L.Conv2D(6 * ep, 5, padding="valid")(x)))
    for filters, padding, pool in ((8 * ep, "same", False), (8 * ep, "same", True), (16 * ep, "valid", False),
                                   (16 * ep, "same", False), (16 * ep, "valid", False)):
        x = L.BatchNormalization(epsilon=1e-5)(L.Conv2D(filters, 3, padding=padding, use_bias=False)(x))
        if pool:
            x = L.MaxPool2D(2)(x)
        x = L.ReLU()(x)
    x = L.ReLU()(L.Conv2D(64 * ep, final_k, padding="valid", use_bias=False)(L.Dropout(dropout)(x)))
    return tf.keras.Model(inp, L.Dense(num_classes)(L.Flatten()(x)))


def train_tfmot(splits, norm: Normalization, steps: int, batch_size: int, lr: float, seed: int, ep: int):
    import tensorflow_model_optimization as tfmot

    set_determinism(seed)
    base = plain_svhn_cnn(norm.model_input_shape(splits.image_shape[-1]), splits.num_classes, ep)
    model = tfmot.quantization.keras.quantize_model(base)
    cfg = TrainConfig()
    opt = tf.keras.optimizers.AdamW(lr_schedule(lr, steps), weight_decay=cfg.weight_decay)
    ce = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = ce(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip([tf.clip_by_value(g, -cfg.clip, cfg.clip) for g in grads], model.trainable_variables))
        return loss

    t0, done, epoch = time.perf_counter(), 0, 0
    while done < steps:
        for x, y in train_batches(splits.x_train, splits.y_train, norm, batch_size, seed, epoch):
            step(x, y)
            done += 1
            if done >= steps:
                break
        epoch += 1
    return model, time.perf_counter() - t0


def keras_probs(model, x, batch=256):
    return np.concatenate([tf.nn.softmax(model(x[i:i + batch], training=False)).numpy() for i in range(0, len(x), batch)])


def reference_check(buf: bytes, feeds: dict, n: int) -> dict:
    try:
        r = emulate.compare(buf, {k: v[:n] for k, v in feeds.items()})
        return {"bit_exact": r["bit_exact"], "ops": r["ops"], "images": n,
                "outputs": {k: {kk: vv for kk, vv in o.items()} for k, o in r["outputs"].items()}}
    except emulate.UnsupportedOp as e:
        return {"bit_exact": False, "unsupported": str(e)}


def side_by_side(run_dir: Path, splits, work: Path, steps: int, batch_size: int, lr: float, seed: int, width: int,
                 reference_images: int = 2000) -> dict:
    """Our 8-bit export of the MEBQAT run in ``run_dir`` next to tfmot's 8-bit QAT of the same layers, trained
    here with ``steps`` steps of ``batch_size`` (the run's own optimizer, schedule and batches): ``{"ours_8bit",
    "tfmot_qat8", "ratios", "note"}``.  Files go to ``work``.  Used by this tool and by ``bench_mebqat.py``
    (its ``tfmot`` row)."""
    work.mkdir(parents=True, exist_ok=True)
    run = RunDir(run_dir)
    bm, norm = run.load_model(), run.normalization()
    meta = run.read_meta()
    xt, yt = norm.apply(splits.x_test).numpy(), splits.y_test
    pt = norm.pixels(splits.x_test).numpy()
    rep_px, rep = norm.pixels(splits.x_val[:200]).numpy(), norm.apply(splits.x_val[:200]).numpy()

    # -- ours: the one MEBQAT model, 8-bit front end + backend ------------------------------------------------
    cfg, split = (8, 8), bm.exits[-1]
    bufs = deployed.deployed_parts(bm, cfg, norm, split, rep_px, rep)
    files = {k: work / f"ours_{k}_8.tflite" for k in bufs}
    for k, b in bufs.items():
        files[k].write_bytes(b)
    keras_ours = Predictor(bm.keras)(tf.constant(xt), cfg)["logits"].numpy()
    front = run_tflite(bufs["front_end"], pt)
    lite_ours = run_tflite(bufs["backend"], front["features"])["probs"]
    ours = {"model": "tfbitmeta MEBQAT (one model, all bitwidths), exported at 8 bit: front end + backend",
            "keras_accuracy": float(np.mean(keras_ours.argmax(-1) == yt)),
            "tflite_accuracy": float(np.mean(lite_ours.argmax(-1) == yt)),
            "top1_agreement": float(np.mean(keras_ours.argmax(-1) == lite_ours.argmax(-1))),
            "bytes": sum(len(b) for b in bufs.values()), "bytes_per_file": {k: len(b) for k, b in bufs.items()},
            "latency_ms_batch1": {f"{t}_threads": round(sum(latency_ms(p, t, runs=200) for p in files.values()), 4)
                                  for t in (1, 2)},
            "train_seconds": meta["status"]["train_seconds"], "steps": meta["status"]["steps"],
            "backward_passes": meta["status"]["backward_passes"],
            "integer_reference": {"front_end": reference_check(bufs["front_end"], {"image": pt}, reference_images),
                                  "backend": reference_check(bufs["backend"], {"features": front["features"]},
                                                             reference_images)}}

    # -- tfmot: quantize_model on the same architecture -------------------------------------------------------
    qat, seconds = train_tfmot(splits, norm, steps, batch_size, lr, seed, width)
    keras_tfmot = keras_probs(qat, xt)
    conv = tf.lite.TFLiteConverter.from_keras_model(qat)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    with _quiet():
        buf = conv.convert()
    path = work / "tfmot_qat8.tflite"
    path.write_bytes(buf)
    name = next(iter(emulate.TfliteProgram(buf).inputs))
    lite_tfmot = run_tflite(buf, xt)
    lite_tfmot = lite_tfmot[next(iter(lite_tfmot))]
    lite_tfmot = lite_tfmot if np.allclose(lite_tfmot.sum(-1), 1, atol=0.05) else tf.nn.softmax(lite_tfmot).numpy()
    tfm = {"model": "tfmot quantize_model (default 8-bit scheme), same layers, standard converter",
           "keras_accuracy": float(np.mean(keras_tfmot.argmax(-1) == yt)),
           "tflite_accuracy": float(np.mean(lite_tfmot.argmax(-1) == yt)),
           "top1_agreement": float(np.mean(keras_tfmot.argmax(-1) == lite_tfmot.argmax(-1))),
           "bytes": len(buf), "latency_ms_batch1": {f"{t}_threads": round(latency_ms(path, t, runs=200), 4)
                                                    for t in (1, 2)},
           "train_seconds": round(seconds, 2), "steps": steps, "backward_passes": steps,
           "integer_reference": reference_check(buf, {name: xt}, reference_images)}
    return {"ours_8bit": ours, "tfmot_qat8": tfm,
            "ratios": {"accuracy_pp_tflite_ours_minus_tfmot": round(100 * (ours["tflite_accuracy"] - tfm["tflite_accuracy"]), 2),
                       "bytes_ours_over_tfmot": round(ours["bytes"] / tfm["bytes"], 3),
                       "latency_1thread_ours_over_tfmot": round(ours["latency_ms_batch1"]["1_threads"] /
                                                                tfm["latency_ms_batch1"]["1_threads"], 3)},
            "note": "ours is ONE model trained for every bitwidth (4 bitwidth tasks per step); tfmot trains one "
                    "8-bit model (1 task per step); same steps and batches. Ours is two files (device front end with "
                    "an early exit + server backend); latency is their sum."}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--width", type=int, default=2)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/bench_tfmot")
    ap.add_argument("--reuse", action="store_true", help="reuse the MEBQAT run in --work")
    ap.add_argument("--reference-images", type=int, default=2000, help="images for the bit-exactness check")
    ap.add_argument("--out", default="benchmarks/results/tfmot_fashion_mnist")
    args = ap.parse_args()

    work = Path(args.work)
    splits = datasets.load(args.dataset, seed=args.seed)
    run_dir = work / "mebqat"
    if not args.reuse:
        shutil.rmtree(run_dir, ignore_errors=True)
        train(run_dir, TrainConfig(method="mebqat", dataset=args.dataset, steps=args.steps, batch_size=args.batch_size,
                                   lr=args.lr, seed=args.seed, ckpt_every=500),
              ModelOptions(family="svhn_cnn", width=args.width, scheme="exact", bits=DEFAULT_BITS), progress=False)
    result = side_by_side(run_dir, splits, work, args.steps, args.batch_size, args.lr, args.seed, args.width,
                          args.reference_images)
    out = {"command": "uv run python tools/bench_tfmot.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False, True)),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "tensorflow": tf.__version__},
           "settings": vars(args), **result, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    p = Path(args.out).with_suffix(".json")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("ours_8bit", "tfmot_qat8", "ratios")}, indent=2, default=str))


if __name__ == "__main__":
    main()
