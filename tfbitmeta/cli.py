"""``tfbitmeta`` command line.

Commands:

* ``train``          -- MEBQAT (or a baseline) on an image dataset; few-shot methods on Omniglot.
* ``evaluate``       -- a trained run at many bitwidths (also few-shot runs, per episode setting).
* ``convert``        -- TFLite files per bitwidth and exit head with a manifest (MEBQAT, few-shot ProtoNet and
  federated runs).
* ``simulate``       -- hybrid split federated learning of heterogeneous clients in TensorFlow Federated.
* ``serve``          -- the fallback inference server (TF Serving's REST shape) for exported backends.
* ``classify``       -- the device runtime on one image: early exit, else ask the server.
* ``android-assets`` -- copy exported front ends and sample images into the Android demo's assets.
* ``android-apk``    -- build the signed Android demo APK with the exported models inside (android_demo/build-apk.sh).

TensorFlow is imported inside the commands, so ``tfbitmeta --help`` is instant (a command's ``--help`` imports
the registries its options list).  User errors print one line and exit 1; the option lists (methods, schemes,
algorithms) are the library's registries, and an error about one argument names its flag here, not in the
library.
"""
from __future__ import annotations

import faulthandler
import functools
import importlib
import json
import os
import signal
import sys
from pathlib import Path

import click

from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.federated.schedule import DEFAULT as DEFAULT_SCHEDULE, SCHEDULES
from tfbitmeta.federated.workers import install_reaper

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # hide C++ start-up noise (cuDNN/TensorRT)

MEBQAT_METHODS = "tfbitmeta.meta.methods:METHODS"
FEWSHOT_METHODS = "tfbitmeta.meta.fewshot.config:METHODS"
SCHEMES = "tfbitmeta.quant.quantizers:SCHEMES"
DEFAULT_SCHEME = "tfbitmeta.quant.quantizers:DEFAULT_SCHEME"
ALGORITHMS = "tfbitmeta.federated.algorithms:ALGORITHMS"


def registry(ref: str):
    """The object named by ``"module:attribute"``, imported on first use (registries live beside their code)."""
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


class RegistryChoice(click.Choice):
    """A ``click.Choice`` of the names in one or more registries (dicts keyed by name), imported when first needed,
    so the option list is the registry itself and ``tfbitmeta --help`` imports no TensorFlow."""

    def __init__(self, *refs: str):
        self._refs, self._names, self.case_sensitive = refs, None, True

    @property
    def choices(self) -> tuple[str, ...]:
        if self._names is None:
            self._names = tuple(name for ref in self._refs for name in registry(ref))
        return self._names


