"""The backends the server runs: TFLite files from a manifest, checked against their sha256 before loading."""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np

from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.serve.payload import FeatureSpec


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_manifest(folder: Path) -> dict:
    from tfbitmeta.export.convert import validate_manifest

    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise TfbitmetaError(f"no manifest.json in {folder}: export models with `tfbitmeta convert RUN --out {folder}`")
    try:
        manifest = json.loads(path.read_text())
        validate_manifest(manifest)
    except Exception as e:  # json or schema error: the message says which
        raise TfbitmetaError(f"{path} is not a valid manifest: {str(e).splitlines()[0]}") from None
    return manifest


def feature_spec(manifest: dict, backend: dict) -> FeatureSpec:
    """The backend's input, with the quantization of the ``features`` output of the front ends that name this
    backend (their ``backend`` field); they must agree."""
    inp = backend["inputs"][0]
    name = Path(backend["path"]).stem
    quants = {json.dumps(next((t["quantization"] for t in f["outputs"] if t["name"] == inp["name"]), None),
                         sort_keys=True)
              for f in manifest["files"] if f["kind"] == "front_end" and f.get("backend") == name}
    if len(quants) > 1:
        raise TfbitmetaError(f"front ends naming backend {name!r} quantize their features differently: {sorted(quants)}")
    quant = json.loads(quants.pop()) if quants else None
    return FeatureSpec(name=inp["name"], shape=tuple(int(d) for d in inp["shape"][1:]), signature=backend["signature"],
                       scale=quant and quant["scale"], zero_point=quant and quant["zero_point"],
                       qdtype=quant and quant["dtype"])


class Backend:
    """One backend file; batches are padded to a few fixed sizes so the interpreters never reallocate."""

    def __init__(self, name: str, path: Path, entry: dict, spec: FeatureSpec, max_batch: int):
        import tensorflow as tf

        buf = Path(path).read_bytes()
        if hashlib.sha256(buf).hexdigest() != entry["sha256"]:
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


class ModelStore:
    """Backends by name (the file stem, e.g. ``backend_4_split3``), from the served manifest and from on-demand
    conversions added later."""

    def __init__(self, folder: Path, max_batch: int):
        self.folder, self.max_batch = Path(folder), max_batch
        self.manifest = read_manifest(self.folder)
        self.backends: dict[str, Backend] = {}
        self.files = {f["path"]: f for f in self.manifest["files"]}
        self.add(self.folder, self.manifest)

    def add(self, folder: Path, manifest: dict) -> None:
        for f in manifest["files"]:
            name = Path(f["path"]).stem
            if f["kind"] == "backend" and name not in self.backends:
                self.backends[name] = Backend(name, Path(folder) / f["path"], f, feature_spec(manifest, f), self.max_batch)
