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
