"""The backends the server runs: TFLite files from a manifest, checked against their sha256 before loading."""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
from pathlib import Path

import numpy as np

from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.export.digest import sha256_bytes
from tfbitmeta.serve.payload import FeatureSpec

log = logging.getLogger("tfbitmeta.serve")


def read_manifest(folder: Path) -> dict:
    from tfbitmeta.export.convert import validate_manifest

    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise TfbitmetaError(f"no manifest.json in {folder}: export models into it with `tfbitmeta convert`",
                             param="models")
    try:
        manifest = json.loads(path.read_text())
        validate_manifest(manifest)
    except Exception as e:  # json or schema error: the message says which
        raise TfbitmetaError(f"{path} is not a valid manifest: {str(e).splitlines()[0]}") from None
    return manifest


def feature_spec(manifest: dict, backend: dict) -> FeatureSpec:
    """The backend's input as its front ends send it (``FeatureSpec.of_front_end`` of the front ends whose
    ``backend`` field names it; they must agree), under the backend's own input name, shape and signature."""
    inp = backend["inputs"][0]
    name = Path(backend["path"]).stem
    specs = {FeatureSpec.of_front_end(f) for f in manifest["files"]
             if f["kind"] == "front_end" and f.get("backend") == name}
    if len(specs) > 1:
        raise TfbitmetaError(f"front ends naming backend {name!r} send different features: "
                             f"{sorted(map(str, specs))}")
    own = dict(name=inp["name"], shape=tuple(int(d) for d in inp["shape"][1:]), signature=backend["signature"])
    return dataclasses.replace(specs.pop(), **own) if specs else FeatureSpec(**own)


class Backend:
    """One backend file; batches are padded to a few fixed sizes so the interpreters never reallocate."""

    def __init__(self, name: str, path: Path, entry: dict, spec: FeatureSpec, max_batch: int):
        import tensorflow as tf

        buf = Path(path).read_bytes()
        if sha256_bytes(buf) != entry["sha256"]:
            raise TfbitmetaError(f"{path}: sha256 differs from the manifest (file changed after export?)")
        self.name, self.path, self.entry, self.spec, self.max_batch = name, Path(path), entry, spec, max_batch
        self.output = entry["outputs"][0]["name"]
        self._buf, self._tf, self._runners, self._lock = buf, tf, {}, threading.Lock()
        self.sizes = sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)})
        self._runner(1)  # fail at start-up, not at the first request

    def _runner(self, n: int):
        if n not in self._runners:
            it = self._tf.lite.Interpreter(model_content=self._buf, num_threads=1)
            runner = it.get_signature_runner(self.entry["signature"])
            runner(**{self.spec.name: np.zeros((n, *self.spec.shape), np.float32)})
            self._runners[n] = runner
        return self._runners[n]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """float32 [N, *feature_shape] -> probabilities [N, classes]; not re-entrant (one batcher thread per model)."""
        out = []
        for i in range(0, len(x), self.max_batch):
            chunk = x[i:i + self.max_batch]
            n = len(chunk)
            size = next(s for s in self.sizes if s >= n)
            if size != n:
                chunk = np.concatenate([chunk, np.zeros((size - n, *self.spec.shape), np.float32)])
            with self._lock:
                out.append(self._runner(size)(**{self.spec.name: chunk})[self.output][:n].copy())
        return np.concatenate(out)


def model_name(entry: dict) -> str:
    """The name a backend is served under: its file stem (``backend_4_split3``)."""
    return Path(entry["path"]).stem


class ModelStore:
    """Backends by name, from the served manifest and from the on-demand cache: every finished cache folder is
    loaded at start (so front ends converted before a restart keep their backend) and the cache is looked at
    again when an unknown name is asked for (another worker process may have converted it)."""

    RESCAN_S = 1.0

    def __init__(self, folder: Path, max_batch: int, cache=None):
        self.folder, self.max_batch, self.cache = Path(folder), max_batch, cache
        self.manifest = read_manifest(self.folder)
        self.backends: dict[str, Backend] = {}
        self.files = {f["path"]: f for f in self.manifest["files"]}
        self._lock, self._scanned = threading.Lock(), 0.0
        self.add(self.folder, self.manifest)
        self.rescan(force=True)

    def add(self, folder: Path, manifest: dict) -> None:
        with self._lock:
            for f in manifest["files"]:
                name = model_name(f)
                if f["kind"] == "backend" and name not in self.backends:
                    self.backends[name] = Backend(name, Path(folder) / f["path"], f, feature_spec(manifest, f),
                                                  self.max_batch)

    def rescan(self, force: bool = False) -> None:
        """Load the backends of cache folders not loaded yet (at most once per RESCAN_S unless forced)."""
        import time

        if self.cache is None or (not force and time.monotonic() - self._scanned < self.RESCAN_S):
            return
        self._scanned = time.monotonic()
        for folder, manifest in self.cache.manifests():
            if any(f["kind"] == "backend" and model_name(f) not in self.backends for f in manifest.get("files", [])):
                try:
                    self.add(folder, manifest)
                except (TfbitmetaError, KeyError, ValueError) as e:
                    log.warning("skipping cached backends in %s: %s", folder, e)

    def get(self, name: str) -> Backend | None:
        if name not in self.backends:
            self.rescan()
        return self.backends.get(name)
