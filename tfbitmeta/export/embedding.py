"""TFLite export of a few-shot ProtoNet embedding at one bitwidth, so prototypes can be computed on device.

Uses the export converter unchanged (:class:`~tfbitmeta.export.graph.ExportGraph`, ``aligned_biases``,
``convert_part``): pixels (float32 0-255, normalization folded into the first conv) in, ``embedding`` out.

BatchNorm: the few-shot evaluation normalizes with the statistics of each episode (transductive, as the
reference); a device embeds one image at a time, so the exported file uses per-bitwidth statistics estimated on
meta-training images (:func:`~tfbitmeta.quant.calibration.calibrate_batchnorm`, the project's deployable BN).
``verify`` reports, on test episodes, the ProtoNet accuracy of the TFLite embeddings, of the Keras model with the
same calibrated statistics, their prediction agreement, and the transductive Keras accuracy for reference; it
passes when the interpreter equals the integer-exact reference (:mod:`tfbitmeta.export.emulate`) bit for bit on
every verify image and the file's kernels are the checkpoint's (float files: prediction agreement >= 99.5 %).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from tfbitmeta.data.episodes import EpisodeSampler, Setting
from tfbitmeta.data.omniglot import load_omniglot
from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.export import emulate
from tfbitmeta.export.convert import check_weights, convert_part, inspect_tflite, manifest_input, run_tflite, write_manifest
from tfbitmeta.export.digest import sha256_file
from tfbitmeta.export.graph import ExportGraph, aligned_biases, container_bits
from tfbitmeta.meta.fewshot.config import SEED_OFFSETS
from tfbitmeta.meta.fewshot.evaluation import load_run
from tfbitmeta.meta.fewshot.protonet import proto_logits
from tfbitmeta.runs import TrainConfig, check_writable
from tfbitmeta.quant.bitwidth import FP, bits_tensor, config_name, parse_config
from tfbitmeta.quant.calibration import calibrate_batchnorm, with_bn_statistics


class EmbeddingPart(tf.Module):
    def __init__(self, bm, cfg, norm, int4: bool = True):
        super().__init__()
        self.graph = ExportGraph(bm.keras, cfg, norm, int4)
        image = bm.keras.inputs[0]
        spec = tf.TensorSpec([None, *image.shape[1:]], tf.float32, name="image")

        def serve(pixels):
            x = tf.quantization.fake_quant_with_min_max_args(pixels, min=0.0, max=255.0, num_bits=8)
            return {"embedding": self.graph.evaluate({"e": bm.keras.output["logits"]}, {id(image): x})["e"]}

        self.serve = tf.function(serve, input_signature=[spec], autograph=False)  # as convert.Part


def _proto_acc(z, setting: Setting) -> tuple[np.ndarray, np.ndarray]:
    ns = setting.ways * setting.shots
    logits = proto_logits(tf.constant(z[:ns]), tf.constant(z[ns:]), setting.ways, setting.shots).numpy()
    pred = np.argmax(logits, -1)
    return pred, pred == np.repeat(np.arange(setting.ways), setting.queries)


def export_embedding(run_path: Path, bits: str, out: Path, int4: bool = True, verify_episodes: int = 50,
                     calib_images: int = 2048, setting: str = "5w1s", progress=print, manifest: bool = True) -> dict:
    meta, fcfg, bm, algo, norm = load_run(run_path)
    if algo.kind != "protonet":
        raise TfbitmetaError(f"{run_path} is a {fcfg.method} run: only ProtoNet embeddings export (MAML fine-tunes "
                             f"on device, which TFLite files cannot do)")
    cfg = bm.cfg.candidates.check(parse_config(bits))
    if cfg != (FP, FP):
        container_bits(max(cfg))  # refuses 16-bit with a clear message
    out = check_writable(out)
    tcfg = TrainConfig.from_dict(meta["train"])
    data = load_omniglot(fcfg.data_dir, seed=tcfg.seed)
    train_x = data.train.images.reshape(-1, *data.train.images.shape[2:])
    idx = np.random.default_rng([tcfg.seed, 99]).permutation(len(train_x))[:calib_images]
    calib = norm.apply(train_x[idx]).numpy()
    progress(f"calibrating BatchNorm at {config_name(cfg)} on {len(idx)} training images")
    calibrate_batchnorm(bm.keras, [calib[i:i + 256] for i in range(0, len(calib), 256)], [cfg], progress=False)
    name = f"embedding_{config_name(cfg)}.tflite"
    with aligned_biases(bm.keras, cfg, norm, int4):
        part = EmbeddingPart(bm, cfg, norm, int4)
        rep = norm.pixels(train_x[idx[:200]]).numpy()
        progress(f"converting {name}")
        buf = convert_part(part, rep, quantized=cfg != (FP, FP))
        (out / name).write_bytes(buf)
        info = inspect_tflite(buf)
        quantized = cfg != (FP, FP)
        entry = {"path": name, "kind": "embedding", "bits": {"w": cfg[0], "a": cfg[1], "name": config_name(cfg)},
                 "bytes": len(buf), "signature": info["signature"],
                 "weights": ("int4+int8" if "INT4" in info["weight_types"] else "int8") if quantized else "float32",
                 "sha256": sha256_file(out / name), "weight_types": info["weight_types"], "inputs": info["inputs"],
                 "outputs": info["outputs"], "embedding_dim": int(bm.keras.output["logits"].shape[-1]),
                 "input": {"shape": [1, *bm.cfg.input_shape], "pixels": "float32 0-255, strokes bright (inverted "
                           "Omniglot), resized to 28x28", "normalization": norm.to_dict()},
                 "prototypes": "class mean of support embeddings; predict the nearest by squared Euclidean distance",
                 "bn": "per-bitwidth statistics calibrated on meta-training images"}
        if verify_episodes:
            s = Setting.parse(setting, 15)
            sampler = EpisodeSampler(data.test.images, s, tcfg.seed + SEED_OFFSETS["test"], "test")
            lite_ok, keras_ok, trans_ok, agree, pixels = [], [], [], [], []
            calibrated = with_bn_statistics(bm.keras, "calibrated")
            for i in range(verify_episodes):
                ep = sampler.episode(i)
                x_u8 = np.concatenate([ep.support, ep.query])
                pixels.append(norm.pixels(x_u8).numpy())
                z_lite = run_tflite(buf, pixels[-1])["embedding"]
                x = norm.apply(x_u8)
                z_keras = calibrated([x, bits_tensor(cfg, len(x))], training=False)["logits"].numpy()
                z_trans = bm.keras([x, bits_tensor(cfg, len(x))], training=True)["logits"].numpy()
                p_lite, ok_lite = _proto_acc(z_lite, s)
                p_keras, ok_keras = _proto_acc(z_keras, s)
                lite_ok.append(ok_lite.mean())
                keras_ok.append(ok_keras.mean())
                trans_ok.append(_proto_acc(z_trans, s)[1].mean())
                agree.append(np.mean(p_lite == p_keras))
            entry["verify"] = {"setting": s.name, "episodes": verify_episodes,
                               "tflite_acc": float(np.mean(lite_ok)), "keras_calibrated_acc": float(np.mean(keras_ok)),
                               "keras_transductive_acc": float(np.mean(trans_ok)),
                               "prediction_agreement": float(np.mean(agree))}
            cmp = emulate.compare(buf, {"image": np.concatenate(pixels).astype(np.float32)})
            v = entry["verify"]
            v["integer_reference"] = {"bit_exact": cmp["bit_exact"], "integer": cmp["integer"], "ops": cmp["ops"],
                                      "outputs": cmp["outputs"]}
            if cmp["integer"]:
                v["weights"] = check_weights(buf, part.graph)
                v["passed"] = bool(cmp["bit_exact"] and v["weights"]["passed"])
            else:
                v["passed"] = v["prediction_agreement"] >= 0.995
    if manifest:
        write_embedding_manifest(out, [entry], bm, norm, fcfg)
    return entry


def write_embedding_manifest(out: Path, entries: list[dict], bm, norm, fcfg) -> dict:
    """``manifest.json`` of embedding files, with the one manifest writer of every exporter (the files are
    already in ``out``)."""
    labels = [f"way{i}" for i in range(max(2, fcfg.ways))]  # classes are the device's prototypes
    # a ProtoNet embedding has no classifier (num_classes 0 in its model config): its classes are the N ways
    num_classes = int(bm.cfg.num_classes) if bm.cfg.num_classes >= 2 else len(labels)
    model = {"family": bm.cfg.family, "width": bm.cfg.width, "scheme": bm.cfg.scheme,
             "num_classes": num_classes, "exits": [], "candidate_bits": list(bm.cfg.candidates.bits)}
    return write_manifest(out, out, entries, model, labels, manifest_input(norm, bm.cfg.input_shape),
                          f"tfbitmeta convert (few-shot {fcfg.method} embedding)")


def export_embeddings(run_path: Path, bits: str, out: Path, **kw) -> dict:
    """One embedding file per bitwidth in ``bits`` (comma list) and one manifest."""
    entries = [export_embedding(run_path, b, out, manifest=False, **kw) for b in bits.split(",") if b.strip()]
    _, fcfg, bm, _, norm = load_run(run_path)
    return write_embedding_manifest(out, entries, bm, norm, fcfg)