class RegistryDefaultOption(click.Option):
    """An option whose default is a library constant (``default_from="module:attribute"``), shown in ``--help``."""

    def __init__(self, *args, default_from: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._default_from = default_from

    def get_default(self, ctx, call=True):
        return registry(self._default_from)


def user_errors(fn):
    """Turn TfbitmetaError into click's one-line ``Error: ...`` with exit code 1, naming the flag at fault."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TfbitmetaError as e:
            raise click.ClickException(with_flag(str(e), e.param)) from None
    return wrapper


def with_flag(message: str, param: str | None) -> str:
    """``message`` plus the command-line flag of library argument ``param`` (when the command has one)."""
    ctx = click.get_current_context(silent=True)
    if param is None or ctx is None:
        return message
    opts = [p.opts[0] for p in ctx.command.params if p.name == param and isinstance(p, click.Option)]
    return f"{message} ({opts[0]})" if opts and opts[0] not in message else message


def fewshot_kind(method: str) -> str | None:
    """``"maml"`` or ``"protonet"`` for a few-shot method, None for the MEBQAT methods."""
    return None if method in registry(MEBQAT_METHODS) else registry(FEWSHOT_METHODS)[method]


def fewshot_options(fn):
    """Options of the few-shot methods (ignored by the others)."""
    opts = [
        click.option("--data-dir", type=click.Path(path_type=Path), default=Path("../shared/data/omniglot"),
                     show_default=True, help="few-shot: Omniglot zips or extracted <set>/<Alphabet>/<characterNN>/"),
        click.option("--ways", type=click.IntRange(2), default=None,
                     help="few-shot: N-way of the training episodes [default: 60 ProtoNet, 20 MAML]"),
        click.option("--shots", type=click.IntRange(1), default=1, show_default=True, help="few-shot: K-shot"),
        click.option("--queries", type=click.IntRange(1), default=None,
                     help="few-shot: training queries per class [default: 5 ProtoNet, 15 MAML]"),
        click.option("--augment/--no-augment", default=True, show_default=True,
                     help="few-shot: small random shifts/rotations/scale/slant of the training drawings"),
        click.option("--meta-batch", type=click.IntRange(1), default=4, show_default=True,
                     help="few-shot MAML: episodes per outer step"),
        click.option("--inner-steps", type=click.IntRange(0), default=5, show_default=True,
                     help="few-shot MAML: SGD steps on the support set (training and evaluation)"),
        click.option("--inner-lr", type=float, default=0.1, show_default=True, help="few-shot MAML: inner SGD lr"),
        click.option("--eval-episodes", type=click.IntRange(1), default=100, show_default=True,
                     help="few-shot: test episodes per bitwidth after training"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def run_kind(run: Path) -> str:
    """``mebqat``, ``fewshot`` or ``federated`` from the run's run.json (the commands dispatch on it)."""
    from tfbitmeta.runs import RunDir, run_kind as kind_of

    return kind_of(RunDir(run).read_meta())


def train_fewshot(method, dataset, width, scheme, bits, first_last, num_tasks, epochs, steps, lr, patience,
                  ckpt_every, seed, out, resume, quiet, data_dir, ways, shots, queries, augment, meta_batch,
                  inner_steps, inner_lr, eval_episodes):
    ctx = click.get_current_context()

    def given(name):
        return ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT

    if given("dataset") and dataset != "omniglot":
        raise TfbitmetaError(f"few-shot methods run on --dataset omniglot (got {dataset!r})")
    from tfbitmeta.meta.fewshot.config import METHODS, RECIPE, FewShotConfig, parse_train_bits
    from tfbitmeta.meta.fewshot.evaluation import format_rows
    from tfbitmeta.meta.fewshot.trainer import train as run_train
    from tfbitmeta.runs import TrainConfig
    from tfbitmeta.models.base import first_last_precision

    recipe = RECIPE[METHODS[method]]  # the default recipe unless a flag says otherwise
    fcfg = FewShotConfig(method=method, data_dir=str(data_dir), ways=ways or recipe.ways, shots=shots,
                         queries=queries or recipe.queries, meta_batch=meta_batch, num_tasks=num_tasks,
                         inner_steps=inner_steps, inner_lr=inner_lr, eval_inner_steps=inner_steps,
                         train_bits=parse_train_bits(method, bits), eval_episodes=eval_episodes, augment=augment)
    if not given("epochs") and steps is None:
        steps = recipe.steps
    tcfg = TrainConfig(method=method, dataset="omniglot", epochs=epochs, steps=steps,
                       lr=lr if given("lr") else recipe.lr, num_tasks=num_tasks, seed=seed, ckpt_every=ckpt_every,
                       patience=patience)
    width = width if given("width") else recipe.width
    result = run_train(out, tcfg, fcfg, width=width, scheme=scheme, first_last=first_last_precision(first_last, scheme),
                       resume=resume, progress=not quiet)
    st = result["meta"]["status"]
    click.echo(f"\n{method} on omniglot ({result['meta']['model']}, {result['meta']['scheme']}): {st['steps']} steps, "
               f"{st['train_seconds']:.0f} s; {result['meta']['episodes']} test episodes of unseen classes, "
               f"ONE checkpoint at every bitwidth:")
    click.echo(format_rows(result["rows"], result["baseline"]))
    click.echo(f"\nwrote {out / 'results.json'}, {out / 'accuracy_vs_bits.png'}, checkpoints in {out}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tfbitmeta")
def main():
    """Bitwidth-adaptive meta-learned QAT (MEBQAT) for TensorFlow/Keras."""
    install_reaper()
    # `kill -USR1 <pid>`: every thread's Python stack to the process's stderr (docs/stack.md), also when click's
    # test runner has replaced sys.stderr with an object that has no file descriptor
    if hasattr(signal, "SIGUSR1") and sys.__stderr__ is not None:
        try:
            faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
        except (OSError, ValueError):  # no usable descriptor (an embedding host): no stack dumps, nothing else lost
            pass


@main.command()
@click.option("--method", type=RegistryChoice(MEBQAT_METHODS, FEWSHOT_METHODS), default="mebqat", show_default=True,
              help="MEBQAT or a baseline (README, 'Training'); the few-shot methods train on Omniglot (README, 'Few-shot')")
@click.option("--dataset", default="digits", show_default=True,
              help="digits, fashion_mnist, a .npz file or an image directory (one sub-directory per class)")
@click.option("--model", "family", default="svhn_cnn", show_default=True,
              help="svhn_cnn, preact_resnet20 or mobilenet_v2")
@click.option("--width", type=float, default=2.0, show_default=True,
              help="width: svhn_cnn multiplier ep, preact_resnet20 base channels, mobilenet_v2 alpha")
@click.option("--scheme", cls=RegistryDefaultOption, type=RegistryChoice(SCHEMES), default_from=DEFAULT_SCHEME,
              show_default=True, help="exact: TFLite-exact integer grids; dorefa: the reference's Yu21 quantizer")
@click.option("--bits", default="all", show_default=True,
              help="candidate bitwidths, e.g. 'all' (1-8,16,fp) or '2,4,8,fp'; one value for --method dedicated")
@click.option("--w-eq-a/--pairs", default=None,
              help="train only w=a configurations, or every valid (w,a) pair [default: pairs for mebqat]")
@click.option("--first-last", type=click.Choice(["auto", "fp", "8"]), default="auto", show_default=True,
              help="precision of the first conv and the last dense (auto: fp for dorefa, 8 for exact)")
@click.option("--bn", "bn_mode", type=click.Choice(["calibrated", "batch"]), default="calibrated", show_default=True,
              help="calibrated: per-bitwidth BN statistics (batch-1 safe); batch: the reference's batch statistics")
@click.option("--tasks", "num_tasks", type=click.IntRange(1, 64), default=4, show_default=True,
              help="bitwidth tasks per step (mebqat)")
@click.option("--epochs", type=click.IntRange(1), default=3, show_default=True)
@click.option("--steps", type=click.IntRange(1), default=None, help="total optimizer steps (overrides --epochs)")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--exit-weight", type=float, default=0.5, show_default=True, help="loss weight of early-exit heads")
@click.option("--exit-distill", type=float, default=1.0, show_default=True,
              help="weight of the early exits' distillation from the final head")
@click.option("--exit-head", type=click.Choice(["grid", "gap"]), default="grid", show_default=True,
              help="early-exit head pooling: grid (max-pool to 3x3, flatten) or gap (global average, the old head)")
@click.option("--image-size", type=click.IntRange(4), default=None, help="resize images to N x N")
@click.option("--limit-train", type=click.IntRange(1), default=None, help="use only the first N training images")
@click.option("--patience", type=click.IntRange(1), default=None, help="early stopping after N epochs without gain")
@click.option("--ckpt-every", type=click.IntRange(1), default=100, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="run directory")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
@click.option("--quiet", is_flag=True, help="no progress bar")
@fewshot_options
@user_errors
def train(method, dataset, family, width, scheme, bits, w_eq_a, first_last, bn_mode, num_tasks, epochs, steps,
          batch_size, lr, exit_weight, exit_distill, exit_head, image_size, limit_train, patience, ckpt_every, seed, out, resume, quiet,
          **fewshot):
    """Train one model (MEBQAT by default) and print its test accuracy at every candidate bitwidth."""
    if fewshot_kind(method):
        return train_fewshot(method, dataset, width, scheme, bits, first_last, num_tasks, epochs, steps, lr,
                             patience, ckpt_every, seed, out, resume, quiet, **fewshot)
    from tfbitmeta.quant.bitwidth import parse_bits

    bit_values = parse_bits(bits)
    if method == "dedicated":
        if len(bit_values) != 1:
            raise TfbitmetaError("--method dedicated trains one bitwidth: pass one value, e.g. --bits 4", param="bits")
        w_eq_a = True
    elif w_eq_a is None:
        w_eq_a = method == "anyprec"
    from tfbitmeta.meta.evaluate import format_table
    from tfbitmeta.runs import TrainConfig
    from tfbitmeta.meta.train import ModelOptions
    from tfbitmeta.meta.train import train as run_train

    tcfg = TrainConfig(method=method, dataset=dataset, epochs=epochs, steps=steps, batch_size=batch_size, lr=lr,
                       num_tasks=num_tasks, exit_weight=exit_weight, exit_distill=exit_distill, seed=seed, ckpt_every=ckpt_every,
                       limit_train=limit_train, patience=patience)
    mopts = ModelOptions(family=family, width=width, scheme=scheme, bits=bit_values, w_eq_a=w_eq_a,
                         first_last=first_last, bn_mode=bn_mode, image_size=image_size, exit_head=exit_head)
    result = run_train(out, tcfg, mopts, resume=resume, progress=not quiet)
    m = result["meta"]
    click.echo(f"\n{m['method']} on {m['dataset']} ({m['model']}, {m['scheme']}): {m['steps']} steps, "
               f"{m['backward_passes']} backward passes, {m['train_seconds']:.0f} s; test accuracy of ONE checkpoint:")
    click.echo(format_table(result["rows"]))
    click.echo(f"\nwrote {out / 'results.json'}, {out / 'accuracy_vs_bits.png'}, checkpoints in {out}")


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--bits", default="all", show_default=True,
              help="'all' (every w=a candidate), 'pairs' (every (w,a) configuration) or a list like '2,4/8,fp'")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="where to write results [default: RUN]")
