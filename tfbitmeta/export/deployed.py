"""Deployed accuracy: what the exported integer files answer, computed with the integer-exact reference.

For one bitwidth configuration and split, :func:`deployed_parts` converts the front end and the backend exactly
as ``tfbitmeta convert`` does (in memory), and :func:`deployed_outputs` runs them with
:mod:`tfbitmeta.export.emulate` (the arithmetic of TFLite's kernels, one image per call as on a device): the
front end's exit probabilities and the backend's final probabilities on the front end's own int8 features.

Early exits (:func:`choose_threshold`, :func:`exit_report`): a device answers with the exit head when its top
probability reaches the threshold and asks the server otherwise ("exit or continue").  The threshold is chosen on
validation data: the smallest one whose exit-or-continue accuracy is within ``max_loss`` of always running the
full model; the test report gives the fraction that exits early and the accuracy against the full model.
"""
from __future__ import annotations

import numpy as np

from tfbitmeta.export import emulate
from tfbitmeta.quant.bitwidth import FP, Config

THRESHOLDS = np.round(np.arange(0.0, 1.0001, 0.01), 2)
DEFAULT_MAX_LOSS = 0.005  # validation budget; the target is <= 1 pp on test


def deployed_parts(bm, cfg: Config, norm, split: int, rep_pixels: np.ndarray, rep_images: np.ndarray,
                   int4: bool = True, float16: bool = False) -> dict:
    """{"front_end": bytes, "backend": bytes} for ``cfg`` and ``split`` (biases aligned as in the export)."""
    import tensorflow as tf

    from tfbitmeta.export.convert import Part, convert_part
    from tfbitmeta.export.graph import aligned_biases
    from tfbitmeta.quant.bitwidth import bits_tensor

    quantized = tuple(cfg) != (FP, FP)
    with aligned_biases(bm.keras, cfg, norm, int4):
        feats_rep = bm.extractor(split)([rep_images, tf.tile(bits_tensor(cfg, 1), [len(rep_images), 1])],
                                        training=False).numpy()
        out = {}
        for kind, rep in (("front_end", rep_pixels), ("backend", feats_rep)):
            out[kind] = convert_part(Part(bm, cfg, kind, split, norm, int4), rep, quantized, float16 and not quantized)
    return out


def deployed_outputs(front: bytes, backend: bytes, pixels: np.ndarray) -> dict:
    """Exit and final probabilities of the deployed pipeline on ``pixels`` (float32 0-255), via the emulation."""
    f = emulate.run_emulation(emulate.TfliteProgram(front), {"image": pixels.astype(np.float32)})
    b = emulate.run_emulation(emulate.TfliteProgram(backend), {"features": f["features"].astype(np.float32)})
    return {"exit_probs": f["exit_probs"], "final_probs": b["probs"]}


def interpreter_outputs(front: bytes, backend: bytes, pixels: np.ndarray, batch: int = 1) -> dict:
    """The same as :func:`deployed_outputs` through TFLite's own interpreter, ``batch`` images per call (1: the
    device's invocation; 20-40x faster than the emulation on a MobileNetV2, which ``--verify`` shows equal to it)."""
    f = emulate.run_interpreter(front, {"image": pixels.astype(np.float32)}, batch=batch)
    b = emulate.run_interpreter(backend, {"features": f["features"].astype(np.float32)}, batch=batch)
    return {"exit_probs": f["exit_probs"], "final_probs": b["probs"]}


def exit_or_continue(exit_probs: np.ndarray, final_probs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, exited mask) of the policy "answer with the exit head when confident, else the full model"."""
    exited = exit_probs.max(-1) >= threshold
    return np.where(exited, exit_probs.argmax(-1), final_probs.argmax(-1)), exited


def choose_threshold(exit_probs: np.ndarray, final_probs: np.ndarray, y: np.ndarray,
                     max_loss: float = DEFAULT_MAX_LOSS) -> float:
    """Smallest threshold whose exit-or-continue accuracy is >= full-model accuracy - ``max_loss`` (1.0 when only
    the full model qualifies: always continue)."""
    full = float(np.mean(final_probs.argmax(-1) == y))
    for t in THRESHOLDS:
        pred, _ = exit_or_continue(exit_probs, final_probs, float(t))
        if float(np.mean(pred == y)) >= full - max_loss - 1e-12:
            return float(t)
    return 1.0


def exit_report(exit_probs: np.ndarray, final_probs: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    pred, exited = exit_or_continue(exit_probs, final_probs, threshold)
    full = float(np.mean(final_probs.argmax(-1) == y))
    acc = float(np.mean(pred == y))
    return {"threshold": float(threshold), "exit_fraction": float(np.mean(exited)),
            "exit_or_continue_accuracy": acc, "full_accuracy": full,
            "exit_head_accuracy": float(np.mean(exit_probs.argmax(-1) == y)),
            "loss_pp": round(100 * (full - acc), 4), "images": int(len(y))}


def deployed_table(bm, norm, data, configs, int4: bool = True, n_val: int = 5000, n_test: int | None = None,
                   max_loss: float = DEFAULT_MAX_LOSS, n_representative: int = 200, progress=None) -> dict:
    """Per configuration (by name): deployed accuracy of every exit head and of the full model (front end ->
    backend files, integer reference, whole test set unless ``n_test``), and the exit-or-continue report at the
    threshold chosen on ``n_val`` validation images.  Configurations with no TFLite container are skipped with
    the reason."""
    from tfbitmeta.errors import TfbitmetaError
    from tfbitmeta.export.convert import config_kind
    from tfbitmeta.quant.bitwidth import config_name

    rep_pixels = norm.pixels(data.x_val[:n_representative]).numpy()
    rep = norm.apply(data.x_val[:n_representative]).numpy()
    pv, yv = norm.pixels(data.x_val[:n_val]).numpy(), data.y_val[:n_val]
    xt = data.x_test if n_test is None else data.x_test[:n_test]
    pt, yt = norm.pixels(xt).numpy(), data.y_test[:len(xt)]
    out = {}
    for cfg in configs:
        name = config_name(cfg)
        try:
            kind = config_kind(cfg)
        except TfbitmetaError as e:
            out[name] = {"skipped": str(e)}
            continue
        row = {"kind": kind, "exits": {}}
        for split in bm.exits:
            if progress:
                progress(f"deployed accuracy: {name}, exit {split}")
            bufs = deployed_parts(bm, cfg, norm, split, rep_pixels, rep, int4 and kind == "integer")
            val = deployed_outputs(bufs["front_end"], bufs["backend"], pv)
            test = deployed_outputs(bufs["front_end"], bufs["backend"], pt)
            t = choose_threshold(val["exit_probs"], val["final_probs"], yv, max_loss)
            row["exits"][split] = exit_report(test["exit_probs"], test["final_probs"], yt, t)
            row["logits"] = float(np.mean(test["final_probs"].argmax(-1) == yt))
        out[name] = row
    return out
