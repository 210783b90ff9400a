"""``tfbitmeta convert``: one checkpoint -> TFLite files per bitwidth and exit, a manifest, and verification.

Per (bitwidth, exit s):
* ``front_<bits>_exit<s>.tflite`` -- device front end: normalized float32 image in, ``exit_probs`` and
  ``features`` (the split-point tensor sent to the server on fallback) out; full-integer inside.
* ``backend_<bits>_split<s>.tflite`` -- server backend: ``features`` in, ``probs`` out.
Full precision is exported as float32 (optionally float16).  Files are written to a temporary folder and moved
into place only when all of them converted, the manifest last.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfbitmeta.data import datasets
from tfbitmeta.errors import BadArgument, TfbitmetaError
from tfbitmeta.export.digest import sha256_file
from tfbitmeta.export import deployed, emulate
from tfbitmeta.export.graph import ExportGraph, aligned_biases, container_bits
from tfbitmeta.runs import RunDir, TrainConfig, check_writable
from tfbitmeta.models import BitModel
from tfbitmeta.quant.bitwidth import FP, Config, bits_tensor, config_name

MANIFEST_VERSION = 1
AGREEMENT_TARGET = 0.995


def manifest_schema() -> dict:
    return json.loads(resources.files("tfbitmeta.export").joinpath("manifest.schema.json").read_text())


def validate_manifest(manifest: dict) -> None:
    import jsonschema

    jsonschema.validate(manifest, manifest_schema())


def config_kind(cfg: Config) -> str:
    """"float" (fp), "weight_only" (k-bit weights, float activations, e.g. w2afp: a float32 file whose weights lie
    on the k-bit grid) or "integer" (full-integer file); refuses configurations with no TFLite container."""
    w, a = int(cfg[0]), int(cfg[1])
    if (w, a) == (FP, FP):
        return "float"
    if a == FP:
        container_bits(w)
        return "weight_only"
    container_bits(max(w, a))
    return "integer"


# -- building and converting one part ------------------------------------------------------------------
class Part(tf.Module):
    """A tf.Module with one ``serve`` function: the export graph of a front end or a backend."""

    def __init__(self, bm: BitModel, cfg: Config, kind: str, split: int, normalization, int4: bool = True):
        super().__init__()
        self.graph = ExportGraph(bm.keras, cfg, normalization if kind == "front_end" else None, int4)
        self.kind, self.split = kind, split
        image = bm.keras.inputs[0]
        feats_kt = bm.boundaries[split]
        if kind == "front_end":
            spec = tf.TensorSpec([None, *image.shape[1:]], tf.float32, name="image")

            def serve(pixels):
                # pin the input quantization to whole pixel values (scale 1): the int8 input is exact
                x = tf.quantization.fake_quant_with_min_max_args(pixels, min=0.0, max=255.0, num_bits=8)
                out = self.graph.evaluate({"exit": bm.keras.output[f"exit{split}"], "features": feats_kt}, {id(image): x})
                return {"exit_probs": tf.nn.softmax(out["exit"]), "features": out["features"]}
        else:
            spec = tf.TensorSpec([None, *feats_kt.shape[1:]], tf.float32, name="features")

            def serve(f):
                out = self.graph.evaluate({"logits": bm.keras.output["logits"]},
                                          {id(feats_kt): self.graph.pin_input(feats_kt, f)})
                return {"probs": tf.nn.softmax(out["logits"])}
        # no AutoGraph: the graph walk is plain Python over layers with no tensor control flow to convert (and
        # AutoGraph's wrapped calls were what first overflowed the recursion limit on MobileNetV2 at width 1)
        self.serve = tf.function(serve, input_signature=[spec], autograph=False)


def convert_part(part: Part, representative: np.ndarray, quantized: bool, float16: bool = False) -> bytes:
    fn = part.serve.get_concrete_function()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn], part)
    if quantized:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([representative[i:i + 1]] for i in range(len(representative)))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif float16:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    with _quiet():
        return conv.convert()


@contextlib.contextmanager
def _quiet():
    """The converter prints MLIR chatter on stdout/stderr at C++ level; keep the CLI readable."""
    with open(os.devnull, "w") as devnull:
        saved = os.dup(2)
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# -- inspecting a file -------------------------------------------------------------------------------------
def _schema():
    from tensorflow.lite.python import schema_py_generated as schema

    return schema


def inspect_tflite(buf: bytes) -> dict:
    """Signature tensors (with the quantization of the int8 tensor behind each float output), weight types
    and buffer bytes, read from the flatbuffer."""
    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(buf, 0)
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    g = model.subgraphs[0]
    producers = {o: op for op in g.operators for o in op.outputs}
    opcode = {i: c.builtinCode if c.builtinCode else c.deprecatedBuiltinCode for i, c in enumerate(model.operatorCodes)}

    def tensor(idx, name):
        t = g.tensors[idx]
        info = {"name": name, "shape": [int(d) for d in (t.shapeSignature if t.shapeSignature is not None else t.shape)],
                "dtype": type_names[t.type].lower(), "quantization": None}
        q = t.quantization
        op = producers.get(idx)
        if op is not None and opcode[op.opcodeIndex] == schema.BuiltinOperator.DEQUANTIZE:
            src = g.tensors[op.inputs[0]]
            q = src.quantization
            info["quantization_dtype"] = type_names[src.type].lower()
        if q is not None and q.scale is not None and len(q.scale) == 1:
            info["quantization"] = {"scale": float(q.scale[0]), "zero_point": int(q.zeroPoint[0]),
                                    "dtype": info.pop("quantization_dtype", type_names[t.type].lower())}
        info.pop("quantization_dtype", None)
        return info

    sig = model.signatureDefs[0]
    inputs = [tensor(t.tensorIndex, t.name.decode()) for t in sig.inputs]
    outputs = [tensor(t.tensorIndex, t.name.decode()) for t in sig.outputs]
    weight_types, buffer_bytes = {}, 0
    for t in g.tensors:
        data = model.buffers[t.buffer].data
        if data is not None and len(data) > 0:
            buffer_bytes += len(data)
            if t.shape is not None and len(t.shape) == 4:
                name = type_names[t.type]
                weight_types[name] = weight_types.get(name, 0) + 1
    return {"signature": sig.signatureKey.decode(), "inputs": inputs, "outputs": outputs,
            "weight_types": weight_types, "buffer_bytes": buffer_bytes}


def analyzer_types(path: Path) -> set[str]:
    """Tensor types as tf.lite.experimental.Analyzer reports them (the source of truth for INT4)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        tf.lite.experimental.Analyzer.analyze(model_path=str(path))
    text = out.getvalue()
    return {t for t in ("INT4", "INT8", "INT32", "FLOAT32", "FLOAT16") if f"type:{t}" in text.replace(" ", "")}


