"""TFLite export of a federated run (``kind: federated``): every client's front end, per client and bitwidth, and the
server backend, through the same export graph, converter, verification and manifest writer as a MEBQAT run.

    uv run tfbitmeta convert runs/sfl --out models/sfl --verify

* ``client<k>_<bits>.tflite`` -- the client's front end (pixels in; ``exit_probs`` and the common ``features``
  out), full-integer below full precision (INT4 weights at <= 4 bit), BatchNorm calibrated on the client's data;
* ``client<k>_<bits>.router`` -- the client's calibrated router when its algorithm routes on the Mahalanobis
  score (the manifest entry's ``router``): fitted on the exported file's own features of the client's training
  images, its threshold placed on the file's scores of the client's validation ID images (docs/harmony.md,
  "Deployed routing"); a calibrated max-softmax router is just the entry's ``exit_threshold``;
* ``server_<bits>.tflite`` -- the server backend (``features`` in, ``probs`` out; full precision), one entry per
  feature quantization the front ends use (the files are the same model).
Every front-end entry names its ``client``, ``architecture`` and ``backend``.  ``--bits own`` (default) exports
each client's own bitwidth, ``all`` / a list every candidate bitwidth the clients were meta-trained on.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfbitmeta.data import datasets
from tfbitmeta.data.pipeline import Normalization
from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.export.convert import (backend_model_name, export_part, manifest_input, run_tflite, verify_backend,
                                      verify_front, write_manifest)
from tfbitmeta.export.digest import sha256_bytes
from tfbitmeta.export.graph import aligned_biases
from tfbitmeta.federated import routing
from tfbitmeta.models import ModelConfig
from tfbitmeta.quant.bitwidth import FP, bits_tensor, config_name
from tfbitmeta.runs import RunDir, check_writable


def export_federated(run_path: Path, out: Path, bits: str = "own", verify: bool = True, n_verify: int = 1000,
                     int4: bool = True, measure_latency: bool = False, n_representative: int = 200,
                     progress=print) -> dict:
    run = RunDir(run_path)
    meta = run.read_meta()
    norm = Normalization.from_dict(meta["normalization"])
    cfg_ = meta["config"]
    data = datasets.load(cfg_["dataset"], seed=cfg_["seed"])
    rep_pixels = norm.pixels(data.x_val[:n_representative]).numpy()
    pt = norm.pixels(data.x_test[:n_verify]).numpy()
    xt, yt = norm.apply(data.x_test[:n_verify]).numpy(), data.y_test[:n_verify]
    server_split = meta["server"]["split"]
    server_bm = run.load_model("server", ModelConfig.from_dict(meta["server"]["model"]))
    server_keras = server_bm.backend(server_split)
    out = check_writable(out)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    files, backends = [], {}
    try:
        for c in meta["clients"]:
            k, split = c["client"], c["split"]
            bm = run.load_model(f"clients/client{k}", ModelConfig.from_dict(c["model"]))
            configs = [(c["bits"], c["bits"])] if bits == "own" else bm.cfg.candidates.parse(bits)
            for cfg in configs:
                name = config_name(cfg)
                fname, bname = f"client{k}_{name}.tflite", f"server_{name}.tflite"
                with aligned_biases(bm.keras, cfg, norm, int4):
                    entry, part, buf = export_part(bm, cfg, "front_end", split, norm, tmp / fname, rep_pixels,
                                                   int4=int4, measure_latency=measure_latency)
                    entry.update(client=k, architecture=c["architecture"], backend=backend_model_name(bname),
                                 exit_threshold=float(meta["threshold"]), id_classes=c["id_classes"])
                    if c.get("router"):
                        entry["router"] = deployed_router(tmp, fname, c["router"], data, norm, progress)
                        if entry["router"]["score"] == "max_softmax":
                            entry["exit_threshold"] = entry["router"]["threshold"]
                    feats = bm.extractor(split)([xt, bits_tensor(cfg, len(xt))], training=False).numpy()
                    ref_server = server_keras([feats, bits_tensor((FP, FP), len(feats))], training=False)
                    if verify:
                        entry["verify"] = verify_front(buf, part.graph, pt,
                                                       bm.keras([xt, bits_tensor(cfg, len(xt))],
                                                                training=False)[f"exit{split}"], yt)
                if bname not in backends:
                    progress(f"converting {bname}")
                    backends[bname], server_part, server_buf = export_part(
                        server_bm, (FP, FP), "backend", server_split, norm, tmp / bname, feats,
                        measure_latency=measure_latency)
                    backends[bname]["exit_threshold"] = None
                    if verify:
                        backends[bname]["verify"] = verify_backend(server_buf, server_part.graph, feats, ref_server, yt)
                if verify:  # the deployed pair: the front-end file's features into the backend file
                    front_out = run_tflite(tmp / fname, pt)
                    front_feats = front_out["features"].astype(np.float32)
                    probs = run_tflite(tmp / bname, front_feats)["probs"]
                    ref = tf.nn.softmax(ref_server).numpy()
                    agree = float(np.mean(probs.argmax(-1) == ref.argmax(-1)))
                    if entry.get("router"):
                        entry["router"]["verify"] = verify_router(entry, tmp, yt, front_out)
                    entry["verify"].update(pipeline_top1_agreement=agree,
                                           pipeline_accuracy=float(np.mean(probs.argmax(-1) == yt)),
                                           passed=bool(entry["verify"]["passed"]))  # reported, as for MEBQAT pairs
                files.append(entry)
                progress(f"client {k}: {c['architecture']} at {name} -> {fname}"
                         + (f" (agreement {100 * entry['verify']['top1_agreement']:.2f}%, with the server "
                            f"{100 * entry['verify']['pipeline_top1_agreement']:.2f}%)" if verify else ""))
        files += list(backends.values())
        model = {"family": "federated", "scheme": "exact", "num_classes": len(meta["dataset"]["class_names"]),
                 "exits": sorted({c["split"] for c in meta["clients"]}), "candidate_bits": meta["candidate_bits"],
                 "clients": len(meta["clients"])}
        shape = ModelConfig.from_dict(meta["clients"][0]["model"]).input_shape
        manifest = write_manifest(out, tmp, files, model, meta["dataset"]["class_names"], manifest_input(norm, shape),
                                  f"tfbitmeta convert (federated: {meta['algorithm']['name']})")
    except KeyError as e:
        raise TfbitmetaError(f"{run_path}: incomplete federated run metadata ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


ROUTER_LAYOUT = ("float32 little-endian: the class means m (classes x dim, row-major), then U (rank x dim, "
                 "row-major); squared distance isotropic * |f - m|^2 - |U (f - m)|^2, score = minus the smallest")


def deployed_router(staged: Path, front_file: str, spec: dict, data, norm, progress=print) -> dict:
    """A client's router for one exported front end, built from that file's own outputs (what the device will
    compute): Mahalanobis statistics of its features on the client's training images, the threshold that keeps
    ``keep_local`` of its validation ID images local (:class:`routing.ClientRouter`).  Writes ``<front>.router``
    next to the front end for the Mahalanobis score; the entry's ``router`` object describes it."""
    keep, kind = float(spec["keep_local"]), spec["score"]
    val = np.asarray(spec["validation"], np.int64)
    if val.size == 0:
        raise TfbitmetaError(f"{front_file}: the run holds no validation images to calibrate the router")
    if routing.deployable(kind) != kind:
        progress(f"{front_file}: routing score {kind!r} is not exported; calibrating max-softmax instead")
        kind = routing.deployable(kind)
    out_val = run_tflite(staged / front_file, norm.pixels(data.x_train[val]).numpy())
    fit = np.asarray(spec.get("fit", []), np.int64)
    out_fit = run_tflite(staged / front_file, norm.pixels(data.x_train[fit]).numpy()) if kind == "mahalanobis" else None
    r = routing.ClientRouter.calibrate(kind, keep, out_val, out_fit, data.y_train[fit])
    route = {"score": kind, "keep_local": keep, "validation_images": int(val.size), "threshold": r.threshold,
             "validation_keep_local": r.validation_keep_local}
    if r.mahalanobis is not None:
        maha = r.mahalanobis
        buf = maha.to_bytes()
        path = front_file.removesuffix(".tflite") + ".router"
        (staged / path).write_bytes(buf)
        route.update(path=path, sha256=sha256_bytes(buf), bytes=len(buf), classes=int(maha.means.shape[0]),
                     rank=int(maha.projection.shape[0]), dim=int(maha.means.shape[1]), isotropic=maha.isotropic,
                     fit_images=int(fit.size), layout=ROUTER_LAYOUT)
    return route


def verify_router(entry: dict, folder: Path, y: np.ndarray, outputs: dict) -> dict:
    """What the deployed router does on the verification test images: offload of the client's ID and OOD
    images and the AUROC of its score (the OOD images are never used to place the threshold)."""
    from tfbitmeta.federated.diagnostics import auroc

    s = routing.ClientRouter.from_manifest(entry["router"], folder).scores(outputs)
    is_id = np.isin(y, entry["id_classes"])
    off = s < entry["router"]["threshold"]
    return {"test_images": int(len(y)), "id_offload": float(off[is_id].mean()) if is_id.any() else None,
            "ood_offload": float(off[~is_id].mean()) if (~is_id).any() else None,
            "auroc": auroc(s[is_id], s[~is_id])}
