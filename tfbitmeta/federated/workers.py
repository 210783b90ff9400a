"""Reaping TFF's ``worker_binary``.

TFF 0.87 starts ``tensorflow_federated/data/worker_binary`` lazily and only stops it in a destructor that does
not run reliably at exit; the orphan keeps stdout open and hangs pipes and CI (docs/stack.md, "The worker_binary").  Every
entry point registers :func:`install_reaper`; it needs only psutil, never TFF itself.
"""
from __future__ import annotations

import atexit
import signal

import psutil

WORKER_NAME = "worker_binary"


def worker_processes(parent: psutil.Process | None = None) -> list[psutil.Process]:
    parent = parent or psutil.Process()
    found = []
    for p in parent.children(recursive=True):
        try:
            if p.name() == WORKER_NAME or any(a.endswith("/" + WORKER_NAME) for a in p.cmdline()[:1]):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def reap_workers(timeout: float = 10.0) -> int:
    """SIGINT (as TFF itself does), then SIGKILL what is still alive; returns how many were stopped."""
    procs = worker_processes()
    for p in procs:
        try:
            p.send_signal(signal.SIGINT)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    return len(procs)


_installed = False


def install_reaper() -> None:
    global _installed
    if not _installed:
        atexit.register(reap_workers)
        _installed = True
