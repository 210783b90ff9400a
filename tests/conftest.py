import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from tfbitmeta.federated.workers import reap_workers, worker_processes  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _reap_tff_workers():
    """TFF's worker_binary outlives Python and holds stdout: never leave one behind (stack-facts §1.7)."""
    yield
    reap_workers()
    assert not worker_processes(), "a TFF worker_binary survived the test session"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A small MEBQAT run on digits, trained once per session through the CLI."""
    from click.testing import CliRunner

    from tfbitmeta.cli import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    r = CliRunner().invoke(main, ["train", "--dataset", "digits", "--steps", "200", "--batch-size", "32",
                                  "--bits", "2,4,8,fp", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="session")
def exported(tiny_run, tmp_path_factory):
    """``tiny_run`` converted at 2, 4, 8 and fp with verification: (models folder, manifest, CLI result)."""
    import json

    from click.testing import CliRunner

    from tfbitmeta.cli import main

    out = tmp_path_factory.mktemp("models")
    r = CliRunner().invoke(main, ["convert", str(tiny_run), "--bits", "2,4,8,fp", "--out", str(out), "--verify",
                                  "--verify-images", "200", "--no-latency"])
    manifest = json.loads((out / "manifest.json").read_text())
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


@pytest.fixture(scope="session")
def sfl_run(tmp_path_factory):
    """`tfbitmeta simulate` as a user runs it (TFF engine, output piped: an orphaned worker would hang it)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("sfl") / "run"
    cmd = [sys.executable, "-m", "tfbitmeta.cli", "simulate", "--dataset", "digits", "--clients", "3",
           "--classes-per-client", "3", "--rounds", "2", "--local-steps", "15", "--batch-size", "32",
           "--bits", "2,4,8", "--lr", "0.1", "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
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
    # every file is written and verified; the exit code is 1 when a file is below the parity target (reported)
    assert r.exit_code == 0 or "parity below" in r.output, r.output
    return models, json.loads((models / "manifest.json").read_text())
