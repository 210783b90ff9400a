"""The test suite itself: every test asserts something (directly, through pytest.raises / numpy's assert_*, or
through a helper of its module that does).  The strength of the asserts is measured by the mutation run
(tools/mutate.py, benchmarks/results/mutation.json)."""
import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _asserts(node: ast.AST, helpers: set[str]) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Assert):
            return True
        if isinstance(n, ast.Call):
            f = n.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if "assert" in name or name in ("raises", "fail") or name in helpers:
                return True
    return False


def test_every_test_asserts_something():
    silent = []
    for path in sorted(TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        helpers: set[str] = set()
        for _ in range(3):  # helpers that assert, and helpers calling those
            helpers |= {f.name for f in funcs if not f.name.startswith("test_") and _asserts(f, helpers)}
        silent += [f"{path.name}::{f.name}" for f in funcs if f.name.startswith("test_") and not _asserts(f, helpers)]
    assert not silent, f"tests that assert nothing: {silent}"


def test_the_check_can_fail():
    tree = ast.parse("def test_nothing():\n    x = 1 + 1\n")
    assert not _asserts(tree.body[0], set())
    assert _asserts(ast.parse("def t():\n    helper()\n").body[0], {"helper"})
