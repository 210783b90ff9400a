"""Few-shot evaluation at many bitwidths: N-way K-shot episodes of unseen (test-alphabet) classes.

* MAML models: for every episode and target bitwidth, a copy of theta is fine-tuned on the support set at that
  bitwidth (quantization-aware SGD, ``eval_inner_steps`` steps at the inner learning rate), then classifies the
  query set with the quantized weights.
* ProtoNet models: support and query are embedded at the target bitwidth (quantized weights and activations);
  prototypes are the class means of the quantized support embeddings; nearest prototype by squared distance.

The test episodes depend only on the run's seed and the setting, so every bitwidth and every model trained with
the same seed is scored on the same episodes.  Reported: mean accuracy and the 95 % confidence interval over
episodes (:mod:`tfbitmeta.meta.confidence`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from tfbitmeta.data.episodes import EpisodeSampler, Setting
from tfbitmeta.data.omniglot import load_omniglot
from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.meta.confidence import mean_ci
from tfbitmeta.runs import RunDir, TrainConfig, check_writable
from tfbitmeta.quant.bitwidth import Config, config_name

ALL_SETTINGS = ("5w1s", "5w5s", "20w1s", "20w5s")


def parse_settings(spec: str | None, fcfg, kind: str) -> list[Setting]:
    """``None``/``train`` -> the trained setting; ``all`` -> 5/20-way x 1/5-shot (MAML: only its head's ways)."""
    if spec is None or spec.strip().lower() == "train":
        return [Setting(fcfg.ways, fcfg.shots, 15)]
    tokens = ALL_SETTINGS if spec.strip().lower() == "all" else [t for t in spec.split(",") if t.strip()]
    settings = [Setting.parse(t, 15) for t in tokens]
    if kind == "maml":
        if spec.strip().lower() == "all":
            settings = [s for s in settings if s.ways == fcfg.ways]
        bad = [s.name for s in settings if s.ways != fcfg.ways]
        if bad:
            raise TfbitmetaError(f"this MAML model has a {fcfg.ways}-way classifier: it cannot run {', '.join(bad)} "
                                 f"(train another model with --ways)")
    return settings


def evaluate_algorithm(algo, split, norm, setting: Setting, configs: Sequence[Config], episodes: int, seed: int,
                       inner_steps: int, progress: bool = False, desc: str = "episodes") -> list[dict]:
    """One row per configuration: mean accuracy, 95 % CI half width and the per-episode accuracies' count."""
    from tfbitmeta.meta.fewshot import SEED_OFFSETS, episode_accuracy, episode_arrays

    sampler = EpisodeSampler(split.images, setting, seed + SEED_OFFSETS["test"], "test")
    accs = {tuple(c): [] for c in configs}
    for i in tqdm(range(episodes), desc=f"{desc} {setting.name}", disable=not progress, leave=False):
        ep = sampler.episode(i)
        xs, xq = episode_arrays(ep, norm)
        for cfg in configs:
            accs[tuple(cfg)].append(episode_accuracy(algo, xs, xq, ep, cfg, setting, inner_steps))
    rows = []
    for cfg in configs:
        mean, ci = mean_ci(accs[tuple(cfg)])
        rows.append({"setting": setting.name, "bits": config_name(cfg), "w": int(cfg[0]), "a": int(cfg[1]),
                     "acc": mean, "ci95": ci, "episodes": episodes})
    return rows


def load_run(run_path: Path):
    """(meta, FewShotConfig, BitModel, algorithm, normalization) of a few-shot run directory."""
    from tfbitmeta.meta.fewshot import FewShotConfig, make_algorithm

    run = RunDir(run_path)
    meta = run.read_meta()
    if "fewshot" not in meta:
        raise TfbitmetaError(f"{run_path} is not a few-shot run")
    fcfg = FewShotConfig.from_dict(meta["fewshot"])
    bm = run.load_model("model" if (run.path / "model").exists() else "best")
    return meta, fcfg, bm, make_algorithm(bm, fcfg), run.normalization()


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'setting':>8} {'bits':>8} {'accuracy':>10} {'95% CI':>9}"]
    for r in rows:
        lines.append(f"{r['setting']:>8} {r['bits']:>8} {100 * r['acc']:>9.2f}% {'±':>2}{100 * r['ci95']:>5.2f}")
    return "\n".join(lines)


def plot_rows(rows_by_label: dict[str, list[dict]], path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r["setting"] for rows in rows_by_label.values() for r in rows},
                      key=lambda s: ALL_SETTINGS.index(s) if s in ALL_SETTINGS else 99)
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        order = []
        for rows in rows_by_label.values():
            for r in rows:
                if r["setting"] == setting and r["bits"] not in order:
                    order.append(r["bits"])
        xpos = {b: i for i, b in enumerate(order)}
        for label, rows in rows_by_label.items():
            pts = [r for r in rows if r["setting"] == setting]
            if pts:
                ax.errorbar([xpos[r["bits"]] for r in pts], [100 * r["acc"] for r in pts],
                            yerr=[100 * r["ci95"] for r in pts], marker="o", capsize=3, label=label)
        ax.set_xticks(range(len(order)), order)
        ax.set_xlabel("bitwidth (w = a)")
        ax.set_ylabel("accuracy (%), 95% CI")
        ax.set_title(f"{title} {setting}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_run(run_path: Path, bits: str = "all", episodes: int = 600, settings: str | None = None,
                 out: Path | None = None, progress: bool = True) -> dict:
    meta, fcfg, bm, algo, norm = load_run(run_path)
    tcfg = TrainConfig.from_dict(meta["train"])
    configs = bm.cfg.candidates.parse(bits)
    data = load_omniglot(fcfg.data_dir, seed=tcfg.seed)
    rows = []
    for setting in parse_settings(settings, fcfg, algo.kind):
        rows += evaluate_algorithm(algo, data.test, norm, setting, configs, episodes, tcfg.seed,
                                   fcfg.eval_inner_steps, progress, fcfg.method)
    result_meta = {"method": fcfg.method, "dataset": "omniglot", "model": bm.cfg.family, "width": bm.cfg.width,
                   "scheme": bm.cfg.scheme, "train_bits": list(fcfg.train_bits), "episodes": episodes,
                   "test_alphabets": data.test.alphabets, "test_classes": data.test.num_classes,
                   "eval_inner_steps": fcfg.eval_inner_steps if algo.kind == "maml" else None,
                   "status": meta.get("status", {})}
    dest = check_writable(out or Path(run_path))
    (dest / "results.json").write_text(json.dumps({"meta": result_meta, "rows": rows}, indent=2))
    plot_rows({fcfg.method: rows}, dest / "accuracy_vs_bits.png", f"{fcfg.method} omniglot")
    return {"meta": result_meta, "rows": rows}