@click.option("--json", "as_json", is_flag=True, help="print the rows as JSON")
@click.option("--episodes", type=click.IntRange(1), default=600, show_default=True,
              help="few-shot runs: test episodes per setting and bitwidth")
@click.option("--setting", default="20w1s,5w1s", show_default=True,
              help="few-shot runs: N-way K-shot list like '20w1s,5w5s', 'train' (the trained one) or 'all' "
                   "(5w1s,5w5s,20w1s,20w5s)")
@click.option("--test-dir", type=click.Path(path_type=Path), default=None,
              help="few-shot runs: score on your own new alphabets instead of the run's test alphabets: an "
                   "images_evaluation folder/zip (<Alphabet>/<characterNN>/*.png) or the all_runs one-shot layout "
                   "(runNN/class_labels.txt, fixed 20-way episodes)")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="few-shot runs: also score the modified-Hausdorff baseline on the same episodes")
@click.option("--deployed/--no-deployed", default=True, show_default=True,
              help="also convert each bitwidth and report what the integer TFLite files answer (integer-exact "
                   "reference, whole test set) and the early-exit fraction / exit-or-continue accuracy")
@user_errors
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="federated runs: route every client on its exit head's max-softmax at this threshold "
                   "[default: each client's calibrated router, as convert exports it; else the run's threshold]")
