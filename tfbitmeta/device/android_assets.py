"""Fill the Android demo's assets: ``DEST/models/`` (manifest.json + the front ends, sha256-checked while copied)
and ``DEST/samples/`` (test images from the run as PNG at the model's input size, ``<i>_label<y>.png``)."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np

from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.export.digest import sha256_bytes


def copy_assets(models: Path, dest: Path, run: Path | None = None, samples: int = 8) -> dict:
    models, dest = Path(models), Path(dest)
    try:
        manifest = json.loads((models / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise TfbitmetaError(f"cannot read {models / 'manifest.json'}: {e}") from None
    fronts = [f for f in manifest.get("files", []) if f.get("kind") == "front_end"]
    if not fronts:
        raise TfbitmetaError(f"{models / 'manifest.json'} lists no front end: run `tfbitmeta convert` first")
    out = dest / "models"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copyfile(models / "manifest.json", out / "manifest.json")  # byte for byte: the app parses this file
    copied = []
    for f in fronts:  # each front end and, for a federated client with a Mahalanobis router, its router file
        for path, digest in [(f["path"], f["sha256"])] + ([(f["router"]["path"], f["router"]["sha256"])]
                                                          if (f.get("router") or {}).get("path") else []):
            try:
                data = (models / path).read_bytes()
            except OSError as e:
                raise TfbitmetaError(f"cannot read {models / path}: {e.strerror}") from None
            if sha256_bytes(data) != digest:
                raise TfbitmetaError(f"{models / path} fails its sha256 check against the manifest")
            (out / path).write_bytes(data)
            copied.append(path)
    written = []
    if run is not None:
        written = write_samples(Path(run), dest / "samples", samples)
    return {"front_ends": [f["path"] for f in fronts], "files": copied, "samples": written, "dest": str(dest)}


def write_samples(run: Path, dest: Path, n: int) -> list[str]:
    from PIL import Image

    from tfbitmeta.data import datasets
    from tfbitmeta.runs import RunDir, TrainConfig

    r = RunDir(run)
    tcfg = TrainConfig.from_dict(r.read_meta()["train"])
    data = datasets.load(tcfg.dataset, seed=tcfg.seed)
    pixels = r.normalization().pixels(data.x_test[:n]).numpy().astype(np.uint8)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    names = []
    for i, (p, y) in enumerate(zip(pixels, data.y_test[:n])):
        buf = io.BytesIO()
        Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p).save(buf, format="PNG")
        name = f"{i}_label{int(y)}.png"
        (dest / name).write_bytes(buf.getvalue())
        names.append(name)
    return names
