"""Issue 16's tests against the server and device code from before its fixes: which defect each test proves.

Two trees are laid out from git (nothing in the work tree changes): *after* is ``--new`` (default HEAD) as
committed; *before* is the same tree with ``tfbitmeta/serve`` and ``tfbitmeta/device`` replaced by the versions at
``--old`` (default: the first parent of the merge of branch 'serve' that closed issue 16's hardening, i.e. main
just before the fixes landed), plus a one-line re-export for each module the old code imports that has moved since
(``MOVED``) and today's call sites of arguments the old code did not have yet dropped (``ADAPT``). Both run the *current* server/device tests (tests/test_serve.py, test_grpc.py,
test_device.py) with a per-test timeout (pytest-timeout, so a hang counts as a failure), each tree on the
project's environment with its own tree first on ``sys.path``. Every test is mapped to the issue's numbered
defect(s) it covers (``DEFECTS`` below); a defect is *proven* when at least one of its tests fails before and all
of them pass after. A test that passes before proves nothing for its defect and is listed as such.

Writes ``--out`` (JSON). About 2 x 5 min on 2 shared cores.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_serve.py", "tests/test_grpc.py", "tests/test_device.py"]
OLD_PACKAGES = ["tfbitmeta/serve", "tfbitmeta/device"]
# modules the old code imports that have moved since: the before tree gets a one-line re-export for each (the
# names, signatures and behaviour used by the old code are unchanged; only the module path moved)
MOVED = {"tfbitmeta/meta/run.py": "from tfbitmeta.runs import RunDir, TrainConfig  # noqa: F401\n"}
# call sites in today's tree of arguments the old code did not have yet (federated clients, added after the fixes):
# dropped in the before tree, so a test fails there on the defect, not on the signature
ADAPT = {"tfbitmeta/cli.py": [("a = rt.classify(load_pixels(image, rt.manifest), parse_config(bits) if bits else None, "
                               "memory_budget, exit_, threshold,\n                    client=client)",
                               "a = rt.classify(load_pixels(image, rt.manifest), parse_config(bits) if bits else None, "
                               "memory_budget, exit_, threshold)")]}

# test name (or name[param]) -> the defects of issue 16 it covers ("5:<item>" names the part of defect 5)
DEFECTS = {
    "test_huge_header_gets_431_and_a_closed_connection_while_health_stays_fast": ["1"],
    "test_idle_and_half_header_connections_are_closed": ["2"],
    "test_on_demand_backend_survives_a_restart_and_bad_cache_is_cleaned": [
        "3", "5:partial folders removed", "5:manifest written atomically", "5:sha256 re-checked at start"],
    # the corpus also holds boundary cases next to these ("JSON nested 900 deep", "deep tensor object", "64-bit
    # integer scale", "huge float", "huge zero point"): inputs the old code already answered right, kept as
    # regression cases, not counted as proofs
    **{f"test_bad_request_gets_a_clear_4xx_and_the_server_keeps_working[{c}]": ["4:deep JSON"]
       for c in ("JSON nested 1000 deep", "JSON nested 100000 deep")},
    **{f"test_bad_request_gets_a_clear_4xx_and_the_server_keeps_working[{c}]": ["4:dtype not a string"]
       for c in ("dtype is a list", "dtype is an object")},
    **{f"test_bad_request_gets_a_clear_4xx_and_the_server_keeps_working[{c}]": ["4:huge numbers"]
       for c in ("huge integer scale",)},
    **{f"test_bad_request_gets_a_clear_4xx_and_the_server_keeps_working[{c}]": ["4:non-ASCII digits"]
       for c in ("non-ASCII digit in exit", "Arabic digit in exit", "non-ASCII digit in bits")},
    "test_bad_request_gets_a_clear_4xx_and_the_server_keeps_working[trailing slash]": ["5:redirect reflects Host"],
    "test_errors_keep_the_connection_and_pipelined_requests_answered": ["4:500 closes keep-alive, traceback logged"],
    "test_failed_conversion_is_remembered_and_waiting_is_bounded": ["5:failed conversions retried, waiting unbounded"],
    "test_token_must_be_sendable_and_health_hides_details": ["5:unsendable tokens, /healthz details"],
    "test_large_bodies_are_parsed_off_the_event_loop": ["5:large bodies parsed on the event loop"],
    "test_mixed_bitwidth_that_cannot_export_is_a_400_with_the_reason": ["5:w2afp answers 404"],
    "test_timeout_is_a_deadline_for_a_trickling_server": ["6"],
    **{f"test_impossible_or_hostile_answers_are_offline[{c}]": ["7"]
       for c in ("nested 100000 deep", "nested 1000 deep")},
    **{f"test_impossible_or_hostile_answers_are_offline[{c}]": ["9:impossible probabilities"]
       for c in ("negative", "huge", "not summing to 1", "wrong count", "two rows", "strings", "booleans",
                 "not an object")},
    "test_impossible_or_hostile_answers_are_offline[large answer]": ["9:response size capped"],
    "test_a_huge_answer_is_not_read": ["9:response size capped"],
    "test_a_poisoned_front_end_is_never_cached": ["8"],
    "test_grpc_predict_matches_the_backend_in_float_int8_and_packed_forms": ["gRPC endpoint"],
    "test_grpc_token_and_validation_use_status_codes": ["gRPC endpoint"],
    "test_grpc_and_rest_batch_concurrent_requests": ["gRPC endpoint"],
    "test_packed_rest_payload_is_k_bits_per_value_and_exact": ["packed k-bit payload"],
    "test_latency_model_uses_the_request_bytes": ["packed k-bit payload"],
}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def default_old() -> str:
    """The first parent of the merge of branch 'serve' for issue 16 (main just before the fixes)."""
    for line in git("log", "--merges", "--format=%H %s").splitlines():
        sha, subject = line.split(" ", 1)
        if subject.startswith("Merge branch 'serve'") and "issue 16" in subject:
            return git("rev-parse", f"{sha}^1")
    raise SystemExit("no merge of branch 'serve' for issue 16 found: pass --old")


def lay_out(rev: str, dest: Path, paths: list[str] | None = None) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev, *(paths or [])], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def run_tests(tree: Path, timeout: int, log: Path) -> dict[str, dict]:
    """Each test file in its own pytest session (a module the old code cannot import fails alone)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "TF_CPP_MIN_LOG_LEVEL": "3"}
    results, t0 = {}, time.monotonic()
    for i, test_file in enumerate(TESTS):
        xml = tree / f"junit-{i}.xml"
        cmd = ["uv", "run", "--project", str(ROOT), "--with", "pytest-timeout", "python", "-m", "pytest", test_file,
               # --tb=line: the old code's RecursionError can leave CPython's recursion counter off, and pytest's
               # long tracebacks then die in ast.parse (INTERNALERROR, the rest of the file unreported)
               "-q", "--tb=line", "-p", "no:cacheprovider", f"--timeout={timeout}", f"--junitxml={xml}", "-o",
               "junit_family=xunit1"]
        with open(log, "a") as f:
            subprocess.run(cmd, cwd=tree, env=env, stdout=f, stderr=subprocess.STDOUT)
        for case in ET.parse(xml).iter("testcase"):
            failure = next((c for c in case if c.tag in ("failure", "error")), None)
            skipped = next((c for c in case if c.tag == "skipped"), None)
            outcome = "failed" if failure is not None else "skipped" if skipped is not None else "passed"
            detail = failure if failure is not None else skipped
            name = case.get("name") if case.get("classname") else f"collecting {test_file}"
            results[name] = {"outcome": outcome, "reason": _reason(detail) if detail is not None else None}
    print(f"{tree.name}: {time.monotonic() - t0:.0f} s", flush=True)
    return results


