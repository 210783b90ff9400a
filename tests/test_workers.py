"""The reaper stops a leftover process named worker_binary (a copy of `sleep`, so no TFF is needed)."""
import shutil
import subprocess

import psutil

from tfbitmeta.federated.workers import reap_workers, worker_processes


def test_reaper_stops_worker_binary(tmp_path):
    fake = tmp_path / "worker_binary"
    shutil.copy(shutil.which("sleep"), fake)
    proc = subprocess.Popen([str(fake), "300"])
    try:
        assert [p.pid for p in worker_processes()] == [proc.pid]
        assert reap_workers(timeout=5) == 1
        assert proc.wait(timeout=5) is not None
        assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE
        assert worker_processes() == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_deadline_dumps_stacks_kills_the_group_and_retries(tmp_path):
    """The TFF fixture's guard: a command that hangs (with a child holding its pipes, like worker_binary) is
    dumped, killed with its whole process group, retried once, and then fails with the dump."""
    import sys
    import warnings

    import pytest

    from conftest import run_cli_with_deadline

    pidfile = tmp_path / "child.pid"
    code = ("import faulthandler, signal, subprocess, time\n"
            "faulthandler.register(signal.SIGUSR1, all_threads=True)\n"
            f"open({str(pidfile)!r}, 'a').write(str(subprocess.Popen(['sleep', '300']).pid) + '\\n')\n"
            "def hung_here():\n    time.sleep(300)\n"
            "hung_here()\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(AssertionError, match="hung_here"):
            run_cli_with_deadline([sys.executable, "-c", code], timeout=3, attempts=2)
    assert len([w for w in caught if "attempt 1" in str(w.message)]) == 1
    children = [int(p) for p in pidfile.read_text().split()]
    assert len(children) == 2  # one per attempt
    for pid in children:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_deadline_returns_a_finished_command():
    import sys

    from conftest import run_cli_with_deadline

    r = run_cli_with_deadline([sys.executable, "-c", "print('ok')"], timeout=60)
    assert (r.returncode, r.stdout.strip()) == (0, "ok")


def test_local_worker_that_ignores_sigint_is_stopped_within_the_bound(tmp_path):
    """TFF's own local context waits forever for a worker that does not exit on SIGINT (the CI hang); the
    simulation's LocalWorker waits a bounded time, then kills it, and never shares the parent's output."""
    import os
    import time

    from tfbitmeta.federated.workers import LocalWorker

    fake = tmp_path / "worker_binary"
    fake.write_text("#!/bin/bash\ntrap '' INT\nwhile :; do sleep 0.2; done\n")
    fake.chmod(0o755)
    w = LocalWorker(str(fake))
    try:
        assert w.address == f"127.0.0.1:{w.port}" and w.proc.args[1] == f"--port={w.port}"
        assert [p.pid for p in worker_processes()] == [w.proc.pid]
        assert all(os.readlink(f"/proc/{w.proc.pid}/fd/{fd}") == "/dev/null" for fd in (0, 1, 2))
        time.sleep(0.5)  # let bash install its trap
        t = time.monotonic()
        w.close(timeout=1.0)
        assert time.monotonic() - t < 5 and w.proc.poll() is not None
    finally:
        if w.proc.poll() is None:
            w.proc.kill()


def test_local_worker_binary_is_the_installed_one():
    import os

    from tfbitmeta.federated.workers import LocalWorker

    path = LocalWorker.binary_path()
    assert path.endswith("tensorflow_federated/data/worker_binary") and os.access(path, os.X_OK)
