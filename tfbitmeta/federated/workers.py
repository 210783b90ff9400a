"""TFF's ``worker_binary``: the local worker this project starts and stops itself, and the reaper.

TFF 0.87's own local context starts ``tensorflow_federated/data/worker_binary`` lazily with the parent's
stdout/stderr and stops it with SIGINT followed by an unbounded ``wait()``, both in a destructor that does not run
reliably at exit and whenever the worker's gRPC stub reports "not ready" (a busy machine).  A worker that does not
exit on SIGINT then hangs the simulation forever (docs/stack.md, "The worker_binary" and "Intermittent TFF hangs").
So the simulation runs on a :class:`LocalWorker` instead: our own ``Popen`` with its output detached, on a free
port, reached through the same remote-executor context as ``--workers``, and stopped with SIGINT, a bounded wait
and SIGKILL.  Every entry point also registers :func:`install_reaper` (psutil only, never TFF itself).
"""
from __future__ import annotations

import atexit
import os
import signal
import subprocess

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
    _interrupt_then_kill(procs, timeout)
    return len(procs)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGINT (a worker's clean shutdown), at most ``timeout`` seconds of waiting, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        _interrupt_then_kill([psutil.Process(proc.pid)], timeout)
    except psutil.NoSuchProcess:
        pass
    proc.poll()  # the child is reaped: record its exit


def _interrupt_then_kill(procs: list[psutil.Process], timeout: float) -> None:
    """The one shutdown of a worker: SIGINT, a bounded wait, SIGKILL for what is still alive, a bounded wait."""
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


class LocalWorker:
    """A ``worker_binary`` on a free loopback port, owned by this process: ``address`` for the remote-executor
    context, :meth:`close` stops it (bounded).  Its output goes to /dev/null, so it can never hold the parent's
    pipes; ``-1`` concurrent calls is what TFF's own local context passes."""

    def __init__(self, binary: str):
        import portpicker  # TFF's own dependency, the way its local context picks the port

        self.port = portpicker.pick_unused_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([binary, f"--port={self.port}", "--max_concurrent_computation_calls=-1"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @staticmethod
    def binary_path() -> str:
        """The worker_binary shipped in the installed tensorflow_federated package (found without importing it)."""
        import importlib.util

        spec = importlib.util.find_spec("tensorflow_federated")
        path = os.path.join(os.path.dirname(spec.origin), "data", WORKER_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no TFF worker_binary at {path}")
        return path

    def close(self, timeout: float = 10.0) -> None:
        stop(self.proc, timeout)


def stop_local_services() -> None:
    """Stop the workers of any TFF-owned local executor service now, bounded, and disarm their destructors.

    TFF's destructor sends SIGINT and waits without a limit (a worker that ignores it hangs the exit); left to
    interpreter teardown it also runs after ``subprocess`` is gone and prints an ignored ``AttributeError``
    traceback after the program's last line of output.  Found through the garbage collector, so TFF is never
    imported here."""
    import gc

    for obj in gc.get_objects():
        cls = type(obj)
        if cls.__name__ == "ServiceManager" and cls.__module__.startswith("tensorflow_federated"):
            proc = getattr(obj, "_process", None)
            if isinstance(proc, subprocess.Popen):
                stop(proc)
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