def _reason(node) -> str:
    """One line: the exception and its message (pytest's own message, or the last 'E ' line of the report)."""
    message = (node.get("message") or "").strip()
    lines = [ln[1:].strip() for ln in (node.text or "").splitlines() if ln.startswith("E ")]
    text = message.splitlines()[0] if message else (lines[0] if lines else "")
    return re.sub(r"\s+", " ", text)[:300]


def kind(reason: str | None) -> str | None:
    """What kind of failure: the behaviour checked ('behaviour'), a hang ('timeout') or code the old tree lacks."""
    if reason is None:
        return None
    if "Timeout" in reason:
        return "timeout"
    if re.search(r"not collected|ImportError|ModuleNotFoundError|has no attribute|unexpected keyword|cannot import", reason):
        return "missing in the old code"
    return "behaviour"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", help="revision of the code before the fixes [the merge's first parent]")
    ap.add_argument("--new", default="HEAD", help="revision with the fixes and the tests")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per test (a hang counts as a failure)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/before_after.json")
    args = ap.parse_args(argv)
    old, new = git("rev-parse", args.old or default_old()), git("rev-parse", args.new)

    work = Path(tempfile.mkdtemp(prefix="before_after-"))
    try:
        after, before = work / "after", work / "before"
        lay_out(new, after)
        lay_out(new, before)
        for p in OLD_PACKAGES:
            shutil.rmtree(before / p)
        lay_out(old, before, OLD_PACKAGES)
        for path, text in MOVED.items():
            (before / path).write_text(text)
        for path, edits in ADAPT.items():
            text = (before / path).read_text()
            for old_text, new_text in edits:
                if old_text not in text:
                    raise SystemExit(f"{path}: the call to adapt has changed; update ADAPT")
                text = text.replace(old_text, new_text)
            (before / path).write_text(text)
        res_before = run_tests(before, args.timeout, work / "before.log")
        res_after = run_tests(after, args.timeout, work / "after.log")
        tails = {name: [ln for ln in (work / f"{name}.log").read_text().splitlines()
                        if re.match(r"^\d+ (passed|failed|errors?|skipped)\b.* in [\d.]+s", ln)]
                 for name in ("before", "after")}
        logs = Path(tempfile.gettempdir()) / "before_after-logs"
        logs.mkdir(exist_ok=True)
        for name in ("before", "after"):
            shutil.copy(work / f"{name}.log", logs / f"{name}.log")
        print(f"pytest output: {logs}/before.log, after.log")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    tests, defects = [], {}
    collect_errors = {k: v for k, v in res_before.items() if k.startswith("collecting ")}
    for name in sorted(set(res_after) | set(res_before) - set(collect_errors)):
        a = res_after.get(name, {"outcome": "absent"})
        # a test the old tree could not even collect failed there: its module needs code the old tree lacks
        b = res_before.get(name) or {"outcome": "failed", "reason": "not collected: " + "; ".join(
            f"{k}: {v['reason']}" for k, v in collect_errors.items())[:300]}
        covers = DEFECTS.get(name, [])
        tests.append({"test": name, "defects": covers, "before": b["outcome"], "after": a["outcome"],
                      "before_reason": b.get("reason"), "before_kind": kind(b.get("reason")),
                      "after_reason": a.get("reason")})
        for d in covers:
            defects.setdefault(d, []).append(tests[-1])
    summary = {}
    for d, ts in sorted(defects.items()):
        failing_before = [t["test"] for t in ts if t["before"] == "failed"]
        summary[d] = {"tests": len(ts), "failed_before": len(failing_before),
                      "passed_after": sum(t["after"] == "passed" for t in ts),
                      "proven": bool(failing_before) and all(t["after"] == "passed" for t in ts),
                      "behaviour_failures_before": sum(t["before_kind"] == "behaviour" for t in ts),
                      "pass_before_too": [t["test"] for t in ts if t["before"] == "passed"]}
    unmapped = [t["test"] for t in tests if not t["defects"]]
    result = {
        "command": "uv run python tools/before_after.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "old": old, "new": new, "old_packages": OLD_PACKAGES, "moved_modules_shimmed": MOVED,
        "adapted_call_sites": ADAPT, "tests_run": TESTS, "timeout_s": args.timeout,
        "pytest_last_line": tails, "collection_errors_before": collect_errors, "defects": summary,
        "regression_tests": {"count": len(unmapped), "passed_after": sum(res_after.get(t, {}).get("outcome") == "passed"
                                                                         for t in unmapped)},
        "tests": tests,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    width = max(map(len, summary))
    for d, s in summary.items():
        print(f"{d:<{width}}  {'proven' if s['proven'] else 'NOT proven'}: {s['failed_before']}/{s['tests']} fail "
              f"before ({s['behaviour_failures_before']} on behaviour), {s['passed_after']}/{s['tests']} pass after"
              + (f"; pass before too: {s['pass_before_too']}" if s["pass_before_too"] else ""))


if __name__ == "__main__":
    main()
