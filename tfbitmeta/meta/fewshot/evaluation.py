"""Few-shot evaluation at many bitwidths, with the modified-Hausdorff baseline on the same episodes.

* MAML models: for every episode and target bitwidth, a copy of theta is fine-tuned on the support set at that
  bitwidth (quantization-aware SGD, ``eval_inner_steps`` steps at the inner learning rate), then classifies the
  query set with the quantized weights.  An N-way head runs N' <= N way episodes with its first N' outputs.
* ProtoNet models: support and query are embedded at the target bitwidth (quantized weights and activations);
  prototypes are the class means of the quantized support embeddings; nearest prototype by squared distance.
* Baseline (:mod:`~tfbitmeta.meta.fewshot.hausdorff`): nearest support drawing by modified Hausdorff distance,
  on the native-resolution drawings of the very same episodes, reported beside the model in every setting.

Test data: the run's test alphabets (default), or a user's folder of new alphabets (``test_dir``):

* the official ``images_evaluation`` layout (zip or ``<Alphabet>/<characterNN>/*.png``): every character is a
  test class, N-way K-shot episodes are sampled from them;
* the ``all_runs`` one-shot layout (``runNN/{training,test}/*.png`` + ``runNN/class_labels.txt``): each run is
  one fixed episode, scored as given (20-way 1-shot with one query per class in the official 20 runs).

The sampled episodes depend only on the run's seed and the setting, so every bitwidth, every model trained with
the same seed and the baseline are scored on the same episodes.  Reported: mean accuracy and the 95 % confidence
interval over episodes (:mod:`tfbitmeta.meta.confidence`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from tfbitmeta.data.episodes import Episode, EpisodeSampler, Setting
from tfbitmeta.data.omniglot import OneShotRun, find_oneshot_runs, load_omniglot, load_oneshot_runs, load_test_folder
from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.meta.confidence import mean_ci
from tfbitmeta.meta.fewshot.config import SEED_OFFSETS, FewShotConfig, make_algorithm
from tfbitmeta.meta.fewshot.hausdorff import HausdorffNearestSupport
from tfbitmeta.runs import RunDir, TrainConfig, check_writable
from tfbitmeta.quant.bitwidth import Config, config_name

ALL_SETTINGS = ("5w1s", "5w5s", "20w1s", "20w5s")
BASELINE = "hausdorff"


def episode_arrays(ep: Episode, norm):
    """Normalized (support, query) float tensors of an episode."""
    return norm.apply(ep.support), norm.apply(ep.query)


def episode_accuracy(algo, xs, xq, ep: Episode, cfg: Config, setting: Setting, inner_steps: int) -> float:
    cfg = (float(cfg[0]), float(cfg[1]))
    if algo.kind == "maml":
        return algo.evaluate_episode(xs, tf.constant(ep.support_labels), xq, tf.constant(ep.query_labels), cfg,
                                     inner_steps, setting.ways)
    return algo.evaluate_episode(tf.concat([xs, xq], 0), cfg, setting.ways, setting.shots, setting.queries)


def parse_settings(spec: str | None, fcfg: FewShotConfig, kind: str, head_ways: int | None = None) -> list[Setting]:
    """``None``/``train`` -> the trained setting; ``all`` -> 5/20-way x 1/5-shot (MAML: only N <= its head's N)."""
    if spec is None or spec.strip().lower() == "train":
        return [Setting(fcfg.ways, fcfg.shots, 15)]
    tokens = ALL_SETTINGS if spec.strip().lower() == "all" else [t for t in spec.split(",") if t.strip()]
    settings = [Setting.parse(t, 15) for t in tokens]
    if kind == "maml":
        head = head_ways or fcfg.ways
        if spec.strip().lower() == "all":
            settings = [s for s in settings if s.ways <= head]
        bad = [s.name for s in settings if s.ways > head]
        if bad:
            raise TfbitmetaError(f"this MAML model has a {head}-way classifier: it cannot run {', '.join(bad)} "
                                 f"(train another model with a larger N)")
    return settings


def _rows(accs: dict, configs, setting_name: str, n: int) -> list[dict]:
    rows = []
    for cfg in configs:
        mean, ci = mean_ci(accs[tuple(cfg)])
        rows.append({"setting": setting_name, "bits": config_name(cfg), "w": int(cfg[0]), "a": int(cfg[1]),
                     "acc": mean, "ci95": ci, "episodes": n})
    return rows


def score_episodes(algo, norm, episodes: Iterable[Episode], setting: Setting, configs: Sequence[Config],
                   inner_steps: int, progress: bool = False, desc: str = "episodes", total: int | None = None,
                   name: str | None = None) -> list[dict]:
    """One row per configuration: mean accuracy, 95 % CI half width and the number of episodes."""
    accs = {tuple(c): [] for c in configs}
    n = 0
    for ep in tqdm(episodes, desc=f"{desc} {name or setting.name}", total=total, disable=not progress, leave=False):
        xs, xq = episode_arrays(ep, norm)
        for cfg in configs:
            accs[tuple(cfg)].append(episode_accuracy(algo, xs, xq, ep, cfg, setting, inner_steps))
        n += 1
    return _rows(accs, configs, name or setting.name, n)


def test_episodes(images: np.ndarray, setting: Setting, episodes: int, seed: int):
    sampler = EpisodeSampler(images, setting, seed + SEED_OFFSETS["test"], "test")
    return (sampler.episode(i) for i in range(episodes))


def evaluate_algorithm(algo, split, norm, setting: Setting, configs: Sequence[Config], episodes: int, seed: int,
                       inner_steps: int, progress: bool = False, desc: str = "episodes") -> list[dict]:
    """Model rows on ``episodes`` seeded test episodes of ``split`` (same episodes as :func:`evaluate_baseline`)."""
    return score_episodes(algo, norm, test_episodes(split.images, setting, episodes, seed), setting, configs,
                          inner_steps, progress, desc, episodes)


def baseline_row(accs: list[float], setting_name: str) -> dict:
    mean, ci = mean_ci(accs)
    return {"setting": setting_name, "method": BASELINE, "bits": "-", "acc": mean, "ci95": ci, "episodes": len(accs)}


def evaluate_baseline(native_split, setting: Setting, episodes: int, seed: int, progress: bool = False) -> dict:
    """Modified-Hausdorff nearest support on the same seeded episodes, from the native-resolution drawings."""
    clf = HausdorffNearestSupport(native_split.images)
    eps = test_episodes(native_split.images, setting, episodes, seed)
    accs = [clf.episode_accuracy(ep) for ep in tqdm(eps, desc=f"{BASELINE} {setting.name}", total=episodes,
                                                    disable=not progress, leave=False)]
    return baseline_row(accs, setting.name)


def run_episode(run: OneShotRun, images: np.ndarray) -> Episode:
    """The fixed episode of a one-shot run from its (N, 1 + Q, H, W, 1) class-major images."""
    n, k = images.shape[:2]
    labels = np.arange(n, dtype=np.int32)
    return Episode(support=images[:, 0], support_labels=labels, query=images[:, 1:].reshape(-1, *images.shape[2:]),
                   query_labels=np.repeat(labels, k - 1), classes=labels, picks=np.tile(np.arange(k), (n, 1)))


def evaluate_oneshot_runs(algo, norm, runs: list[OneShotRun], configs: Sequence[Config], inner_steps: int,
                          progress: bool = False, desc: str = "runs") -> tuple[list[dict], dict]:
    """Model rows and the baseline row over the fixed episodes of the ``all_runs`` layout (one per run)."""
    n, k = runs[0].images.shape[:2]
    setting = Setting(n, 1, k - 1)
    name = f"runs{n}w1s"
    rows = score_episodes(algo, norm, (run_episode(r, r.images) for r in runs), setting, configs, inner_steps,
                          progress, desc, len(runs), name)
    accs = [HausdorffNearestSupport(r.native).episode_accuracy(run_episode(r, r.native)) for r in runs]
    return rows, baseline_row(accs, name)


def load_run(run_path: Path):
    """(meta, FewShotConfig, BitModel, algorithm, normalization) of a few-shot run directory."""
    run = RunDir(run_path)
    meta = run.read_meta()
    if "fewshot" not in meta:
        raise TfbitmetaError(f"{run_path} is not a few-shot run")
    fcfg = FewShotConfig.from_dict(meta["fewshot"])
    bm = run.load_model("model" if (run.path / "model").exists() else "best")
    return meta, fcfg, bm, make_algorithm(bm, fcfg), run.normalization()


def format_rows(rows: list[dict], baseline: Sequence[dict] = ()) -> str:
    lines = [f"{'setting':>8} {'bits':>9} {'accuracy':>10} {'95% CI':>9}"]
    base = {b["setting"]: b for b in baseline}
    last = None
    for r in rows + [{"setting": None}]:
        if last is not None and r["setting"] != last and last in base:
            b = base[last]
            lines.append(f"{b['setting']:>8} {'Hausdorff':>9} {100 * b['acc']:>9.2f}% {'±':>2}{100 * b['ci95']:>5.2f}"
                         f"   (training-free baseline, same episodes)")
        if r["setting"] is None:
            break
        lines.append(f"{r['setting']:>8} {r['bits']:>9} {100 * r['acc']:>9.2f}% {'±':>2}{100 * r['ci95']:>5.2f}")
        last = r["setting"]
    return "\n".join(lines)


def plot_rows(rows_by_label: dict[str, list[dict]], path: Path, title: str, baseline: Sequence[dict] = ()):
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
        for b in baseline:
            if b["setting"] == setting:
                ax.axhline(100 * b["acc"], color="k", ls="--", lw=1, label="Hausdorff (no training)")
                ax.axhspan(100 * (b["acc"] - b["ci95"]), 100 * (b["acc"] + b["ci95"]), color="k", alpha=0.08)
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
                 out: Path | None = None, progress: bool = True, test_dir: Path | None = None,
                 baseline: bool = True) -> dict:
    """Score a run (and the baseline) on its test alphabets or on ``test_dir``; writes results.json + a plot."""
    meta, fcfg, bm, algo, norm = load_run(run_path)
    tcfg = TrainConfig.from_dict(meta["train"])
    configs = bm.cfg.candidates.parse(bits)
    head = algo.head_ways if algo.kind == "maml" else None
    rows, base = [], []
    if test_dir is not None and find_oneshot_runs(Path(test_dir)):
        runs = load_oneshot_runs(Path(test_dir))
        if head is not None and runs[0].images.shape[0] > head:
            raise TfbitmetaError(f"this MAML model has a {head}-way classifier: the runs in {test_dir} are "
                                 f"{runs[0].images.shape[0]}-way")
        rows, b = evaluate_oneshot_runs(algo, norm, runs, configs, fcfg.eval_inner_steps, progress, fcfg.method)
        base = [b] if baseline else []
        test = {"source": str(test_dir), "layout": "one-shot runs (class_labels.txt)", "runs": len(runs)}
    else:
        if test_dir is not None:
            split, native = load_test_folder(Path(test_dir)), None
            if baseline:
                native = load_test_folder(Path(test_dir), image_size=None)
            test = {"source": str(test_dir), "layout": "alphabet folders / zips (images_evaluation)"}
        else:
            data = load_omniglot(fcfg.data_dir, seed=tcfg.seed)
            split = data.test
            native = load_omniglot(fcfg.data_dir, seed=tcfg.seed, rotations=False, image_size=None).test \
                if baseline else None
            test = {"source": fcfg.data_dir, "layout": "the run's test alphabets"}
        test.update({"alphabets": split.alphabets, "classes": split.num_classes})
        drawers = int(split.images.shape[1])
        for setting in parse_settings(settings, fcfg, algo.kind, head):
            if setting.shots < drawers < setting.shots + setting.queries:  # fewer than 20 drawings per class
                setting = Setting(setting.ways, setting.shots, drawers - setting.shots)
            rows += evaluate_algorithm(algo, split, norm, setting, configs, episodes, tcfg.seed,
                                       fcfg.eval_inner_steps, progress, fcfg.method)
            if native is not None:
                base.append(evaluate_baseline(native, setting, episodes, tcfg.seed, progress))
    result_meta = {"method": fcfg.method, "dataset": "omniglot", "model": bm.cfg.family, "width": bm.cfg.width,
                   "scheme": bm.cfg.scheme, "train_bits": list(fcfg.train_bits), "episodes": episodes,
                   "test": test, "eval_inner_steps": fcfg.eval_inner_steps if algo.kind == "maml" else None,
                   "status": meta.get("status", {})}
    dest = check_writable(out or Path(run_path))
    result = {"meta": result_meta, "rows": rows, "baseline": base}
    (dest / "results.json").write_text(json.dumps(result, indent=2))
    plot_rows({fcfg.method: rows}, dest / "accuracy_vs_bits.png", f"{fcfg.method} omniglot", base)
    return result
