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


def train_digits(out, bits: str, steps: int):
    """A small MEBQAT run on digits through the CLI."""
    from click.testing import CliRunner

    from tfbitmeta.cli import main

    r = CliRunner().invoke(main, ["train", "--dataset", "digits", "--steps", str(steps), "--batch-size", "32",
                                  "--bits", bits, "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
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
