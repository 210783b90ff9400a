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


def stop_local_services() -> None:
    """Run the destructor of TFF's local executor services now, while the interpreter is whole, and disarm it.

    Left to interpreter teardown, it runs after ``subprocess`` is gone and prints an ignored ``AttributeError``
    traceback after the program's last line of output (and cannot stop its worker).  Found through the garbage
    collector, so TFF is never imported here."""
    import gc

    for obj in gc.get_objects():
        cls = type(obj)
        if cls.__name__ == "ServiceManager" and cls.__module__.startswith("tensorflow_federated"):
            try:
                cls.__del__(obj)
            except Exception:  # a worker that is already gone
                pass
            cls.__del__ = lambda self: None


def _at_exit() -> None:
    stop_local_services()
    reap_workers()


_installed = False


def install_reaper() -> None:
    global _installed
    if not _installed:
        atexit.register(_at_exit)
        _installed = True