def evaluate(run, bits, batch_size, out, as_json, episodes, setting, test_dir, baseline, deployed, threshold):
    """Evaluate a trained run at many bitwidths: fake-quant and deployed (integer) accuracy side by side, early
    exits at the validation-chosen threshold (table, results.json, accuracy_vs_bits.png); a federated run: its
    per-client table from the deployed checkpoints, each client routing as its exported front end does."""
    kind = run_kind(run)
    if kind == "federated":
        from tfbitmeta.federated.simulation import evaluate_run, format_table

        result = evaluate_run(run, threshold, write=False)
        click.echo(json.dumps(result, indent=2) if as_json else format_table(result))
        return
    if kind == "fewshot":
        from tfbitmeta.meta.fewshot.evaluation import evaluate_run, format_rows

        result = evaluate_run(run, bits, episodes, setting, out, test_dir=test_dir, baseline=baseline)
        click.echo(json.dumps({k: result[k] for k in ("rows", "baseline")}, indent=2) if as_json
                   else format_rows(result["rows"], result["baseline"]))
        return
    from tfbitmeta.meta.evaluate import format_table
    from tfbitmeta.meta.train import evaluate as run_evaluate

    result = run_evaluate(run, bits, batch_size, out, deployed=deployed, progress=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(result["rows"], indent=2) if as_json else format_table(result["rows"]))


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--bits", default=None,
              help="bitwidths to export (w=a), e.g. '2,4,8,fp' or 'all' [default: 2,4,8,fp; federated runs: 'own', "
                   "each client's own bitwidth]")
@click.option("--exits", default="all", show_default=True, help="early-exit heads (split numbers) or 'all'")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="output folder for .tflite files + manifest.json")
@click.option("--verify/--no-verify", default=False, show_default=True,
              help="compare every file with the Keras model on test images; fail below the parity target")
@click.option("--verify-images", type=click.IntRange(10), default=1000, show_default=True)
@click.option("--float16", is_flag=True, help="export full precision as float16 instead of float32")
@click.option("--int8-weights", is_flag=True,
              help="store 1-4 bit weights in INT8 instead of packed INT4: 2x the bytes, closer parity with Keras "
                   "(TFLite's requantization error shrinks with the finer weight scale; benchmarks/README.md)")