def latency_ms(path: Path, threads: int, runs: int = 50) -> float:
    it = tf.lite.Interpreter(model_path=str(path), num_threads=threads)
    runner = it.get_signature_runner()
    name, detail = next(iter(runner.get_input_details().items()))
    x = np.random.default_rng(0).normal(size=[1, *detail["shape_signature"][1:]]).astype(np.float32)
    runner(**{name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        runner(**{name: x})
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def run_tflite(buf_or_path, x: np.ndarray, batch: int = 256) -> dict:
    it = tf.lite.Interpreter(model_path=str(buf_or_path)) if isinstance(buf_or_path, (str, Path)) else \
        tf.lite.Interpreter(model_content=buf_or_path)
    runner = it.get_signature_runner()
    name = next(iter(runner.get_input_details()))
    outs = [runner(**{name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


# -- the whole export --------------------------------------------------------------------------------------


def parse_exits(spec: str, bm: BitModel) -> list[int]:
    if spec.strip().lower() == "all":
        return list(bm.exits)
    out = []
    for t in spec.split(","):
        try:
            s = int(t)
        except ValueError:
            raise BadArgument(f"bad exit {t!r}: use 'all' or split numbers like 3", param="exits") from None
        bm._check_exit(s)
        out.append(s)
    return out


def backend_model_name(path: str) -> str:
    """The server-side model name of a backend file: its stem (what ``POST /v1/models/{name}:predict`` takes)."""
    return Path(path).stem


def export_part(bm: BitModel, cfg: Config, kind: str, split: int, norm, path: Path, representative: np.ndarray,
                float16: bool = False, int4: bool = True, measure_latency: bool = True) -> tuple[dict, "Part", bytes]:
    """Convert one part of ``bm`` (``kind`` front_end or backend, cut at ``split``) at configuration ``cfg`` to
    ``path`` with the export graph (full-integer for integer configurations, float32 weights on the k-bit grid for
    weight-only ones such as w2afp, float for fp) and return its manifest entry, the part (whose ``graph`` the
    verification checks the file's kernels against) and the file's bytes.  Call it inside ``aligned_biases(bm.keras, cfg, norm,
    int4)``, as the Keras reference of ``--verify`` is that model."""
    kind_of_cfg = config_kind(cfg)
    quantized = kind_of_cfg == "integer"
    part_int4 = int4 and quantized  # weight-only files keep float32 weights on the k-bit grid
    part = Part(bm, cfg, kind, split, norm, part_int4)
    buf = convert_part(part, representative, quantized, float16 and kind_of_cfg == "float")
    path.write_bytes(buf)
    info = inspect_tflite(buf)
    limit = part.graph.weight_limit_bytes()
    entry = {
        "path": path.name, "kind": kind, "bits": {"w": cfg[0], "a": cfg[1], "name": config_name(cfg)},
        "exit": split if kind == "front_end" else None, "split": split,
        "sha256": sha256_file(path), "bytes": len(buf),
        "weights": ("int4+int8" if "INT4" in info["weight_types"] else "int8") if quantized else
                   ("float16" if float16 and kind_of_cfg == "float" else "float32"),
        "signature": info["signature"], "inputs": info["inputs"], "outputs": info["outputs"],
        "size": {"bytes": len(buf), "weight_buffers_bytes": info["buffer_bytes"],
                 "weights_limit_bytes": int(limit), "fixed_overhead_bytes": len(buf) - info["buffer_bytes"],
                 "weight_types": info["weight_types"],
                 "within_1.2x_limit": bool(info["buffer_bytes"] <= 1.2 * limit + 64)},
    }
    if kind_of_cfg == "weight_only":
        entry["weight_grid_bits"] = int(cfg[0])
    if measure_latency:
        entry["latency_ms"] = {f"{t}_threads": round(latency_ms(path, t), 4) for t in (1, 2)}
    return entry, part, buf


def manifest_input(norm, input_shape) -> dict:
    return {"shape": [1, *input_shape], "dtype": "float32",
            "normalization": {"formula": "front ends take pixels: round(resize(x_uint8)) as float32 in [0, 255]; "
                                         "(p * input_scale - mean) / std is folded into the first layer "
                                         "(Keras models and backends use the normalized values)",
                              "mean": norm.mean, "std": norm.std, "source_dtype": norm.input_dtype,
                              "input_scale": norm.input_scale, "image_size": norm.image_size}}


def write_manifest(out: Path, staged: Path, files: list[dict], model: dict, labels: list[str], input_: dict,
                   created_by: str) -> dict:
    """The one manifest writer of every exporter: validates the manifest (schema + every front end names a
    backend listed in it), moves the staged files into ``out`` and writes ``manifest.json`` last."""
    manifest = {"format": "tfbitmeta-manifest", "version": MANIFEST_VERSION, "created_by": created_by,
                "model": model, "labels": [str(c) for c in labels], "input": input_, "files": files}
    validate_manifest(manifest)
    backends = {backend_model_name(f["path"]) for f in files if f["kind"] == "backend"}
    for f in files:
        if f["kind"] == "front_end" and f["backend"] not in backends:
            raise TfbitmetaError(f"export: {f['path']} names backend {f['backend']!r}, which is not exported")
    for f in files:
        for path in (f["path"], (f.get("router") or {}).get("path")):  # a router file travels with its front end
            if path:
                os.replace(staged / path, out / path)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def export(run_path: Path, bits: str, exits: str, out: Path, verify: bool = True, float16: bool = False, int4: bool = True,
           n_verify: int = 1000, n_representative: int = 200, measure_latency: bool = True, progress=print,
           n_threshold: int = 5000, max_exit_loss: float = deployed.DEFAULT_MAX_LOSS) -> dict:
    run = RunDir(run_path)
    meta = run.read_meta()
    bm = run.load_model("model" if (run.path / "model").exists() else "best")
    configs = bm.cfg.candidates.parse(bits)
    for cfg in configs:
        config_kind(cfg)  # refuses 16-bit with a clear message
    splits_to_export = parse_exits(exits, bm)
    if not splits_to_export:
        raise TfbitmetaError("the model has no early-exit head to export")
    out = check_writable(out)
    norm = run.normalization()
    tcfg = TrainConfig.from_dict(meta["train"])
    data = datasets.load(tcfg.dataset, seed=tcfg.seed)
    rep_pixels = norm.pixels(data.x_val[:n_representative]).numpy()
    rep = norm.apply(data.x_val[:n_representative]).numpy()
    yv = data.y_val
    pv = norm.pixels(data.x_val[:n_threshold]).numpy()
    pt = norm.pixels(data.x_test[:n_verify]).numpy()
    xt, yt = norm.apply(data.x_test[:n_verify]).numpy(), data.y_test[:n_verify]

    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    files = []
    try:
        for cfg in configs:
            alignment = []  # how far each folded bias moved onto the int32 grid (graph.aligned_biases)
            kind_of_cfg = config_kind(cfg)
            cfg_int4 = int4 and kind_of_cfg == "integer"  # weight-only files keep float32 weights on the k-bit grid
            with aligned_biases(bm.keras, cfg, norm, cfg_int4, alignment):
                b = bits_tensor(cfg, 1)
                name = config_name(cfg)
                keras_test = bm.keras([xt, bits_tensor(cfg, len(xt))], training=False)
                for split in splits_to_export:
                    feats_rep = bm.extractor(split)([rep, tf.tile(b, [len(rep), 1])], training=False).numpy()
                    bufs, entries = {}, {}
                    back = f"backend_{name}_split{split}.tflite"
                    for kind in ("front_end", "backend"):
                        fname = f"front_{name}_exit{split}.tflite" if kind == "front_end" else back
                        progress(f"converting {fname}")
                        entry, part, buf = export_part(bm, cfg, kind, split, norm, tmp / fname,
                                                       rep_pixels if kind == "front_end" else feats_rep, float16,
                                                       int4, measure_latency)
                        entry["exit_threshold"] = None
                        if kind == "front_end":
                            entry["backend"] = backend_model_name(back)
                        if verify:
                            if kind == "front_end":
                                entry["verify"] = verify_front(buf, part.graph, pt, keras_test[f"exit{split}"], yt)
                            else:
                                feats = bm.extractor(split)([xt, bits_tensor(cfg, len(xt))], training=False).numpy()
                                entry["verify"] = verify_backend(buf, part.graph, feats, keras_test["logits"], yt)
                        bufs[kind], entries[kind] = buf, entry
                        files.append(entry)
                    # the recommended exit threshold: chosen on validation images with the deployed arithmetic
                    policy = _exit_policy(bufs, pv, yv[:len(pv)], max_exit_loss)
                    if verify:
                        test = _deployed(bufs, pt)
                        policy["test"] = deployed.exit_report(test["exit_probs"], test["final_probs"], yt,
                                                              policy["threshold"])
                    entries["front_end"]["exit_threshold"] = policy["threshold"]
                    entries["front_end"]["exit_policy"] = policy
                if verify:
                    _verify_pipeline(tmp, files, cfg, name, splits_to_export, pt, yt, keras_test)
        model = {"family": bm.cfg.family, "width": bm.cfg.width, "scheme": bm.cfg.scheme,
                 "num_classes": bm.cfg.num_classes, "exits": list(bm.exits),
                 "candidate_bits": list(bm.cfg.candidates.bits), "params": bm.count_params()}
        manifest = write_manifest(out, tmp, files, model, meta["dataset"]["class_names"],
                                  manifest_input(norm, bm.cfg.input_shape), "tfbitmeta convert")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def check_weights(buf: bytes, graph: ExportGraph) -> dict:
    """Every integer kernel of the file holds the checkpoint's quantized weights at this bitwidth: the real values
    ``code x scale`` of the file equal the checkpoint's to half a step of the file's scale (the converter may
    re-quantize a grid into a finer container).  A file that was altered, or converted from other weights, fails."""
    program = emulate.TfliteProgram(buf)
    expected = graph.integer_weights()
    found = [t for t in program.tensors if t.data is not None and t.quantized and len(t.shape) == 4
             and t.dtype in ("int8", "int4")]
    unmatched = []
    for t in found:
        fs = np.asarray(t.scale, np.float64).reshape(-1, 1, 1, 1)
        real = t.data.astype(np.float64) * fs
        ok = False
        for _, codes, scale in expected:
            if codes.shape != t.data.shape:
                continue
            want = codes.astype(np.float64) * np.asarray(scale, np.float64).reshape(-1, 1, 1, 1)
            if codes.shape[0] == 1:  # depthwise: channels on the last axis
                want = codes.astype(np.float64) * np.asarray(scale, np.float64).reshape(1, 1, 1, -1)
                real = t.data.astype(np.float64) * np.asarray(t.scale, np.float64).reshape(1, 1, 1, -1)
                fs = np.asarray(t.scale, np.float64).reshape(1, 1, 1, -1)
            if np.all(np.abs(real - want) <= 0.5 * fs * (1 + 1e-4)):
                ok = True
                break
        if not ok:
            unmatched.append(t.name)
    return {"kernels": len(found), "expected": len(expected), "unmatched": unmatched,
            "passed": not unmatched and len(found) >= len(expected)}


def verify_file(buf: bytes, graph: ExportGraph, feeds: dict, out: str, keras_logits, yt) -> dict:
    """One exported file on ``feeds`` (test pixels for a front end, the Keras extractor's features for a backend)
    vs the Keras model's ``keras_logits`` on the same images.

    Pass/fail: for integer files, the interpreter (one image per call, as on a device) and the integer-exact
    reference agree bit for bit on every output, and the file's kernels are the checkpoint's integer codes; for
    float files (fp, weight-only), top-1 agreement with the Keras model >= AGREEMENT_TARGET.  Agreement with the
    fake-quant Keras model is reported for every file (the deployed vs training-time gap)."""
    ref = tf.nn.softmax(keras_logits).numpy()
    try:
        cmp = emulate.compare(buf, feeds)
        got = cmp["interpreter"][out]
        reference = {"bit_exact": cmp["bit_exact"], "integer": cmp["integer"], "ops": cmp["ops"],
                     "outputs": cmp["outputs"]}
    except emulate.UnsupportedOp as e:  # named, and the file fails verification if it is an integer file
        got = run_tflite(buf, feeds[next(iter(feeds))])[out]
        reference = {"bit_exact": False, "integer": True, "unsupported": str(e)}
    agree = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    result = {"images": int(len(ref)), "top1_agreement": agree, "max_abs_dprob": float(np.abs(got - ref).max()),
              "tflite_accuracy": float(np.mean(got.argmax(-1) == yt)),
              "keras_accuracy": float(np.mean(ref.argmax(-1) == yt)), "integer_reference": reference}
    if reference["integer"]:
        result["weights"] = check_weights(buf, graph)
        result["passed"] = bool(reference["bit_exact"] and result["weights"]["passed"])
    else:
        result["passed"] = agree >= AGREEMENT_TARGET
    return result


def _deployed(bufs: dict, pixels: np.ndarray) -> dict:
    """Exit and final probabilities of the deployed pipeline (the integer reference; the interpreter for a file
    with an operator the reference does not know)."""
    try:
        return {**deployed.deployed_outputs(bufs["front_end"], bufs["backend"], pixels), "source": "integer reference"}
    except emulate.UnsupportedOp:
        return {**deployed.interpreter_outputs(bufs["front_end"], bufs["backend"], pixels, batch=256),
                "source": "interpreter"}


def _exit_policy(bufs: dict, pv: np.ndarray, yv: np.ndarray, max_loss: float) -> dict:
    """The recommended threshold, on validation images through the files themselves (every conversion does this,
    so it takes the interpreter's speed; ``--verify`` checks the files against the integer reference)."""
    out = deployed.interpreter_outputs(bufs["front_end"], bufs["backend"], pv)
    source = "TFLite interpreter, one image per call"
    t = deployed.choose_threshold(out["exit_probs"], out["final_probs"], yv, max_loss)
    return {"threshold": t, "chosen_on": f"{len(pv)} validation images ({source})", "max_loss_pp": 100 * max_loss,
            "validation": deployed.exit_report(out["exit_probs"], out["final_probs"], yv, t)}


def verify_front(buf: bytes, graph: ExportGraph, pixels: np.ndarray, keras_exit_logits, yt) -> dict:
    """A front-end file on test pixels vs the Keras model's exit head on the same images (normalized)."""
    return verify_file(buf, graph, {"image": pixels}, "exit_probs", keras_exit_logits, yt)


def verify_backend(buf: bytes, graph: ExportGraph, feats: np.ndarray, keras_logits, yt) -> dict:
    """A backend file on the Keras extractor's features vs the Keras model's logits."""
    return verify_file(buf, graph, {"features": feats}, "probs", keras_logits, yt)


def _verify_pipeline(tmp, files, cfg, name, splits, pt, yt, keras_test):
    """Features from the front-end file fed to the backend file vs the full Keras model."""
    for split in splits:
        front = run_tflite(tmp / f"front_{name}_exit{split}.tflite", pt)
        probs = run_tflite(tmp / f"backend_{name}_split{split}.tflite", front["features"].astype(np.float32))["probs"]
        ref = keras_test["logits"].numpy()
        agree = float(np.mean(probs.argmax(-1) == ref.argmax(-1)))
        for f in files:
            if f["path"] == f"backend_{name}_split{split}.tflite":
                f["verify"]["pipeline_top1_agreement"] = agree
                f["verify"]["pipeline_accuracy"] = float(np.mean(probs.argmax(-1) == yt))
