"""Every ``from tfbitmeta... import name`` in the package and the tools names something that exists.

Imports inside functions (lazy, to keep TFF and TensorFlow off paths that do not need them) only fail when that
function runs, and the benchmark tools do not run in CI: this reads them statically instead."""
from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted([*ROOT.glob("tfbitmeta/**/*.py"), *ROOT.glob("tools/*.py"), *ROOT.glob("tests/*.py")])


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tfbitmeta") and node.level == 0:
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("tfbitmeta"):
                    yield node.lineno, a.name, []


def test_the_scan_sees_lazy_imports():
    found = {(m, tuple(n)) for _, m, n in _imports(ROOT / "tools" / "bench_latency.py")}
    assert ("tfbitmeta.quant.bitwidth", ("parse_bits",)) in found  # imported inside a function


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_tfbitmeta_import_resolves(path):
    missing = []
    for line, module, names in _imports(path):
        if importlib.util.find_spec(module) is None:
            missing.append(f"{path.name}:{line}: no module {module}")
            continue
        if not names:
            continue
        mod = None
        for name in names:
            if importlib.util.find_spec(f"{module}.{name}") if _is_package(module) else False:
                continue  # a submodule
            mod = mod or importlib.import_module(module)
            if not hasattr(mod, name):
                missing.append(f"{path.name}:{line}: {module} has no {name}")
    assert not missing, "\n".join(missing)


def _is_package(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.submodule_search_locations is not None