@click.option("--no-latency", is_flag=True, help="skip the batch-1 latency measurement")
@user_errors
def convert(run, bits, exits, out, verify, verify_images, float16, int8_weights, no_latency):
    """Export TFLite files per bitwidth and exit head (front end + backend) with a manifest.

    RUN may also be a `tfbitmeta simulate` run (every client's front end per bitwidth and the server backend) or
    a few-shot ProtoNet run (one embedding file per bitwidth; prototypes are computed on device)."""
    kind = run_kind(run)
    if kind == "federated":
        return _convert_federated(run, out, bits or "own", verify, verify_images, not int8_weights, not no_latency)
    bits = bits or "2,4,8,fp"
    if kind == "fewshot":
        from tfbitmeta.export.embedding import export_embeddings

        failed = []
        manifest = export_embeddings(run, bits, out, int4=not int8_weights, verify_episodes=50 if verify else 0,
                                     progress=lambda m: click.echo(m, err=True))
        for e in manifest["files"]:
            v = e.get("verify")
            click.echo(f"{e['path']:<24} {e['bytes']:>9} B  dim {e['embedding_dim']}"
                       + (f"  {v['setting']} accuracy tflite {100 * v['tflite_acc']:.2f}% / keras "
                          f"{100 * v['keras_calibrated_acc']:.2f}%, agreement {100 * v['prediction_agreement']:.2f}%"
                          f", {'bit-exact' if v['integer_reference']['bit_exact'] else 'NOT bit-exact' if v['integer_reference']['integer'] else 'float'}"
                          if v else ""))
            if v and not v["passed"]:
                failed.append(e["path"])
        if failed:
            raise click.ClickException(f"verification failed (interpreter != integer reference, or kernels != "
                                       f"the checkpoint's): {', '.join(failed)}")
        return
    from tfbitmeta.export.convert import export

    manifest = export(run, bits, exits, out, verify=verify, float16=float16, int4=not int8_weights, n_verify=verify_images,
                      measure_latency=not no_latency, progress=lambda m: click.echo(m, err=True))
    rows = []
    for f in manifest["files"]:
        v = f.get("verify") or {}
        ref = v.get("integer_reference") or {}
        rows.append(f"{f['path']:<28} {f['bytes']:>9} B  {f['weights']:<9}"
                    + ((f"  {'bit-exact' if ref.get('bit_exact') else 'NOT bit-exact' if ref.get('integer') else 'float':<13}"
                        f"  deployed acc {100 * v['tflite_accuracy']:.2f}% / fake-quant {100 * v['keras_accuracy']:.2f}%"
                        f"  agreement {100 * v['top1_agreement']:.2f}%") if v else ""))
        pol = f.get("exit_policy") or {}
        if pol.get("test"):
            t = pol["test"]
            rows.append(f"{'':<28} exit threshold {pol['threshold']:.2f} (validation): {100 * t['exit_fraction']:.1f}% exit "
                        f"early, exit-or-continue {100 * t['exit_or_continue_accuracy']:.2f}% vs full model "
                        f"{100 * t['full_accuracy']:.2f}%")
    click.echo("\n".join(rows))
    _report_written(manifest, out)


def _report_written(manifest: dict, out: Path) -> None:
    """The closing line of ``convert``; exit 1 when a verified file is below the parity target."""
    from tfbitmeta.export.convert import AGREEMENT_TARGET

    click.echo(f"wrote {len(manifest['files'])} files and {out / 'manifest.json'}")
    failed = [f["path"] for f in manifest["files"] if f.get("verify") and not f["verify"]["passed"]]
    if failed:
        raise click.ClickException(f"verification failed (integer files: interpreter != integer reference or kernels "
                                   f"!= the checkpoint's; float files: top-1 agreement with Keras below "
                                   f"{100 * AGREEMENT_TARGET:.1f}%): {', '.join(failed)}")


