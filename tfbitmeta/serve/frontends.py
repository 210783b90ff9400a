"""Any bitwidth on demand: front ends (and their backends) converted from the one checkpoint on first request,
with the export code of ``tfbitmeta convert``, and kept on disk (``<cache>/w<W>a<A>/``)."""
from __future__ import annotations

import json
import threading
from pathlib import Path

from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.quant.bitwidth import bit_name, parse_bit
from tfbitmeta.serve.errors import ApiError


def parse_route(bits: str, exit_file: str) -> tuple[tuple[int, int], int, str]:
    """``'w4a4', 'exit3.tflite'`` -> ((4, 4), 3, 'tflite'); ApiError 404 for anything else."""
    b = bits.lower()
    if not (b.startswith("w") and "a" in b):
        raise ApiError(404, "unknown_bitwidth", f"bad bitwidth {bits!r}: use w<W>a<A>, e.g. w4a4 or wfpafp")
    try:
        w, a = (parse_bit(t) for t in b[1:].split("a", 1))
    except TfbitmetaError as e:
        raise ApiError(404, "unknown_bitwidth", str(e)) from None
    stem, _, ext = exit_file.rpartition(".")
    digits = stem[4:] if stem.startswith("exit") else stem
    if ext not in ("tflite", "json") or not digits.isdigit():
        raise ApiError(404, "not_found", f"bad front-end file {exit_file!r}: use <exit>.tflite or <exit>.json, e.g. exit3.tflite")
    return (w, a), int(digits), ext


class FrontendCache:
    def __init__(self, run: Path | None, cache: Path):
        self.run, self.cache = (Path(run) if run else None), Path(cache)
        self._lock = threading.Lock()  # one conversion at a time: the TF converter is not re-entrant
        self.family = None
        if self.run is not None:
            from tfbitmeta.runs import RunDir, run_kind

            meta = RunDir(self.run).read_meta()
            kind = run_kind(meta)
            if kind != "mebqat":  # serve --run dispatches on the run's kind
                raise TfbitmetaError(f"--run {self.run}: on-demand front ends are converted from MEBQAT checkpoints; "
                                     f"this is a {kind} run: export it with `tfbitmeta convert` and serve --models")
            self.family = meta["model"]["family"]

    def folder(self, cfg: tuple[int, int]) -> Path:
        return self.cache / f"w{bit_name(cfg[0])}a{bit_name(cfg[1])}"

    def get(self, family: str, cfg: tuple[int, int], exit_: int) -> tuple[Path, dict, dict | None]:
        """(file, its manifest entry, the new manifest if this call converted) -- blocking; run in a thread."""
        if self.run is None:
            raise ApiError(404, "no_checkpoint", "on-demand front ends need the checkpoint: start the server with --run RUN")
        if family != self.family:
            raise ApiError(404, "unknown_model", f"unknown model family {family!r}: this server has {self.family!r}")
        folder, converted = self.folder(cfg), None
        with self._lock:
            if not (folder / "manifest.json").is_file():
                converted = self._convert(cfg, folder)
        manifest = converted or json.loads((folder / "manifest.json").read_text())
        entry = next((f for f in manifest["files"] if f["kind"] == "front_end" and f["exit"] == exit_), None)
        if entry is None:
            raise ApiError(404, "unknown_exit", f"exit {exit_} does not exist: the model has exits {manifest['model']['exits']}")
        return folder / entry["path"], entry, converted

    def _convert(self, cfg, folder: Path) -> dict:
        from tfbitmeta.export.convert import export

        spec = f"{bit_name(cfg[0])}/{bit_name(cfg[1])}"
        try:
            return export(self.run, spec, "all", folder, verify=False, measure_latency=False, progress=lambda m: None)
        except TfbitmetaError as e:
            raise ApiError(404, "unknown_bitwidth", str(e)) from None
