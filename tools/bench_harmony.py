"""Benchmark of hybrid split FL against its claim (issue 13): HARMONY-style training with shared-path features and
calibrated routing vs SplitGP (heterogeneous and homogeneous clients), FedAvg, local-only, centralized and the
ablations, at one equal budget of client steps, on two datasets and several seeds.

Per algorithm: accuracy at OOD fraction p = 0 / 0.5 / 1 (mean and worst client), offload, modelled latency, the
decomposition (routing recall, false offload, server accuracy on received / all OOD, via the owner's front end,
shortcut, oracle routing), every routing score's AUROC, budget and wall time; the targets side by side; PNGs of
p = 1 accuracy vs rounds and of accuracy vs offload (threshold sweep).  Writes ``<out>/<name>.json`` and ``.png``
(curves) and ``<name>_sweep.png``.

    uv run python tools/bench_harmony.py --quick --out /tmp/h          # a smoke run (digits, 2 rounds)
    nice -n 10 uv run python tools/bench_harmony.py                    # the committed numbers (benchmarks/README.md)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


OOD_FRACTIONS = (0.0, 0.5, 1.0)


# -- the runs ------------------------------------------------------------------------------------------------
def run(adapter, name: str, dataset: str, seed: int, args) -> dict:
    """Train one algorithm, evaluating every ``eval_every`` rounds (the curve) and at the end (the reports of the
    algorithm and of its deployment variants).  Returns {variant: report}."""
    t0 = time.perf_counter()
    job = adapter.start(name, dataset, seed, args)
    curve, train_s, r = [], 0.0, 0
    while True:
        t = time.perf_counter()
        more = job.run_round(r)
        train_s += time.perf_counter() - t
        r += 1
        last = not more or r == args.rounds
        if (more and r % args.eval_every == 0) or last:
            reps = job.reports(args.keep_local, final=last)
            main = reps[name]
            steps = job.budget()["client_steps_per_client"]
            curve.append({"round": len(job.sim.history), "client_steps_per_client": steps, "train_seconds": train_s,
                          "deployed": last,
                          **{f"acc_p{p:g}": main["summary"][f"p{p:g}"]["accuracy"]["mean"] for p in OOD_FRACTIONS}})
            print(f"  {dataset} seed {seed} {name} step {steps}: p=0 {100 * curve[-1]['acc_p0']:.1f} "
                  f"p=1 {100 * curve[-1]['acc_p1']:.1f} ({train_s:.0f} s train)", flush=True)
        if last:
            break
    job.close()
    wall = time.perf_counter() - t0
    for rep in reps.values():
        rep.update(curve=curve, seed=seed, budget=job.budget(), train_seconds=train_s, wall_seconds=wall,
                   trained_as=name, round_seconds_median=float(np.median(job.round_seconds()))
                   if job.round_seconds() else None,
                   first_round_seconds=job.sim.history[0]["seconds"] if job.sim.history else None)
    return reps


# -- tables over seeds and the targets -----------------------------------------------------------------------
ROW = {  # column -> (p, decomposition key, "mean" | "worst")
    "acc_p0": ("p0", "accuracy", "mean"), "acc_p0_worst": ("p0", "accuracy", "worst"),
    "acc_p0.5": ("p0.5", "accuracy", "mean"), "acc_p1": ("p1", "accuracy", "mean"),
    "acc_p1_worst": ("p1", "accuracy", "worst"), "offload_p1": ("p1", "offload_ratio", "mean"),
    "latency_ms_p1": ("p1", "latency_ms", "mean"), "ood_recall": ("p1", "ood_recall", "mean"),
    "id_false_offload": ("p1", "id_false_offload", "mean"),
    "server_acc_received_id": ("p1", "server_acc_received_id", "mean"),
    "server_acc_received_ood": ("p1", "server_acc_received_ood", "mean"),
    "server_acc_all_ood": ("p1", "server_acc_all_ood", "mean"),
    "server_acc_ood_via_owner": ("p1", "server_acc_ood_via_owner", "mean"),
    "shortcut": ("p1", "shortcut", "mean"), "oracle_p1": ("p1", "oracle_accuracy", "mean"),
}
PERCENT = set(ROW) - {"latency_ms_p1"}


def row(rep: dict) -> dict:
    s = rep["summary"]
    out = {}
    for col, (p, key, which) in ROW.items():
        v = s[p].get(key, {}).get(which)
        out[col] = None if v is None else (100 * v if col in PERCENT else v)
    router = rep["clients"][0]["router"]
    out["router"] = router
    out["auroc"] = s["scores"].get(router, {}).get("auroc", {}).get("mean") if router in s["scores"] else None
    for kind, m in s["scores"].items():
        out[f"auroc_{kind}"] = m["auroc"]["mean"]
    for key, v in rep.get("alignment", {}).items():
        if key in ("same_image_cosine", "other_image_cosine", "server_label_agreement_across_architectures"):
            out[key] = v
    out["client_steps"] = rep["budget"]["client_steps"]
    out["train_seconds"] = rep["train_seconds"]
    out["wall_seconds"] = rep["wall_seconds"]
    return out


def over_seeds(rows: list[dict]) -> dict:
    """Mean, min and max over the seeds of every numeric column."""
    out = {}
    for col in rows[0]:
        vals = [r[col] for r in rows if isinstance(r.get(col), (int, float)) and r.get(col) is not None]
        if vals and len(vals) == len(rows):
            out[col] = {"mean": float(np.mean(vals)), "min": float(min(vals)), "max": float(max(vals))}
        else:
            out[col] = rows[0][col]
    out["seeds"] = len(rows)
    return out


def per_client_gap(runs_a: list[dict], runs_b: list[dict], p: str = "p0") -> dict:
    """Client-by-client accuracy of A minus B (same seed, same clients): mean and worst over clients and seeds."""
    by_seed = {r["seed"]: r for r in runs_b}
    gaps = [100 * (ca[p]["accuracy"] - cb[p]["accuracy"]) for ra in runs_a if ra["seed"] in by_seed
            for ca, cb in zip(ra["clients"], by_seed[ra["seed"]]["clients"])]
    if not gaps:
        return {"mean": None, "worst": None}
    return {"mean": float(np.mean(gaps)), "worst": float(min(gaps))}


def targets(table: dict, runs: dict, ours: str) -> dict:
    t = {}

    def m(alg, col):
        v = table.get(alg, {}).get(col)
        return v["mean"] if isinstance(v, dict) else None

    def add(name, value, target, ok):
        if value is not None:
            t[name] = {"value": value, "target": target, "met": bool(ok(value))}
    a = m(ours, "acc_p1")
    for base, need in (("splitgp", 20.0), ("fedavg", 10.0)):
        if a is not None and m(base, "acc_p1") is not None:
            add(f"with_ood_vs_{base}_pp", a - m(base, "acc_p1"), f">= +{need:g}", lambda v, n=need: v >= n)
    if m(ours, "acc_p0") is not None and m("local", "acc_p0") is not None:
        add("id_vs_local_mean_pp", m(ours, "acc_p0") - m("local", "acc_p0"), ">= 0", lambda v: v >= 0)
        add("id_vs_local_worst_client_pp", per_client_gap(runs[ours], runs["local"])["worst"], ">= -2",
            lambda v: v >= -2)
    if a is not None and m("centralized", "acc_p1") is not None:
        add("p1_gap_to_centralized_pp", m("centralized", "acc_p1") - a, "<= 5", lambda v: v <= 5)
    add("shortcut_percent", m(ours, "shortcut"), "<= 10", lambda v: v <= 10)
    add("routing_auroc", m(ours, "auroc"), ">= 0.95", lambda v: v >= 0.95)
    if m(ours, "latency_ms_p1") is not None and m("splitgp", "latency_ms_p1") is not None:
        add("latency_ms_p1_minus_splitgp", m(ours, "latency_ms_p1") - m("splitgp", "latency_ms_p1"), "< 0",
            lambda v: v < 0)
    return t


# -- plots ---------------------------------------------------------------------------------------------------
def _panels(results: dict, path: Path, draw, xlabel: str, ylabel: str, title: str) -> None:
    """One panel per dataset; ``draw(ax, alg, runs)`` draws an algorithm's line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(results)
    fig, axes = plt.subplots(1, len(datasets), figsize=(7.5 * len(datasets), 4.8), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for alg, runs in results[ds]["runs"].items():
            draw(ax, alg, runs)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{ds}: {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curve(ax, alg, runs):
    if runs[0]["trained_as"] != alg:
        return  # deployment ablations share their training run's curve
    steps = [c["client_steps_per_client"] for c in runs[0]["curve"]]
    acc = np.array([[100 * c["acc_p1"] for c in r["curve"]] for r in runs])
    line, = ax.plot(steps, acc.mean(0), ".-", label=alg, lw=1.2)
    if len(runs) > 1:
        ax.fill_between(steps, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.15)


def _sweep(ax, alg, runs):
    if "sweep" not in runs[0]["clients"][0]:  # no routing: one accuracy
        acc = np.mean([100 * r["summary"]["p1"]["accuracy"]["mean"] for r in runs])
        ax.axhline(acc, ls=":", lw=1, color="gray")
        ax.text(1, acc, f" {alg}", fontsize=7, va="bottom", color="gray")
        return
    n = len(runs[0]["clients"][0]["sweep"])
    mean = lambda m: np.mean([[np.mean([c["sweep"][i][m] for c in r["clients"]]) for i in range(n)]  # noqa: E731
                              for r in runs], axis=0)
    ax.plot(100 * mean("offload_ratio"), 100 * mean("accuracy"), "o-", ms=3, label=alg)


def plot_curves(results: dict, path: Path) -> None:
    _panels(results, path, _curve, "client steps per client (ours: last point after deployment fine-tuning)",
            "mean client accuracy with OOD, p = 1 (%)", "accuracy vs training (band: seeds min-max)")


def plot_sweep(results: dict, path: Path) -> None:
    _panels(results, path, _sweep, "offload ratio at p = 1 (%) (keep-local targets 50-100 % of validation ID)",
            "mean client accuracy, p = 1 (%)", "accuracy vs offload")


def markdown(results: dict) -> str:
    cols = ["acc_p0", "acc_p0_worst", "acc_p0.5", "acc_p1", "acc_p1_worst", "offload_p1", "latency_ms_p1",
            "ood_recall", "id_false_offload", "server_acc_received_ood", "server_acc_all_ood",
            "server_acc_ood_via_owner", "shortcut", "oracle_p1", "auroc"]
    lines = []
    for ds, res in results.items():
        lines += [f"\n{ds} (mean over seeds {res['seeds']}; [min, max] over seeds)", "",
                  "| algorithm | seeds | " + " | ".join(cols) + " | wall s |", "|---" * (len(cols) + 3) + "|"]
        for alg, r in res["table"].items():
            cells = []
            for c in cols:
                v = r.get(c)
                if not isinstance(v, dict):
                    cells.append("-")
                    continue
                f = ".3f" if c == "auroc" else ".1f"
                spread = "" if v["min"] == v["max"] else f" [{v['min']:{f}}, {v['max']:{f}}]"
                cells.append(f"{v['mean']:{f}}{spread}")
            lines.append(f"| {alg} | {r['seeds']} | " + " | ".join(cells) + f" | {r['wall_seconds']['mean']:.0f} |")
        lines.append("")
        for alg, diff in res.get("deployed_differently", {}).items():
            lines.append(f"- {alg}: deployed with " + ", ".join(f"{k}={v}" for k, v in diff.items())
                         + " (the default when it ran)")
        for name, t in res["targets"].items():
            lines.append(f"- {name}: {t['value']:.3f} (target {t['target']}) {'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def _json(o):
    return o.item() if isinstance(o, np.generic) else o.tolist() if isinstance(o, np.ndarray) else str(o)


# -- the stack under test -----------------------------------------------------------------------------------
# trained algorithms (one training run each); "harmony" and "harmony-shared-head" are also evaluated as each of
# their deployment ablations (algorithms.deployment_variants)
# (another router / no fine-tuning / deferral: the same training run, so free of training noise)
TRAINED = ["harmony", "splitgp", "fedavg", "local", "centralized", "splitgp-homogeneous",
           "harmony-shared-head", "harmony-no-contrastive", "harmony-no-sampling", "harmony-no-inner"]
ABLATIONS = {"harmony-shared-head", "harmony-no-contrastive", "harmony-no-sampling", "harmony-no-inner"}
ORDER = TRAINED


class Job:
    """One trained algorithm on the one-stack simulation, with a validation split held out of every client's
    training data (the router's calibration set)."""

    def __init__(self, name: str, dataset: str, seed: int, args):
        from tfbitmeta.federated.simulation import SimConfig, Simulation

        base = name.replace("-homogeneous", "")
        archs, bits = args.architectures, args.bits
        if name.endswith("-homogeneous"):  # same architecture and bitwidth everywhere: no representation skew
            archs, bits = archs.split(",")[0], bits.split(",")[len(bits.split(",")) // 2]
        self.name, self.base, self.args, self.seed = name, base, args, seed
        from tfbitmeta.federated import algorithms as AL

        # fine-tuning steps at deployment come out of the same budget of client steps
        rounds = args.rounds - (args.finetune_rounds if AL.get(base).finetune_head else 0)
        self.sim = Simulation(SimConfig(algorithm=base, dataset=dataset, clients=args.clients, rounds=rounds,
                                        local_steps=args.local_steps, batch_size=args.batch_size,
                                        architectures=archs, bits=bits, engine=args.engine, seed=seed,
                                        finetune_steps=args.finetune_rounds * args.local_steps, lr=0.05),
                              progress=False)
        self.alg, sim = self.sim.alg, self.sim
        self.validation = sim.validation  # held out by the simulation: the routers' calibration set
        self.rounds = rounds
        self.finetune_steps = 0
        self._flops = None

    def run_round(self, r: int) -> bool:
        if r >= self.rounds:
            return False
        self.sim.run_round(r)
        return True

    def round_seconds(self) -> list:
        return [h["seconds"] for h in self.sim.history[1:]]

    def budget(self) -> dict:
        cfg = self.sim.cfg
        steps = len(self.sim.history) * cfg.local_steps + self.finetune_steps
        return {"client_steps_per_client": steps, "client_steps": steps * cfg.clients,
                "examples_per_client": steps * cfg.batch_size, "rounds": len(self.sim.history),
                "local_steps": cfg.local_steps, "finetune_steps": self.finetune_steps, "batch_size": cfg.batch_size}

    def close(self) -> None:
        self.sim.process.close()

    def flops(self) -> dict:
        from tfbitmeta.federated.report import model_flops

        self._flops = self._flops or model_flops(self.sim)
        return self._flops

    def personal_heads(self, finetune: bool) -> list:
        """The exit heads the clients answer with: fine-tuned at deployment (``Simulation.deployed_weights``) or
        the head they received."""
        sim = self.sim
        if finetune:
            self.finetune_steps = sim.cfg.finetune_steps
            return [sim.deployed_weights(k)[1] for k in range(sim.cfg.clients)]
        st = [sim.client_states[sim.learner_of(k)] for k in range(sim.cfg.clients)]
        return [{n: np.asarray(v) for n, v in (sim.state["head"] if self.alg.share_head else s["head"]).items()}
                for s in st] if self.alg.finetune_head else [None] * sim.cfg.clients

    def reports(self, keep_local: float, final: bool) -> dict:
        """{algorithm name: report}: the trained algorithm's, and at the end of the run also every
        deployment ablation's (same training).  Before the end, ours is evaluated without fine-tuning."""
        from tfbitmeta.federated import algorithms as AL
        from tfbitmeta.federated import report

        names = [self.name] + (AL.deployment_variants(self.base) if final else [])
        router_heads = [self.sim.state["head"]] * self.sim.cfg.clients if self.alg.share_head and self.alg.split \
            else None
        out, cols = {}, {}
        for name in names:
            alg = AL.get(name.replace("-homogeneous", ""))
            assert AL.same_training(alg, self.alg), name
            router = "server" if alg.centralized else "local" if not alg.split else alg.router
            finetune = alg.finetune_head and final
            if finetune not in cols:
                cols[finetune] = report.collect(self.sim, self.validation, self.personal_heads(finetune),
                                                router_heads)
            fixed = None if alg.keep_local or router in ("local", "server") else self.sim.cfg.threshold
            out[name] = report.route(self.sim, cols[finetune], router, alg.keep_local or keep_local, fixed,
                                     alg.defer_own_classes, flops=self.flops())
            out[name]["algorithm"] = alg.to_dict()
        if final:
            align = report.alignment(self.sim, seed=self.seed)
            for rep in out.values():
                rep["alignment"] = align
        return out


class Adapter:
    def start(self, name, dataset, seed, args):
        return Job(name, dataset, seed, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="fashion_mnist,digits")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--algorithms", default=",".join(ORDER))
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--keep-local", type=float, default=0.95,
                    help="target share of a client's validation ID images answered locally (router calibration)")
    ap.add_argument("--ablation-seeds", type=int, default=0,
                    help="run the ablations on the first N seeds only (0 = every seed)")
    ap.add_argument("--architectures", default="svhn_cnn-w4,svhn_cnn-w2,mobilenet_v2-w05")
    ap.add_argument("--bits", default="2,4,8")
    ap.add_argument("--engine", default="tf", choices=["tf", "tff"])
    ap.add_argument("--finetune-rounds", type=int, default=2,
                    help="ours: the last N rounds' worth of client steps go to fine-tuning the exit head at "
                         "deployment (so every algorithm has the same client steps)")
    ap.add_argument("--quick", action="store_true", help="smoke run: digits, 4 clients, 2 rounds, one seed")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default="harmony")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                    help="no training: merge the runs of result files written by separate processes (e.g. one seed "
                         "each, run side by side) into <out>/<name>.json, with every source's command")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, args.out, args.name)
        return
    if args.quick:
        args.datasets, args.seeds, args.clients, args.rounds, args.eval_every = "digits", "0", 4, 3, 1
        args.local_steps, args.finetune_rounds = 2, 1
    args.out.mkdir(parents=True, exist_ok=True)
    adapter = Adapter()
    algorithms = [a for a in args.algorithms.split(",") if a]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    results = {}
    t_all = time.perf_counter()
    ablation_seeds = seeds[:args.ablation_seeds] if args.ablation_seeds else seeds
    datasets = [d for d in args.datasets.split(",") if d]
    # order: the compared algorithms seed by seed, every dataset at each seed, then the (training-time) ablations
    jobs = [(seed, ds, alg) for seed in seeds for ds in datasets for alg in algorithms if alg not in ABLATIONS] + \
           [(seed, ds, alg) for seed in ablation_seeds for ds in datasets for alg in algorithms if alg in ABLATIONS]
    runs = {ds: {} for ds in datasets}
    for seed, ds, alg in jobs:
        for variant, rep in run(adapter, alg, ds, seed, args).items():
            runs[ds].setdefault(variant, []).append(rep)
        results[ds] = tabulate(runs[ds])
        _write(args, results, t_all)  # after every run: a stopped benchmark keeps what it measured
    print(markdown(results))


