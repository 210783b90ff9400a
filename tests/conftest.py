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
