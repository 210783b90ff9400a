"""TFLite export of a ``tfbitmeta simulate`` run: every client's personalized front end and the server backend.

    uv run tfbitmeta convert runs/sfl --out models/sfl --verify

Per client ``client<k>_front.tflite`` (pixels in; ``exit_probs`` and the split-point ``features`` out, at the
client's own bitwidth) and one ``backend.tflite`` (``features`` in, ``probs`` out), with a ``manifest.json`` valid
against the same schema as the MEBQAT export.  The files are float32 graphs that compute the client's quantized
arithmetic exactly (weights stored already on their integer grid, activations rounded to ``j/(2^k-1)``); unlike
the MEBQAT export they are not full-integer models (README, "Federated simulation").
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfbitmeta.export.convert import AGREEMENT_TARGET
from tfbitmeta.federated import architectures as A
from tfbitmeta.federated import backend


def is_federated_run(run: Path) -> bool:
    return (run / "checkpoints" / "server.npz").exists() and (run / "results.json").exists()


def _load_npz(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


class _Front(tf.Module):
    def __init__(self, weights: dict, head: dict, arch: A.Arch, bits: int, mean: float, std: float, image_shape):
        super().__init__()
        b = tf.constant([float(bits), float(bits)])
        w = {k: tf.constant(v) for k, v in weights.items()}
        h = {k: tf.constant(v) for k, v in head.items()}

        def serve(pixels):
            x = (pixels / 255.0 - mean) / std
            feats = A.extract(w, arch, x, b)
            return {"exit_probs": tf.nn.softmax(A.exit_logits(h, feats, b)), "features": feats}
        self.serve = tf.function(serve, input_signature=[tf.TensorSpec([None, *image_shape], tf.float32, name="image")])


class _Back(tf.Module):
    def __init__(self, weights: dict, feature_shape):
        super().__init__()
        w = {k: tf.constant(v) for k, v in weights.items()}
        self.serve = tf.function(lambda f: {"probs": tf.nn.softmax(backend.logits(w, f))},
                                 input_signature=[tf.TensorSpec([None, *feature_shape], tf.float32, name="features")])


def _convert(module: tf.Module) -> bytes:
    from tfbitmeta.export.convert import convert_part

    return convert_part(module, None, quantized=False)


def export_federated(run: Path, out: Path, verify: bool = True, n_verify: int = 1000, progress=print) -> dict:
    """Writes the files and manifest.json into ``out`` (all or nothing) and returns the manifest."""
    from tfbitmeta.export.convert import MANIFEST_VERSION, inspect_tflite, validate_manifest
    from tfbitmeta.export.digest import sha256_file
    from tfbitmeta.federated.simulation import SimConfig, Simulation
    from tfbitmeta.meta.run import check_writable

    results = json.loads((run / "results.json").read_text())
    cfg = SimConfig(**{**results["config"], "engine": "tf", "rounds": 1})
    sim = Simulation(cfg, progress=False)           # data, normalization and architectures exactly as trained
    ck = run / "checkpoints"
    server = _load_npz(ck / "server.npz")
    check_writable(out)
    image_shape = tuple(sim.x_train.shape[1:])
    fshape = sim.feature_shape
    x_test = sim.x_test[:n_verify]
    files, tmp = [], Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        # pixels of the test images (the front end takes raw 0-255 values and normalizes itself)
        data_mean, data_std = sim.norm_stats
        pixels = (x_test * data_std + data_mean) * 255.0
        back_path = tmp / "backend.tflite"
        back_path.write_bytes(_convert(_Back(server, fshape)))
        for k in range(cfg.clients):
            z = _load_npz(ck / f"client{k}.npz")
            arch = A.ARCHITECTURES[str(z["architecture"])]
            bits = int(z["bits"])
            weights = {n[len("extractor/"):]: v for n, v in z.items() if n.startswith("extractor/")}
            head = {n[len("head/"):]: v for n, v in z.items() if n.startswith("head/")}
            path = tmp / f"client{k}_front.tflite"
            path.write_bytes(_convert(_Front(weights, head, arch, bits, data_mean, data_std, image_shape)))
            info = inspect_tflite(path.read_bytes())
            entry = {"path": path.name, "kind": "front_end", "client": k, "architecture": arch.name,
                     "bits": {"w": bits, "a": bits, "name": "fp" if bits >= 32 else f"w{bits}a{bits}"},
                     "exit": 2, "split": 2, "sha256": sha256_file(path), "bytes": path.stat().st_size, "weights": "float32",
                     "signature": info["signature"], "inputs": info["inputs"], "outputs": info["outputs"],
                     "exit_threshold": cfg.threshold, "id_classes": [int(c) for c in sim.parts[k].id_classes]}
            if verify:
                entry["verify"] = _verify_front(path, back_path, (weights, head, arch, bits), server, pixels, x_test)
            files.append(entry)
            progress(f"client {k}: {arch.name} at {bits} bit -> {path.name}"
                     + (f" (agreement {100 * entry['verify']['top1_agreement']:.2f}%)" if verify else ""))
        info = inspect_tflite(back_path.read_bytes())
        files.append({"path": back_path.name, "kind": "backend", "bits": {"w": 32, "a": 32, "name": "fp"}, "exit": None,
                      "split": 2, "sha256": sha256_file(back_path), "bytes": back_path.stat().st_size, "weights": "float32",
                      "signature": info["signature"], "inputs": info["inputs"], "outputs": info["outputs"]})
        manifest = {
            "format": "tfbitmeta-manifest", "version": MANIFEST_VERSION, "created_by": f"tfbitmeta simulate ({cfg.algorithm})",
            "model": {"family": "federated:" + cfg.architectures, "scheme": "exact", "num_classes": sim.num_classes,
                      "exits": [2], "candidate_bits": sorted({int(b) for b in sim.client_bits})},
            "labels": [str(c) for c in sim.class_names],
            "input": {"shape": [1, *image_shape], "dtype": "float32",
                      "normalization": {"formula": "x = (pixels / 255 - mean) / std, inside the front end",
                                        "mean": [float(data_mean)], "std": [float(data_std)], "source_dtype": "uint8",
                                        "image_size": [int(image_shape[0]), int(image_shape[1])]}},
            "files": files}
        validate_manifest(manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        for p in tmp.iterdir():
            p.replace(out / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _verify_front(front: Path, back: Path, client, server: dict, pixels: np.ndarray, x_norm: np.ndarray) -> dict:
    """TFLite front end (and backend on its features) vs the simulation's TF functions on the same weights."""
    from tfbitmeta.export.convert import run_tflite

    weights, head, arch, b = client
    bits = tf.constant([float(b), float(b)])
    feats = A.extract({n: tf.constant(v) for n, v in weights.items()}, arch, tf.constant(x_norm), bits)
    ref_exit = tf.nn.softmax(A.exit_logits({n: tf.constant(v) for n, v in head.items()}, feats, bits)).numpy()
    ref_server = tf.nn.softmax(backend.logits({n: tf.constant(v) for n, v in server.items()}, feats)).numpy()
    got = run_tflite(front, pixels.astype(np.float32))
    got_server = run_tflite(back, got["features"])["probs"]
    agree = float(np.mean(got["exit_probs"].argmax(-1) == ref_exit.argmax(-1)))
    agree_server = float(np.mean(got_server.argmax(-1) == ref_server.argmax(-1)))
    return {"top1_agreement": agree, "backend_top1_agreement": agree_server,
            "max_abs_dprob": float(np.abs(got["exit_probs"] - ref_exit).max()),
            "features_equal_fraction": float(np.mean(np.isclose(got["features"], feats.numpy(), atol=1e-4))),
            "images": int(len(pixels)), "passed": bool(min(agree, agree_server) >= AGREEMENT_TARGET)}