def _convert_federated(run, out, bits, verify, verify_images, int4, measure_latency):
    from tfbitmeta.export.federated import export_federated

    manifest = export_federated(run, out, bits, verify=verify, n_verify=verify_images, int4=int4,
                                measure_latency=measure_latency, progress=lambda m: click.echo(m, err=True))
    rows = []
    for f in manifest["files"]:
        v = f.get("verify") or {}
        who = f"client {f['client']} {f['architecture']}" if f["kind"] == "front_end" else "server backend"
        rows.append(f"{f['path']:<24} {f['bytes']:>9} B  {f['weights']:<9} {who:<30}"
                    + (f"  agreement {100 * v['top1_agreement']:.2f}%" if v else ""))
    click.echo("\n".join(rows))
    _report_written(manifest, out)


@main.command()
@click.option("--algorithm", type=RegistryChoice(ALGORITHMS), default="harmony", show_default=True, help="ours, an ablation, or a baseline (README, 'Federated simulation')")
@click.option("--dataset", default="fashion_mnist", show_default=True, help="digits, fashion_mnist, a .npz file or an image directory")
@click.option("--clients", type=click.IntRange(1), default=10, show_default=True)
@click.option("--classes-per-client", type=click.IntRange(1), default=2, show_default=True, help="ID classes per client (shards)")
@click.option("--dirichlet", type=float, default=None, help="Dirichlet alpha partition instead of class shards")
@click.option("--rounds", type=click.IntRange(1), default=30, show_default=True)
@click.option("--local-steps", type=click.IntRange(1), default=5, show_default=True, help="split exchanges per round")
@click.option("--batch-size", type=click.IntRange(2), default=32, show_default=True)
@click.option("--architectures", default="svhn_cnn-w4,svhn_cnn-w2,mobilenet_v2-w05", show_default=True,
              help="client front ends, assigned round-robin: svhn_cnn-w4/-w2/-w1, mobilenet_v2-w05/-w025, "
                   "preact_resnet20-w8/-w4 (core model families; README, 'Federated simulation')")
@click.option("--bits", default="2,4,8", show_default=True,
              help="candidate bitwidths (1-8, fp): every client meta-trains on all of them; each client's own "
                   "(default) bitwidth is assigned round-robin")
@click.option("--tasks", type=click.IntRange(1, 8), default=2, show_default=True,
              help="bitwidth tasks per client step (the device's own + sampled ones)")
@click.option("--lr", type=float, default=0.05, show_default=True,
              help="step size of the client and server SGD steps (and of the MAML inner step)")
@click.option("--lr-schedule", type=click.Choice(SCHEDULES), default=DEFAULT_SCHEDULE, show_default=True,
              help="per-round multiplier of the step size, the same for every algorithm: cosine decay over the "
                   "rounds, or constant (docs/federated.md, 'Learning rate')")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.8, show_default=True,
              help="early-exit confidence threshold: below it a client asks the server (algorithms without a "
                   "calibrated router, e.g. splitgp)")
@click.option("--keep-local", type=click.FloatRange(0, 1), default=None,
              help="calibrated routers (harmony): target share of a client's validation ID images answered on the "
                   "device; the printed table and convert place each router's threshold there [default: the "
                   "algorithm's, 0.95]")
@click.option("--validation-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="share of each client's training data held out to calibrate its router")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="probability that a client misses a round")
@click.option("--engine", type=click.Choice(["tff", "tf"]), default="tff", show_default=True,
              help="tff: TensorFlow Federated computations; tf: the same steps in a plain TF loop")
@click.option("--workers", default="", help="host:port,... of running TFF worker_binary processes (README)")
@click.option("--limit-train", type=click.IntRange(1), default=None, help="use only the first N training images")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="run directory")
@click.option("--quiet", is_flag=True, help="no progress bar")
@user_errors
def simulate(algorithm, dataset, clients, classes_per_client, dirichlet, rounds, local_steps, batch_size, architectures,
             bits, tasks, lr, lr_schedule, threshold, keep_local, validation_fraction, dropout, engine, workers,
             limit_train, seed, out, quiet):
    """Hybrid split federated learning (HARMONY-style) of heterogeneous, bitwidth-adaptive clients."""
    from tfbitmeta.federated.simulation import SimConfig, format_table
    from tfbitmeta.federated.simulation import simulate as run_simulation

    cfg = SimConfig(algorithm=algorithm, dataset=dataset, clients=clients, classes_per_client=classes_per_client,
                    dirichlet=dirichlet, rounds=rounds, local_steps=local_steps, batch_size=batch_size,
                    architectures=architectures, bits=bits, tasks=tasks, lr=lr, inner_lr=lr, server_lr=lr,
                    lr_schedule=lr_schedule, threshold=threshold, keep_local=keep_local,
                    validation_fraction=validation_fraction, dropout=dropout, engine=engine, workers=[w for w in workers.split(",") if w.strip()],
                    limit_train=limit_train, seed=seed)
    sim, results = run_simulation(cfg, out, progress=not quiet)
    took = sum(results["round_seconds"])
    click.echo(f"\n{algorithm} on {dataset}: {clients} clients, {rounds} rounds in {took:.0f} s ({engine} engine)")
    click.echo(format_table(results))
    click.echo(f"\nwrote the run (kind federated) to {out}: run.json, results.json, results.png, predictions.npz, "
               f"clients/, server/ (convert it: tfbitmeta convert {out} --out MODELS)")


