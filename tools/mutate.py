"""A small mutation run: do the tests of a module fail when its code is changed?

For every mutable spot in the target modules (a comparison, an arithmetic or boolean operator, a number, a
``not``, a ``return``'s value) one mutant is made by editing the module's syntax tree; the module's tests run
against it in this process (TensorFlow is imported once), and the mutant is *killed* if any test fails or errors.
A test suite that asserts nothing kills nothing.  Results go to ``benchmarks/results/mutation.json``.

    uv run python tools/mutate.py                      # quantizers.py + bitwidth.py against their tests
    uv run python tools/mutate.py --limit 20 --seed 1  # a random sample of 20 mutants
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import io
import json
import os
import random
import signal
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {
    "tfbitmeta.quant.quantizers": ["tests/test_quantizers.py"],
    "tfbitmeta.quant.bitwidth": ["tests/test_bitwidth.py", "tests/test_quantizers.py"],
}
# modules re-imported for every mutant (the targets and what imports them by name)
FRESH = ("tfbitmeta.quant", "tfbitmeta.quant.bitwidth", "tfbitmeta.quant.quantizers")

SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
        ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div,
        ast.Div: ast.Mult, ast.Pow: ast.Mult, ast.FloorDiv: ast.Div, ast.And: ast.Or, ast.Or: ast.And}


def _skip(node, parents) -> bool:
    """Type annotations are not behaviour."""
    return any(isinstance(p, (ast.arg, ast.AnnAssign)) for p in parents) or isinstance(node, ast.arg)


def mutation_points(tree: ast.AST) -> list[tuple[str, int, int]]:
    """(kind, node index in ast.walk order, line) of every mutable spot."""
    points = []
    parents: dict[int, list] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[id(child)] = [*parents.get(id(node), []), node]
    for i, node in enumerate(ast.walk(tree)):
        ps = parents.get(id(node), [])
        if _skip(node, ps):
            continue
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Compare):
            points += [("compare", i, line)] * sum(type(op) in SWAP for op in node.ops[:1])
        elif isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in SWAP:
            points.append(("operator", i, line))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            points.append(("not", i, line))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float) and not isinstance(node.value, bool):
            points.append(("number", i, line))
        elif isinstance(node, ast.Return) and node.value is not None:
            points.append(("return", i, line))
    return points


def mutate(tree: ast.AST, index: int) -> tuple[ast.AST, str]:
    tree = copy.deepcopy(tree)
    node = list(ast.walk(tree))[index]
    if isinstance(node, ast.Compare):
        old = type(node.ops[0])
        node.ops[0] = SWAP[old]()
        what = f"{old.__name__} -> {type(node.ops[0]).__name__}"
    elif isinstance(node, (ast.BinOp, ast.BoolOp)):
        old = type(node.op)
        node.op = SWAP[old]()
        what = f"{old.__name__} -> {type(node.op).__name__}"
    elif isinstance(node, ast.UnaryOp):
        target = node

        class DropNot(ast.NodeTransformer):
            def visit_UnaryOp(self, n):
                return n.operand if n is target else self.generic_visit(n)

        tree = DropNot().visit(tree)
        what = "not x -> x"
    elif isinstance(node, ast.Constant):
        old = node.value
        node.value = old + 1 if isinstance(old, int) else (old * 2 if old else 1.0)
        what = f"{old!r} -> {node.value!r}"
    else:  # Return
        node.value = ast.Constant(value=None)
        what = "return x -> return None"
    ast.fix_missing_locations(tree)
    return tree, what


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout()


# Pure, slow (seconds) functions whose result is reused when a mutant leaves their code (and module) untouched.
REUSE = {"tfbitmeta.quant.quantizers": ["gaussian_clip_ratios"]}
_reused: dict[str, object] = {}


def _function_source(tree: ast.AST, name: str) -> str | None:
    return next((ast.dump(n) for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name), None)


def run_tests(module: str, code, tests: list[str], timeout: int, original: ast.AST | None = None,
              mutant: ast.AST | None = None) -> str:
    """Install ``code`` as ``module`` (None: the original), run ``tests``; "killed", "survived" or "timeout"."""
    import pytest

    for name in [*FRESH, *(m for m in sys.modules if m.startswith("test_") or m == "conftest")]:
        sys.modules.pop(name, None)
    if code is not None:
        mod = types.ModuleType(module)
        mod.__file__ = str(ROOT / (module.replace(".", "/") + ".py"))
        sys.modules[module] = mod
        exec(code, mod.__dict__)
        for fn in REUSE.get(module, []):
            if fn in _reused and _function_source(original, fn) == _function_source(mutant, fn):
                setattr(mod, fn, _reused[fn])
    else:
        for mod_name, fns in REUSE.items():
            import importlib

            loaded = importlib.import_module(mod_name)
            _reused.update({fn: getattr(loaded, fn) for fn in fns})
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests])
    except Timeout:
        return "timeout"
    finally:
        signal.alarm(0)
    return "survived" if rc == 0 else "killed"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="a random sample of N mutants (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=120, help="seconds per mutant")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/mutation.json")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT / "tests"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    baseline = {m: run_tests(m, None, t, args.timeout * 3) for m, t in TARGETS.items()}
    if any(v != "survived" for v in baseline.values()):
        raise SystemExit(f"the unmutated tests do not pass: {baseline}")
    jobs = []
    for module, tests in TARGETS.items():
        path = ROOT / (module.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text())
        jobs += [(module, tests, tree, kind, i, line) for kind, i, line in mutation_points(tree)]
    if args.limit and args.limit < len(jobs):
        jobs = random.Random(args.seed).sample(jobs, args.limit)
    results, t0 = [], time.time()
    for n, (module, tests, tree, kind, i, line) in enumerate(jobs, 1):
        t_mutant = time.time()
        mutant, what = mutate(tree, i)
        code = compile(mutant, str(ROOT / (module.replace(".", "/") + ".py")), "exec")
        try:
            status = run_tests(module, code, tests, args.timeout, tree, mutant)
        except Exception as e:  # noqa: BLE001 -- a mutant that breaks the import is killed by any test
            status = f"killed ({type(e).__name__} at import)"
        results.append({"module": module, "line": line, "kind": kind, "mutation": what, "status": status,
                        "seconds": round(time.time() - t_mutant, 1)})
        print(f"[{n}/{len(jobs)}] {module}:{line} {what}: {status} ({time.time() - t_mutant:.0f} s)",
              file=sys.__stderr__, flush=True)
    killed = sum(r["status"] != "survived" for r in results)
    summary = {"command": "uv run python tools/mutate.py" + (f" --limit {args.limit} --seed {args.seed}"
                                                             if args.limit else ""),
               "targets": TARGETS, "mutants": len(results), "killed": killed,
               "survived": len(results) - killed, "score": round(killed / max(len(results), 1), 4),
               "seconds": round(time.time() - t0, 1),
               "by_module": {m: {"mutants": sum(r["module"] == m for r in results),
                                 "killed": sum(r["module"] == m and r["status"] != "survived" for r in results)}
                             for m in TARGETS},
               "survivors": [r for r in results if r["status"] == "survived"], "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"mutation: {killed} of {len(results)} mutants killed ({100 * summary['score']:.1f} %); "
          f"{len(results) - killed} survived; wrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
