"""Golden vectors for the Android tests: the device contract, reproduced byte for byte.

For a few test images and several bitwidths writes, under ``--out``:
* ``img_<i>.png`` -- the input image bytes (grayscale/RGB PNG at the model's input size, so no resize is involved);
* ``req_<bits>_<i>.json`` / ``resp_<bits>_<i>.json`` -- the exact feature payload the device sends (a-bit codes
  packed at a bits per value when a < 8, docs/serving.md) and the bytes a real server (started here on a loopback
  port) answered; ``req_int8_<bits>_<i>.json`` -- the same features as plain int8 codes (the server must give the
  same answer to both, checked here);
* ``feat_<bits>_<i>.f32`` -- the front end's float32 ``features`` output (little-endian), from which a device
  runtime without TFLite (the Android demo's JVM tests) re-derives the request bytes;
* ``golden.json`` -- per case: the front end used (and its sha256), the expected exit probabilities, the exit
  threshold, the fallback decision, the server's probabilities and the final answer, with sha256 of every file;
  ``packing``: codes and their packed bytes at every k in 1-8 from the server's packer.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np

from tfbitmeta.export.digest import sha256_bytes

POOL = 200  # test images searched for each bitwidth's least confident one

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="the checkpoint the models were exported from (for test images)")
    ap.add_argument("--models", type=Path, required=True, help="folder from `tfbitmeta convert`")
    ap.add_argument("--bits", default="2,4,8,fp")
    ap.add_argument("--images", type=int, default=4,
                    help=f"the first N test images; per bitwidth the least confident of the first {POOL} is added")
    ap.add_argument("--out", type=Path, default=Path("runs/golden"))
    ap.add_argument("--client", type=int, default=None, help="federated models: the client whose front ends to use")
    args = ap.parse_args(argv)

    import httpx
    from PIL import Image

    from tfbitmeta.data import datasets
    from tfbitmeta.device.runtime import DeviceRuntime, backend_name
    from tfbitmeta.errors import TfbitmetaError
    from tfbitmeta.runs import RunDir, TrainConfig
    from tfbitmeta.quant.bitwidth import parse_config
    from tfbitmeta.serve.app import create_app
    from tfbitmeta.serve.config import ServeConfig
    from tfbitmeta.serve.runner import BackgroundServer

    run = RunDir(args.run)
    meta = run.read_meta()
    if meta.get("kind") == "federated":
        data = datasets.load(meta["config"]["dataset"], seed=meta["config"]["seed"])
    else:
        tcfg = TrainConfig.from_dict(meta["train"])
        data = datasets.load(tcfg.dataset, seed=tcfg.seed)
    rt = DeviceRuntime(args.models)
    norm = run.normalization()
    # the first --images test images, plus per bitwidth the least confident of the first POOL (relative to its
    # front end's threshold), so the vectors hold fallback cases however confident the exit heads are
    pool = norm.pixels(data.x_test[:POOL]).numpy().astype(np.uint8)
    chosen = list(range(min(args.images, len(pool))))
    fronts = {}  # token -> (manifest entry, loaded front end), loaded once for the search and the cases
    for token in args.bits.split(","):
        entry, path = rt.choose(parse_config(token), client=args.client)
        fronts[token] = entry, rt.load(entry, path)
        runner = fronts[token][1]
        margin = [runner(image=p[None].astype(np.float32))["exit_probs"][0].max() - float(entry["exit_threshold"])
                  for p in pool]
        if (i := int(np.argmin(margin))) not in chosen:
            chosen.append(i)
    pixels, labels = pool[chosen], data.y_test[:POOL][chosen]
    args.out.mkdir(parents=True, exist_ok=True)
    images = []
    for i, p in enumerate(pixels):
        buf = io.BytesIO()
        Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p).save(buf, format="PNG")
        (args.out / f"img_{i}.png").write_bytes(buf.getvalue())
        images.append(buf.getvalue())

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServeConfig(models=args.models, port=port, max_delay_ms=0)
    cases = []
    with BackgroundServer(create_app(cfg), cfg) as url:
        for entry, runner in fronts.values():
            for i, png in enumerate(images):
                x = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32).reshape(pixels[i].shape)
                out = runner(image=x[None])
                probs = out["exit_probs"][0]
                # what both devices send (a-bit codes packed when a < 8) and the same features as plain int8 codes
                req = rt.request_bytes(entry, out["features"])
                req_int8 = rt.request_bytes(entry, out["features"], packed=False)
                predict = f"{url}/v1/models/{backend_name(entry)}:predict"
                resp, resp_int8 = (httpx.post(predict, content=r, headers={"Content-Type": "application/json"})
                                   for r in (req, req_int8))
                resp.raise_for_status()
                resp_int8.raise_for_status()
                server_probs = resp.json()["outputs"][0]
                if resp_int8.json()["outputs"][0] != server_probs:
                    raise SystemExit(f"packed and int8 requests of {entry['path']} got different answers")
                name = entry["bits"]["name"]
                (args.out / f"req_{name}_{i}.json").write_bytes(req)
                (args.out / f"req_int8_{name}_{i}.json").write_bytes(req_int8)
                (args.out / f"resp_{name}_{i}.json").write_bytes(resp.content)
                feat = np.ascontiguousarray(out["features"], dtype="<f4").tobytes()
                (args.out / f"feat_{name}_{i}.f32").write_bytes(feat)
                th = float(entry["exit_threshold"])
                route = entry.get("router") or {}
                if route:  # a federated client's router decides (DeviceRuntime)
                    router = rt.router(entry)
                    route_score, route_th = float(router.scores(out)[0]), float(router.threshold)
                else:
                    route_score, route_th = float(probs.max()), th
                fallback = bool(route_score < route_th)
                cases.append({
                    "image": f"img_{i}.png", "image_sha256": sha256_bytes(png), "bits": name,
                    "front_end": entry["path"], "front_end_sha256": entry["sha256"], "backend": backend_name(entry),
                    "exit_probs": [float(v) for v in probs], "exit_label": int(np.argmax(probs)), "exit_threshold": th,
                    "fallback": fallback, "route": route.get("score", "max_softmax"), "route_score": route_score,
                    "route_threshold": route_th, "fallback_max_softmax": bool(probs.max() < th),
                    "fallback_at_threshold": {str(t): bool(probs.max() < t) for t in (0.1, 0.3, 0.5, 0.9)},
                    "features": f"feat_{name}_{i}.f32", "features_sha256": sha256_bytes(feat),
                    "request": f"req_{name}_{i}.json", "request_sha256": sha256_bytes(req),
                    "packed_bits": json.loads(req)["inputs"]["features"].get("bits"),
                    "request_int8": f"req_int8_{name}_{i}.json", "request_int8_sha256": sha256_bytes(req_int8),
                    "response": f"resp_{name}_{i}.json", "response_sha256": sha256_bytes(resp.content),
                    "server_probs": server_probs, "server_label": int(np.argmax(server_probs)),
                    "final_label": int(np.argmax(server_probs)) if fallback else int(np.argmax(probs)),
                    "true_label": int(labels[i]),
                })
    if not any(c["fallback"] for c in cases):  # the device tests check the server path on one
        raise SystemExit(f"the golden cases need a fallback: every one of the first {POOL} test images exits early "
                         "at every bitwidth asked for")
    sizes = sorted({f["bytes"] for f in rt.fronts(args.client)})
    choices = []
    for budget in sorted({b for s in sizes for b in (s - 1, s)} | {sizes[-1] * 10}):
        try:
            choices.append({"memory_budget": budget,
                            "front_end": rt.choose(memory_budget=budget, client=args.client)[0]["path"]})
        except TfbitmetaError:
            choices.append({"memory_budget": budget, "front_end": None})
    golden = {"format": "tfbitmeta-golden", "version": 2, "packing": packing_vectors(), "choices": choices,
              "default_front_end": rt.choose(client=args.client)[0]["path"], "client": args.client,
              "manifest_sha256": sha256_bytes((args.models / "manifest.json").read_bytes()),
              "labels": rt.manifest["labels"], "tolerance": {"exit_probs": 1 / 256, "server_probs": 1 / 256},
              "command": "uv run python tools/make_golden.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "cases": cases}
    (args.out / "golden.json").write_text(json.dumps(golden, indent=1))
    print(f"wrote {len(cases)} cases to {args.out}")
    return golden


def packing_vectors() -> list[dict]:
    """Codes packed at every k in 1-8 by the server's own packer (serve.payload.pack_codes): the Kotlin packer must
    produce the same bytes, also for the k and counts (not a multiple of 8 bits) the test models do not export."""
    import base64

    from tfbitmeta.serve.payload import pack_codes

    rng = np.random.default_rng(16)
    vectors = []
    for k in range(1, 9):
        for count in (1, 7, 13, 400):
            codes = rng.integers(0, 1 << k, count)
            vectors.append({"bits": k, "codes": [int(c) for c in codes],
                            "b64": base64.b64encode(pack_codes(codes, k)).decode()})
    return vectors


if __name__ == "__main__":
    main()
