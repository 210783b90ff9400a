"""Stop the TFF worker_binary processes a CI run recorded, and only those (never other jobs' workers by name).

Usage: ``python .ci/reap_workers.py PID_FILE [--check]``.  PID_FILE holds ``pid create_time`` lines written by the
test session (tests/conftest.py); a line is acted on only if that pid still is the same process (same start time)
and is a worker_binary.  With ``--check`` the exit code is 1 when a recorded worker was still alive.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import psutil


def recorded_alive(pid_file: Path) -> list[psutil.Process]:
    alive = {}
    if not pid_file.is_file():
        return []
    for line in pid_file.read_text().splitlines():
        try:
            pid, started = int(line.split()[0]), float(line.split()[1])
            p = psutil.Process(pid)
            if abs(p.create_time() - started) < 1e-3 and "worker_binary" in p.name():
                alive[pid] = p
        except (ValueError, IndexError, psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(alive.values())


def main(argv: list[str]) -> int:
    procs = recorded_alive(Path(argv[0]))
    for p in procs:
        print(f"error: recorded TFF worker_binary {p.pid} is still running: stopping it", file=sys.stderr)
        try:
            p.send_signal(signal.SIGINT)
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(procs, timeout=5)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return 1 if procs and "--check" in argv else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