def tabulate(runs: dict) -> dict:
    runs = dict(sorted(((a, rs) for a, rs in runs.items() if rs), key=lambda kv: kv[0] != "harmony"))  # ours first
    table = {a: over_seeds([row(r) for r in rs]) for a, rs in runs.items()}
    out = {"seeds": sorted({r["seed"] for rs in runs.values() for r in rs}), "table": table, "runs": runs,
           "targets": targets(table, runs, "harmony") if "harmony" in runs else {}}
    if "local" in runs and "harmony" in runs:
        out["id_vs_local_per_client_pp"] = per_client_gap(runs["harmony"], runs["local"])
    out["deployed_differently"] = {a: d for a, rs in runs.items() if (d := deployment_difference(a, rs))}
    return out


def merge(paths: list, out: Path, name: str) -> None:
    """One table from several result files: their runs pooled per dataset and algorithm, the table and targets
    recomputed; ``meta.sources`` keeps each file's own meta (command, date, wall time)."""
    runs, sources = {}, []
    for path in paths:
        d = json.loads(Path(path).read_text())
        # an earlier merge's sources are carried over one by one (so results can be merged again)
        sources += d["meta"]["sources"] if "sources" in d["meta"] else [{"file": Path(path).name, **d["meta"]}]
        for ds, res in d["results"].items():
            for variant, reps in res["runs"].items():
                variant = current_name(variant, reps)
                have = runs.setdefault(ds, {}).setdefault(variant, [])
                seen = {r["seed"] for r in have}
                dup = [r["seed"] for r in reps if r["seed"] in seen]
                if dup:
                    raise SystemExit(f"{path}: {ds} {variant} seed {dup} is already in an earlier file")
                have.extend(reps)
    results = {ds: tabulate(r) for ds, r in runs.items()}
    meta = {"merged_from": [s["file"] for s in sources], "sources": sources,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "total_seconds": max(s["total_seconds"] for s in sources), "budget": sources[0]["budget"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=_json))
    plot_curves(results, out / f"{name}.png")
    plot_sweep(results, out / f"{name}_sweep.png")
    (out / f"{name}.md").write_text(markdown(results) + "\n")
    print(markdown(results))


