"""Accuracy of one checkpoint at many bitwidths: the table, results.json and the accuracy-vs-bits plot."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import tensorflow as tf

from tfbitmeta.quant.bitwidth import Config, config_name
from tfbitmeta.quant.calibration import with_bn_statistics


class Predictor:
    """A compiled forward pass with the bitwidth as a tensor (one trace for all bitwidths) with one kind of BN
    statistics (``mode``: ``"calibrated"`` or ``"batch"``), fixed for the predictor's life."""

    def __init__(self, model: tf.keras.Model, mode: str = "calibrated"):
        self.model, self.mode = with_bn_statistics(model, mode), mode
        shape = [None, *model.inputs[0].shape[1:]]

        @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32), tf.TensorSpec([None, 2], tf.float32)])
        def predict(x, bits):
            return self.model([x, bits], training=False)

        self._predict = predict

    def __call__(self, x, cfg: Config):
        bits = tf.tile(tf.constant([cfg], tf.float32), [tf.shape(x)[0], 1])
        return self._predict(x, bits)

    def accuracy(self, batches, cfg: Config) -> dict[str, float]:
        correct, total = {}, 0
        for x, y in batches:
            out = self(x, cfg)
            for k, logits in out.items():
                correct[k] = correct.get(k, 0) + int(tf.reduce_sum(tf.cast(tf.argmax(logits, -1, tf.int32) == y,
                                                                           tf.int32)))
            total += int(y.shape[0])
        return {k: c / max(total, 1) for k, c in correct.items()}


def accuracy_table(model: tf.keras.Model, batches, configs: Sequence[Config],
                   modes: Sequence[str] = ("calibrated",)) -> list[dict]:
    """One row per configuration: accuracy of every output head in every BN mode."""
    predictors = {m: Predictor(model, m) for m in modes}
    rows = []
    for cfg in configs:
        row = {"bits": config_name(cfg), "w": int(cfg[0]), "a": int(cfg[1])}
        for m, p in predictors.items():
            for head, acc in p.accuracy(batches, cfg).items():
                row[head if m == modes[0] else f"{head}@{m}_bn"] = acc
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """Accuracies as percentages; ``gap_pp`` (fake-quant - deployed) in points, thresholds as numbers; n/a where
    a configuration has no value (e.g. no deployed file for 16 bit)."""
    if not rows:
        return "(no rows)"
    cols = []
    for r in rows:
        cols += [c for c in r if c not in ("w", "a", "deployed") and c not in cols]

    def cell(c, v):
        if v is None:
            return f"{'n/a':>14}"
        if isinstance(v, str):
            return f"{v:>14}"
        if c == "gap_pp":
            return f"{v:>+11.2f} pp"
        if c.endswith("_threshold"):
            return f"{v:>14.2f}"
        return f"{100 * v:>13.2f}%"
    lines = ["  ".join(f"{c:>14}" for c in cols)]
    lines += ["  ".join(cell(c, r.get(c)) for c in cols) for r in rows]
    return "\n".join(lines)


def plot_accuracy(rows_by_label: dict[str, list[dict]], path: Path, title: str, key: str = "logits"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    order = []
    for rows in rows_by_label.values():
        for r in rows:
            if r["bits"] not in order:
                order.append(r["bits"])
    xpos = {b: i for i, b in enumerate(order)}
    for label, rows in rows_by_label.items():
        pts = [(xpos[r["bits"]], 100 * r[key]) for r in rows if key in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=label, linestyle="-" if len(pts) > 1 else "none")
    ax.set_xticks(range(len(order)), order)
    ax.set_xlabel("bitwidth (w = a)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out: Path, rows: list[dict], meta: dict, title: str) -> None:
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot_accuracy({meta.get("method", "model"): rows}, out / "accuracy_vs_bits.png", title)
