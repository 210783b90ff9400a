"""Any bitwidth on demand: front ends (and their backends) converted from the one checkpoint on first request,
with the export code of ``tfbitmeta convert``, and kept on disk (``<cache>/w<W>a<A>/``).

A conversion runs in ``<cache>/.partial-<pid>-w<W>a<A>-*/`` and the finished folder is renamed into place in one
step, so a crash never leaves a half-written bitwidth; partial folders of dead processes are removed at start.
Folders are re-checked against their manifest's sha256 when the server starts (a bad one is removed and converted
again on request).  Worker processes share the cache: a file lock serialises conversions across them.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.export.digest import sha256_file
from tfbitmeta.quant.bitwidth import bit_name, config_name, parse_bit
from tfbitmeta.serve.errors import ApiError

log = logging.getLogger("tfbitmeta.serve")
ROUTE_BITS = re.compile(r"w([0-9]{1,2}|fp)a([0-9]{1,2}|fp)")
ROUTE_FILE = re.compile(r"(?:exit)?([0-9]{1,3})\.(tflite|json)")
FAILURE_TTL_S = 600.0      # a failed conversion answers from memory for this long instead of converting again
MAX_WAITING = 8            # requests waiting for a conversion beyond this -> 503


def parse_route(bits: str, exit_file: str) -> tuple[tuple[int, int], int, str]:
    """``'w4a4', 'exit3.tflite'`` -> ((4, 4), 3, 'tflite'); ApiError 404 for anything else (ASCII digits only)."""
    m = ROUTE_BITS.fullmatch(bits.lower())
    if m is None:
        raise ApiError(404, "unknown_bitwidth", f"bad bitwidth {bits[:40]!r}: use w<W>a<A>, e.g. w4a4 or wfpafp")
    try:
        w, a = parse_bit(m[1]), parse_bit(m[2])
    except TfbitmetaError as e:
        raise ApiError(404, "unknown_bitwidth", str(e)) from None
    f = ROUTE_FILE.fullmatch(exit_file)
    if f is None:
        raise ApiError(404, "not_found",
                       f"bad front-end file {exit_file[:40]!r}: use <exit>.tflite or <exit>.json, e.g. exit3.tflite")
    return (w, a), int(f[1]), f[2]


def folder_name(cfg: tuple[int, int]) -> str:
    return f"w{bit_name(cfg[0])}a{bit_name(cfg[1])}"


def verified_manifest(folder: Path) -> dict | None:
    """The manifest of a finished cache folder if every file it lists matches its sha256, else None."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        for f in manifest["files"]:
            if sha256_file(folder / f["path"]) != f["sha256"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FrontendCache:
    def __init__(self, run: Path | None, cache: Path):
        self.run, self.cache = (Path(run) if run else None), Path(cache)
        self._lock = threading.Lock()  # one conversion at a time: the TF converter is not re-entrant
        self._waiting, self._count_lock = 0, threading.Lock()
        self._failed: dict[tuple[int, int], tuple[float, ApiError]] = {}
        self.family = self.candidates = None
        if self.run is not None:
            from tfbitmeta.runs import RunDir, run_kind

            meta = RunDir(self.run).read_meta()
            kind = run_kind(meta)
            if kind != "mebqat":  # serve --run dispatches on the run's kind
                raise TfbitmetaError(f"{self.run}: on-demand front ends are converted from MEBQAT checkpoints; this "
                                     f"is a {kind} run: export it with `tfbitmeta convert` and serve the exported "
                                     "models", param="run")
            self.family = meta["model"]["family"]
            self.candidates = RunDir(self.run).model_config().candidates
        self.clean()

    def folder(self, cfg: tuple[int, int]) -> Path:
        return self.cache / folder_name(cfg)

    def clean(self) -> None:
        """Remove partial folders of dead processes and cached bitwidths that fail their sha256 check."""
        if not self.cache.is_dir():
            return
        for p in self.cache.glob(".partial-*"):
            m = re.match(r"\.partial-([0-9]+)-", p.name)
            if m is None or not _pid_alive(int(m[1])):
                log.warning("removing %s (left by an interrupted conversion)", p)
                shutil.rmtree(p, ignore_errors=True)
        for p in self.cache.iterdir():
            if p.is_dir() and ROUTE_BITS.fullmatch(p.name) and verified_manifest(p) is None:
                log.warning("removing %s: missing manifest or a file fails its sha256 (converted again on request)", p)
                shutil.rmtree(p, ignore_errors=True)

    def manifests(self) -> list[tuple[Path, dict]]:
        """Every finished cache folder with its manifest (read when a backend is asked for, e.g. after a restart)."""
        out = []
        if self.cache.is_dir():
            for p in sorted(self.cache.iterdir()):
                if p.is_dir() and ROUTE_BITS.fullmatch(p.name) and (p / "manifest.json").is_file():
                    try:
                        out.append((p, json.loads((p / "manifest.json").read_text())))
                    except (OSError, ValueError):
                        continue
        return out

    def get(self, family: str, cfg: tuple[int, int], exit_: int) -> tuple[Path, dict, dict | None]:
        """(file, its manifest entry, the new manifest if this call converted) -- blocking; run in a thread."""
        if self.run is None:
            raise ApiError(404, "no_checkpoint", "on-demand front ends need the checkpoint: this server was "
                           "started without a training run")
        if family != self.family:
            raise ApiError(404, "unknown_model", f"unknown model family {family[:40]!r}: this server has {self.family!r}")
        try:
            self.candidates.check(cfg)
        except TfbitmetaError as e:
            raise ApiError(404, "unknown_bitwidth", str(e)) from None
        folder, converted = self.folder(cfg), None
        if not (folder / "manifest.json").is_file():
            converted = self._convert_once(cfg, folder)
        manifest = converted or json.loads((folder / "manifest.json").read_text())
        entry = next((f for f in manifest["files"] if f["kind"] == "front_end" and f["exit"] == exit_), None)
        if entry is None:
            raise ApiError(404, "unknown_exit", f"exit {exit_} does not exist: the model has exits {manifest['model']['exits']}")
        return folder / entry["path"], entry, converted

    def _convert_once(self, cfg, folder: Path) -> dict | None:
        failed = self._failed.get(cfg)
        if failed is not None and time.monotonic() - failed[0] < FAILURE_TTL_S:
            raise failed[1]
        with self._count_lock:
            if self._waiting >= MAX_WAITING:
                raise ApiError(503, "busy", f"{self._waiting} requests already wait for conversions, retry later",
                               {"Retry-After": "5"})
            self._waiting += 1
        try:
            with self._lock, self._file_lock():
                if (folder / "manifest.json").is_file():  # another request or worker converted it meanwhile
                    return None
                try:
                    return self._convert(cfg, folder)
                except ApiError as e:
                    self._failed[cfg] = (time.monotonic(), e)
                    raise
        finally:
            with self._count_lock:
                self._waiting -= 1

    def _file_lock(self):
        self.cache.mkdir(parents=True, exist_ok=True)
        return _FileLock(self.cache / ".convert.lock")

    def _convert(self, cfg, folder: Path) -> dict:
        from tfbitmeta.export.convert import export

        spec = f"{bit_name(cfg[0])}/{bit_name(cfg[1])}"
        tmp = Path(tempfile.mkdtemp(prefix=f".partial-{os.getpid()}-{folder.name}-", dir=self.cache))
        try:
            try:
                manifest = export(self.run, spec, "all", tmp, verify=False, measure_latency=False,
                                  progress=lambda m: None)
            except TfbitmetaError as e:
                # the bitwidth is in the model's candidate set (checked above) but cannot be exported
                raise ApiError(400, "unsupported_bitwidth",
                               f"bitwidth {config_name(cfg)} cannot be exported: {str(e).splitlines()[0]}") from None
            if folder.exists():  # a folder without a manifest (e.g. removed by hand): replace it
                shutil.rmtree(folder)
            os.rename(tmp, folder)
            return manifest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class _FileLock:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