def current_name(variant: str, reps: list) -> str:
    """The name today's ``algorithms.ALGORITHMS`` gives the algorithm a stored run recorded (``algorithm``): a
    default that changed since the run (deferral, off since 2026-12-02) moves the run to the name that now means
    what it measured ("harmony" with deferral -> "harmony-defer", "harmony-no-defer" -> "harmony").  A run no
    name describes exactly keeps its own."""
    from tfbitmeta.federated import algorithms as AL

    rec = reps[0].get("algorithm")
    if not rec or variant.endswith("-homogeneous"):
        return variant
    same = lambda a: {k: v for k, v in a.items() if k != "name"} == {k: v for k, v in rec.items() if k != "name"}  # noqa: E731
    if variant in AL.ALGORITHMS and same(AL.get(variant).to_dict()):
        return variant
    return next((n for n, a in AL.ALGORITHMS.items() if same(a.to_dict())), variant)


def deployment_difference(variant: str, reps: list) -> dict:
    """Deployment fields in which a stored run differs from what ``variant`` means today (e.g. deferral)."""
    from tfbitmeta.federated import algorithms as AL

    name = variant.replace("-homogeneous", "")
    rec = reps[0].get("algorithm")
    if not rec or name not in AL.ALGORITHMS:
        return {}
    now = AL.get(name).to_dict()
    return {k: rec[k] for k in AL.DEPLOYMENT_FIELDS if k != "name" and k in rec and rec[k] != now.get(k)}


def _write(args, results: dict, t_all: float) -> None:
    meta = {"command": "uv run python tools/bench_harmony.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "name", "quick")),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "total_seconds": time.perf_counter() - t_all,
            "budget": {"rounds": args.rounds, "local_steps": args.local_steps, "batch_size": args.batch_size,
                       "clients": args.clients}}
    path = args.out / f"{args.name}.json"
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=_json))
    plot_curves(results, args.out / f"{args.name}.png")
    plot_sweep(results, args.out / f"{args.name}_sweep.png")
    (args.out / f"{args.name}.md").write_text(markdown(results) + "\n")


if __name__ == "__main__":
    main()
