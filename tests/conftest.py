import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import psutil  # noqa: E402
import pytest  # noqa: E402

from tfbitmeta.federated.workers import reap_workers, stop_local_services, worker_processes  # noqa: E402


WORKER_PID_FILE = os.environ.get("TFBITMETA_WORKER_PIDS")
"""Set by ``.ci/run``: every TFF worker this session starts is recorded there ("pid create_time" lines), so the
CI safety net stops and checks only processes of this run, never other jobs' workers."""


def record_workers() -> None:
    if WORKER_PID_FILE:
        with open(WORKER_PID_FILE, "a") as f:
            for p in worker_processes():
                try:
                    f.write(f"{p.pid} {p.create_time()}\n")
                except psutil.NoSuchProcess:
                    pass


@pytest.fixture(autouse=True)
def _record_tff_workers():
    """After each test, record the worker_binary processes this session started (for .ci/run)."""
    yield
    record_workers()


@pytest.fixture(scope="session", autouse=True)
def _reap_tff_workers():
    """TFF's worker_binary outlives Python and holds stdout: never leave one behind (docs/stack.md, "The worker_binary")."""
    yield
    record_workers()
    stop_local_services()  # TFF's own destructor, while the interpreter is whole (no traceback after the summary)
    reap_workers()
    assert not worker_processes(), "a TFF worker_binary survived the test session"


def train_digits(out, bits: str, steps: int, *extra: str):
    """A small MEBQAT run on digits through the CLI (``extra``: more ``train`` arguments)."""
    from click.testing import CliRunner

    from tfbitmeta.cli import main

    r = CliRunner().invoke(main, ["train", "--dataset", "digits", "--steps", str(steps), "--batch-size", "32",
                                  "--bits", bits, "--out", str(out), "--quiet", *extra])
    assert r.exit_code == 0, r.output
    (out.parent / "tiny_train_output.txt").write_text(r.output)  # what the user saw (test_cli reads it)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A small MEBQAT run on digits, trained once per session through the CLI."""
    return train_digits(tmp_path_factory.mktemp("runs") / "tiny", "2,4,8,fp", 200)


@pytest.fixture(scope="session")
def exported(tiny_run, tmp_path_factory):
    """``tiny_run`` converted at 2, 4, 8 and fp with verification: (models folder, manifest, CLI result)."""
    import json

    from click.testing import CliRunner

    from tfbitmeta.cli import main

    out = tmp_path_factory.mktemp("models")
    r = CliRunner().invoke(main, ["convert", str(tiny_run), "--bits", "2,4,8,fp", "--out", str(out), "--verify",
                                  "--verify-images", "200", "--no-latency"])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    manifest = json.loads((out / "manifest.json").read_text())
    # --verify exits 1 exactly when a verified file fails verification, and names those files
    failed = [f["path"] for f in manifest["files"] if not f["verify"]["passed"]]
    assert r.exit_code == (1 if failed else 0), r.output
    if failed:
        last = [line for line in r.output.splitlines() if line.strip()][-1]
        assert last.startswith("Error: verification failed") and all(p in last for p in failed), r.output
    return out, manifest, r


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(exported, tiny_run, tmp_path_factory):
    """A real uvicorn on a free loopback port serving ``exported``, with on-demand front ends from ``tiny_run``:
    yields (url, app)."""
    from tfbitmeta.serve.app import create_app
    from tfbitmeta.serve.config import ServeConfig
    from tfbitmeta.serve.runner import BackgroundServer

    cfg = ServeConfig(models=exported[0], run=tiny_run, cache=tmp_path_factory.mktemp("frontend-cache"),
                      port=free_port(), max_body_bytes=1 << 20)
    app = create_app(cfg)
    with BackgroundServer(app, cfg) as url:
        yield url, app


def run_cli_with_deadline(cmd: list, timeout: float, attempts: int = 2):
    """Run a ``tfbitmeta`` command in its own process group with piped output, as a user's shell would.

    TFF's own local context could hang forever on a busy machine (docs/stack.md, "Intermittent TFF hangs"; the
    simulation now runs its own bounded worker). On a deadline the command's Python stacks are dumped (``SIGUSR1``, registered by the CLI),
    the whole group -- the command and its ``worker_binary`` -- is killed by its group id, and the command is run again
    once; the dump is reported as a warning, so a recurring hang stays visible without blocking CI."""
    import signal
    import subprocess
    import time
    import warnings

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    for attempt in range(1, attempts + 1):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
            return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGUSR1)
            time.sleep(3)
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            msg = f"attempt {attempt}: {' '.join(cmd[2:5])} exceeded {timeout:.0f} s; its stacks:\n{err[-6000:]}"
            if attempt == attempts:
                raise AssertionError(msg) from None
            warnings.warn(msg)


@pytest.fixture(scope="session")
def sfl_run(tmp_path_factory):
    """`tfbitmeta simulate` as a user runs it (TFF engine, output piped: an orphaned worker would hang it)."""
    import shutil
    import sys

    out = tmp_path_factory.mktemp("sfl") / "run"
    cmd = [sys.executable, "-m", "tfbitmeta.cli", "simulate", "--dataset", "digits", "--clients", "3",
           "--classes-per-client", "3", "--rounds", "2", "--local-steps", "15", "--batch-size", "32",
           "--bits", "2,4,8", "--lr", "0.1", "--out", str(out), "--quiet"]
    r = run_cli_with_deadline(cmd, timeout=1200, attempts=2)
    if r.returncode != 0 and out.exists():
        shutil.rmtree(out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


@pytest.fixture(scope="session")
def sfl_models(sfl_run, tmp_path_factory):
    """``sfl_run`` converted at every candidate bitwidth per client, verified: (models folder, manifest)."""
    import json

    from click.testing import CliRunner

    from tfbitmeta.cli import main

    models = tmp_path_factory.mktemp("sfl_models")
    r = CliRunner().invoke(main, ["convert", str(sfl_run[0]), "--out", str(models), "--verify", "--bits", "all",
                                  "--verify-images", "200", "--no-latency"])
    # every file is written and verified; the exit code is 1 when a file fails verification (reported)
    assert r.exit_code == 0 or "verification failed" in r.output, r.output
    return models, json.loads((models / "manifest.json").read_text())