@main.command()
@click.option("--models", type=click.Path(path_type=Path), required=True, help="folder with manifest.json (tfbitmeta convert)")
@click.option("--run", type=click.Path(path_type=Path), default=None,
              help="checkpoint for on-demand front ends at any bitwidth (GET /v1/frontends/...)")
@click.option("--host", default="127.0.0.1", show_default=True, help="beyond loopback a bearer token is required")
@click.option("--port", type=click.IntRange(0, 65535), default=8500, show_default=True)
@click.option("--token", envvar="TFBITMETA_TOKEN", default=None, help="bearer token (or TFBITMETA_TOKEN)")
@click.option("--max-batch", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option("--max-delay-ms", type=click.FloatRange(0, 1000), default=2.0, show_default=True,
              help="longest wait of a batch's first request for company")
@click.option("--batch-idle-ms", type=click.FloatRange(0, 1000), default=0.3, show_default=True,
              help="a batch closes when no request arrived for this long")
@click.option("--max-body-bytes", type=click.IntRange(1024), default=4 << 20, show_default=True)
@click.option("--timeout", "timeout_s", type=click.FloatRange(0.1), default=10.0, show_default=True,
              help="seconds per prediction (queue + backend)")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=None,
              help="also serve TF Serving's gRPC PredictionService on this port (e.g. 8501)")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="server processes sharing the port(s); each loads the backends")
@click.option("--floor-endpoint", is_flag=True, hidden=True,
              help="POST /v1/floor and gRPC model __floor__ answer a constant (load benchmark)")
@user_errors
def serve(models, run, host, port, token, max_batch, max_delay_ms, batch_idle_ms, max_body_bytes, timeout_s, grpc_port,
          workers, floor_endpoint):
    """Fallback inference server (TF Serving REST and gRPC shape) for the exported backends."""
    from tfbitmeta.serve.config import ServeConfig

    cfg = ServeConfig(models=models, run=run, host=host, port=port, token=token, max_batch=max_batch,
                      max_delay_ms=max_delay_ms, batch_idle_ms=batch_idle_ms, max_queue=max(4096, 4 * max_batch),
                      max_body_bytes=max_body_bytes,
                      request_timeout_s=timeout_s, grpc_port=grpc_port, workers=workers, floor_endpoint=floor_endpoint)
    cfg.check_security()
    from tfbitmeta.serve.models import read_manifest
    from tfbitmeta.serve.runner import serve_forever

    n = sum(f["kind"] == "backend" for f in read_manifest(cfg.models)["files"])  # a bad folder fails here, clearly
    grpc = f" and gRPC on {host}:{grpc_port}" if grpc_port else ""
    click.echo(f"serving {n} backends from {models} on http://{host}:{port}{grpc} ({workers} worker"
               f"{'s' if workers > 1 else ''})", err=True)
    serve_forever(cfg)


@main.command()
@click.argument("image", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--models", type=click.Path(path_type=Path), required=True, help="folder with manifest.json")
@click.option("--bits", default=None, help="front-end bitwidth, e.g. 4, 4/8 or fp [default: the largest local one]")
@click.option("--memory-budget", type=click.IntRange(1), default=None, help="pick the largest front end within N bytes")
@click.option("--exit", "exit_", type=int, default=None, help="early-exit head [default: the last]")
@click.option("--client", type=click.IntRange(0), default=None,
              help="federated models: the client whose front end to run (required when the manifest has several)")
@click.option("--server", default=None, help="fallback server URL, e.g. http://127.0.0.1:8500")
@click.option("--token", envvar="TFBITMETA_TOKEN", default=None, help="bearer token (or TFBITMETA_TOKEN)")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0.01), default=2.0, show_default=True, help="server timeout (s)")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None, help="exit confidence: route on the exit head's max-softmax at this threshold [default: the "
                   "manifest's router]")
