"""`.ci/reap_workers.py`: CI stops and checks only the TFF workers its test session recorded, never by name."""
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "reap_workers.py"


def test_reaps_only_recorded_workers(tmp_path):
    fake = tmp_path / "worker_binary"
    shutil.copy(shutil.which("sleep"), fake)
    recorded = subprocess.Popen([str(fake), "60"])
    other = subprocess.Popen([str(fake), "60"])  # another job's worker: same name, not recorded
    try:
        time.sleep(0.2)
        pids = tmp_path / "pids"
        p = psutil.Process(recorded.pid)
        pids.write_text(f"{p.pid} {p.create_time()}\n{other.pid} {p.create_time() - 100}\nnot a line\n")
        r = subprocess.run([sys.executable, str(SCRIPT), str(pids), "--check"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 1 and f"worker_binary {recorded.pid} is still running" in r.stderr
        assert recorded.wait(timeout=10) is not None
        assert other.poll() is None, "a worker the run did not record was stopped"
        r = subprocess.run([sys.executable, str(SCRIPT), str(pids), "--check"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and r.stderr == ""
        assert subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "missing")], timeout=60).returncode == 0
    finally:
        for proc in (recorded, other):
            proc.kill()
            proc.wait()