@click.option("--json", "as_json", is_flag=True, help="print the answer as JSON")
@user_errors
def classify(image, models, bits, memory_budget, exit_, client, server, token, timeout_s, threshold, as_json):
    """Classify one image on the device side, falling back to the server when the early exit is unsure."""
    import dataclasses

    from tfbitmeta.device.image import load_pixels
    from tfbitmeta.device.runtime import DeviceRuntime
    from tfbitmeta.quant.bitwidth import parse_config

    rt = DeviceRuntime(models, server, token, timeout_s)
    a = rt.classify(load_pixels(image, rt.manifest), parse_config(bits) if bits else None, memory_budget, exit_, threshold,
                    client=client)
    if as_json:
        click.echo(json.dumps({**dataclasses.asdict(a), "fell_back": a.fell_back}))
        return
    click.echo(f"{image}: {a.label} ({100 * a.confidence:.1f}%) via {a.decision} [{a.front_end}, "
               + (f"exit threshold {a.threshold:.2f}]" if a.route == "max_softmax" else
                  f"{a.route} router: score {a.route_score:.1f}, threshold {a.threshold:.1f}]"))
    click.echo(f"  device (early exit): {a.local_label} ({100 * a.local_confidence:.1f}%)")
    click.echo(f"  server: {f'{a.server_label} ({100 * a.server_confidence:.1f}%)' if a.server_label else a.offline_reason or 'not asked'}")
    click.echo(f"  fell back: {'yes' if a.fell_back else 'no'}{' (OFFLINE: local answer)' if a.decision == 'offline' else ''};"
               f" latency {a.latency_ms['total']:.1f} ms (front end {a.latency_ms['front_end']:.2f} ms"
               + (f", server {a.latency_ms['server']:.1f} ms)" if "server" in a.latency_ms else ")"))


@main.command("android-assets")
@click.argument("models", type=click.Path(path_type=Path, file_okay=False))
@click.argument("dest", type=click.Path(path_type=Path, file_okay=False))
@click.option("--run", type=click.Path(path_type=Path), default=None,
              help="the checkpoint the models came from: writes its first test images as bundled samples")
@click.option("--samples", type=click.IntRange(1, 100), default=8, show_default=True)
@user_errors
def android_assets(models, dest, run, samples):
    """Copy manifest, front ends (sha256-checked) and sample images into the Android demo's assets folder."""
    from tfbitmeta.device.android_assets import copy_assets

    r = copy_assets(models, dest, run, samples)
    click.echo(f"wrote {len(r['front_ends'])} front ends and manifest.json to {dest / 'models'}"
               + (f", {len(r['samples'])} samples to {dest / 'samples'}" if r["samples"] else
                  " (no samples: pass --run RUN; the gallery still works)"))



@main.command("android-apk")
@click.argument("models", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--run", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
              help="the checkpoint the models came from: bundles its first test images as samples")
@click.option("--abi", default="all", show_default=True,
              help="ABIs of the TFLite native library: all, or a list of arm64-v8a,armeabi-v7a,x86,x86_64")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="the APK  [default: android_demo/build/tfbitmeta-demo-debug.apk]")
@click.option("--keystore", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="sign with this keystore instead of the Android debug key")
@click.option("--ks-alias", default=None, help="key alias in --keystore")
@click.option("--ks-pass", default=None, help="keystore password as apksigner takes it: pass:..., env:VAR, file:PATH")
@user_errors
def android_apk(models, run, abi, out, keystore, ks_alias, ks_pass):
    """Build the Android demo as a signed APK with MODELS inside (android_demo/build-apk.sh), for `adb install -r`."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "android_demo" / "build-apk.sh"
    if not script.is_file():
        raise TfbitmetaError(f"{script} not found: building the APK needs the repository checkout")
    cmd = ["bash", str(script), str(models), "--abi", abi]
    for flag, value in (("--run", run), ("--out", out), ("--keystore", keystore), ("--ks-alias", ks_alias),
                        ("--ks-pass", ks_pass)):
        if value is not None:
            cmd += [flag, str(value)]
    rc = subprocess.call(cmd)
    if rc:
        raise click.ClickException(f"{script.name} failed (exit {rc})")


if __name__ == "__main__":
    sys.exit(main())
