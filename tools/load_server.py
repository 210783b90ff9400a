"""Bounded load on the fallback server (127.0.0.1 only): five figures side by side in one run, as ratios.

(a) HTTP floor: ``POST /v1/floor`` on the same app and middleware, the same 1-image body, a constant answer;
(b) REST predict, one image's features per request (the device's exact bytes: packed k-bit codes, base64);
(c) gRPC ``PredictionService/Predict`` (TF Serving's stubs), one image per request, and beside it (c0) the gRPC
floor: the same request bytes to the model name ``__floor__``, which the server answers with a constant after the
token check (what grpcio itself costs per call; no target, it tells whether (c) >= (b) is reachable at all);
(d) REST predict with 64 images per request (one columnar int8 tensor);
(e) the backend alone (``Backend.predict`` at full batches, no server) in images/s.

For every ``--workers`` value the tool starts ``tfbitmeta serve`` as a subprocess on free loopback ports, runs
``--clients`` concurrent keep-alive connections x ``--requests`` calls for (a)-(d) (after a warm-up with the tool's
own Python clients, which check every answer), records throughput, p50/p99 latency, errors and the server's RSS
(all worker processes) before/after, then stops it. The timed phases use nghttp2's ``h2load`` when installed
(``--client h2load``: C, one thread, so the client's share of the 2 shared cores is small and the server is what is
measured; HTTP/1.1 keep-alive for REST, HTTP/2 for gRPC, one connection per client with one call in flight) or the
Python asyncio clients (``--client python``).
Targets: (b) >= 0.7 (a); (c) >= (b); (d) >= 0.5 (e) in images/s; p99 <= 3 p50; 0 errors; RSS flat.
Writes ``<out>.json`` and ``<out>.png``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # grpc.aio client poller noise (BlockingIOError)
TARGETS = {"rest_vs_floor": 0.7, "grpc_vs_rest": 1.0, "batch64_vs_backend": 0.5, "p99_over_p50": 3.0}
PHASES = ("a_floor", "b_rest_1", "c0_grpc_floor", "c_grpc_1", "d_rest_64")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def http_client(port: int, path: str, body: bytes, n: int, latencies: list, errors: list, expect: bytes):
    """A minimal HTTP/1.1 keep-alive client (as little of the shared CPU as possible)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            writer.write(head + body)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            payload = await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            if not status_line.startswith(b"HTTP/1.1 200") or expect not in payload:
                errors.append(status_line.decode().strip() + " " + payload[:200].decode(errors="replace"))
    except (OSError, asyncio.IncompleteReadError) as e:
        errors.append(f"connection: {e!r}")
    finally:
        writer.close()


_channels: dict = {}


async def grpc_client(port: int, request, n: int, latencies: list, errors: list):
    """One caller; all callers of a phase share one channel (HTTP/2 multiplexes them, as TF Serving clients do)."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    loop = asyncio.get_running_loop()
    if _channels.get("loop") is not loop:
        _channels.update(loop=loop, stub=prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.aio.insecure_channel(f"127.0.0.1:{port}")))
    stub = _channels["stub"]
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            resp = await stub.Predict(request, timeout=30)
            latencies.append(time.perf_counter() - t0)
            if "probs" not in resp.outputs:
                errors.append("no probs")
        except grpc.RpcError as e:
            latencies.append(time.perf_counter() - t0)
            errors.append(f"{e.code()}: {e.details()}")


def h2load(url: str, body: bytes, n: int, clients: int, headers: list[str], h1: bool,
           ok_data_bytes: int | None = None) -> tuple[float, list, list]:
    """One phase with nghttp2's h2load (C, one thread: the client takes far less of the shared CPUs than the
    server), ``clients`` keep-alive connections with one request in flight each; per-request latency from its log.
    REST errors are non-200 statuses; gRPC errors travel in trailers h2load does not read, so a gRPC phase also
    checks the DATA bytes received against ``ok_data_bytes`` per call (a failed call has no message)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data, log = Path(tmp) / "body", Path(tmp) / "log"
        data.write_bytes(body)
        cmd = ["h2load", "-n", str(n), "-c", str(min(clients, n)), "-m", "1", "-t", "1", "-d", str(data),
               f"--log-file={log}", *(x for h in headers for x in ("-H", h)), *(["--h1"] if h1 else []), url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
        rows = [line.split("\t") for line in log.read_text().splitlines()]
    m = re.search(r"finished in ([\d.]+)(ms|s|us)", out)
    elapsed = float(m.group(1)) * {"s": 1, "ms": 1e-3, "us": 1e-6}[m.group(2)]
    latencies = [int(r[2]) * 1e-6 for r in rows]
    errors = [f"HTTP {r[1]}" for r in rows if r[1] != "200"]
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    if done is None or int(done.group(2)) < n:
        errors += [f"h2load: {n - (int(done.group(2)) if done else 0)} of {n} requests did not succeed"]
    traffic = re.search(r"traffic: .*? total, .*? headers .*?, \S+ \((\d+)\) data", out)
    if ok_data_bytes is not None and (traffic is None or int(traffic.group(1)) < n * ok_data_bytes):
        got = int(traffic.group(1)) if traffic else 0
        errors += ["grpc: no message"] * max(1, n - got // ok_data_bytes)
    return elapsed, latencies, errors


def run_phase(make_client, clients: int, requests: int) -> tuple[float, list, list]:
    async def go():
        latencies, errors = [], []
        t0 = time.perf_counter()
        await asyncio.gather(*(make_client(requests, latencies, errors) for _ in range(clients)))
        return time.perf_counter() - t0, latencies, errors

    return asyncio.run(go())


def summarize(parts: list, clients: int, images_per_request: int, rss_before: float, rss_after: float) -> dict:
    elapsed = sum(p[0] for p in parts)
    latencies = [x for p in parts for x in p[1]]
    errors = [x for p in parts for x in p[2]]
    lat = np.array(latencies) * 1e3
    thr = len(latencies) / elapsed
    return {"completed": len(latencies), "errors": len(errors), "error_samples": errors[:3], "seconds": elapsed,
            "req_per_s": thr, "images_per_s": thr * images_per_request,
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                           "mean": float(lat.mean()), "max": float(lat.max())},
            "p99_over_p50": float(np.percentile(lat, 99) / np.percentile(lat, 50)),
            "rss_mb": {"before": rss_before / 2**20, "after": rss_after / 2**20,
                       "growth": (rss_after - rss_before) / 2**20}}


def backend_alone(models: Path, model: str, x64: np.ndarray, seconds: float = 3.0) -> dict:
    """(e) images/s of the server's own Backend.predict at full batches, no HTTP, no JSON."""
    from tfbitmeta.serve.models import ModelStore

    backend = ModelStore(models, len(x64)).backends[model]
    for _ in range(20):
        backend.predict(x64)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        backend.predict(x64)
        calls += 1
    dt = time.perf_counter() - t0
    return {"calls_per_s": calls / dt, "rows_per_call": len(x64), "images_per_s": calls * len(x64) / dt}


def grpc_response_bytes(port: int, request) -> int:
    """Size of one successful Predict answer (h2load's gRPC phases check the bytes they received against it)."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30).ByteSize()


def server_cpu(pid: int):
    """CPU seconds (user + system) of the server and its worker processes: what a request costs the server,
    whatever share of the shared cores other jobs take."""
    def cpu():
        p = psutil.Process(pid)
        return sum(sum(c.cpu_times()[:2]) for c in [p, *p.children(recursive=True)])
    return cpu


def server_rss(pid: int):
    def rss():
        p = psutil.Process(pid)
        return sum(c.memory_info().rss for c in [p, *p.children(recursive=True)])
    return rss


def measure(args, workers: int, bodies: dict, grpc_request, model: str) -> dict:
    from tensorflow_serving.apis import predict_pb2

    from tfbitmeta.serve.grpc_service import FLOOR_MODEL
    from tfbitmeta.serve.runner import wait_healthy

    floor_request = predict_pb2.PredictRequest()
    floor_request.CopyFrom(grpc_request)
    floor_request.model_spec.name = FLOOR_MODEL  # (c)'s request but for the model name

    port, gport = free_port(), free_port()
    cmd = [sys.executable, "-m", "tfbitmeta.cli", "serve", "--models", str(args.models), "--port", str(port),
           "--grpc-port", str(gport), "--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms),
           "--batch-idle-ms", str(args.batch_idle_ms), "--workers", str(workers), "--floor-endpoint"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = {"workers": workers}
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server, timeout=600)
        import httpx

        pids, deadline = set(), time.monotonic() + 300
        while len(pids) < workers and time.monotonic() < deadline:  # every worker answers before the load starts
            with httpx.Client() as c:
                pids.add(c.get(f"http://127.0.0.1:{port}/healthz").json()["pid"])
            time.sleep(0.05)
        rss = server_rss(server.pid)
        out["rss_mb_at_start"] = rss() / 2**20
        c, r, w = args.clients, args.requests, args.warmup
        phases = {
            "a_floor": (lambda n, lat, err: http_client(port, "/v1/floor", bodies["one"], n, lat, err, b'"outputs"'), r, 1),
            "b_rest_1": (lambda n, lat, err: http_client(port, f"/v1/models/{model}:predict", bodies["one"], n, lat, err,
                                                         b'"outputs"'), r, 1),
            "c0_grpc_floor": (lambda n, lat, err: grpc_client(gport, floor_request, n, lat, err), r, 1),
            "c_grpc_1": (lambda n, lat, err: grpc_client(gport, grpc_request, n, lat, err), r, 1),
            "d_rest_64": (lambda n, lat, err: http_client(port, f"/v1/models/{model}:predict", bodies["64"], n, lat, err,
                                                          b'"outputs"'), max(args.rounds, r // 4), 64),
        }
        warm = {}
        for name, (make, n, images) in phases.items():  # warm-up with the Python clients: they check every answer
            warm[name] = run_phase(make, c, max(1, w if images == 1 else w // 4))
        out["warmup_errors"] = {name: len(v[2]) for name, v in warm.items()}
        out["rss_mb_after_warmup"] = rss() / 2**20
        if args.client == "h2load":
            json_h = ["content-type: application/json"]
            grpc_h = ["content-type: application/grpc", "te: trailers"]
            ok_bytes = 5 + grpc_response_bytes(gport, grpc_request)
            ok_floor_bytes = 5 + grpc_response_bytes(gport, floor_request)
            grpc_body, floor_body = (b"\0" + len(m.SerializeToString()).to_bytes(4, "big") + m.SerializeToString()
                                     for m in (grpc_request, floor_request))
            grpc_url = f"http://127.0.0.1:{gport}/tensorflow.serving.PredictionService/Predict"
            timed = {
                "a_floor": lambda k: h2load(f"http://127.0.0.1:{port}/v1/floor", bodies["one"], k * c, c, json_h, True),
                "b_rest_1": lambda k: h2load(f"http://127.0.0.1:{port}/v1/models/{model}:predict", bodies["one"], k * c,
                                             c, json_h, True),
                "c0_grpc_floor": lambda k: h2load(grpc_url, floor_body, k * c, c, grpc_h, False, ok_floor_bytes),
                "c_grpc_1": lambda k: h2load(grpc_url, grpc_body, k * c, c, grpc_h, False, ok_bytes),
                "d_rest_64": lambda k: h2load(f"http://127.0.0.1:{port}/v1/models/{model}:predict", bodies["64"], k * c,
                                              c, json_h, True),
            }
        else:
            timed = {name: (lambda k, make=make: run_phase(make, c, k)) for name, (make, n, images) in phases.items()}
        # the phases alternate in short rounds so that other jobs' load, which drifts, hits each of them alike
        parts, rss0 = {name: [] for name in phases}, {name: rss() for name in phases}
        cpu, cpu_used = server_cpu(server.pid), {name: 0.0 for name in phases}
        for _ in range(args.rounds):
            for name, (make, n, images) in phases.items():
                c0 = cpu()
                parts[name].append(timed[name](max(1, n // args.rounds)))
                cpu_used[name] += cpu() - c0
        for name, (make, n, images) in phases.items():
            out[name] = summarize(parts[name], c, images, rss0[name], rss())
            out[name]["server_cpu_us_per_request"] = cpu_used[name] * 1e6 / out[name]["completed"]
            print(f"workers {workers} {name}: {out[name]['req_per_s']:.0f} req/s, {out[name]['images_per_s']:.0f} "
                  f"images/s, p50 {out[name]['latency_ms']['p50']:.1f} ms, p99 {out[name]['latency_ms']['p99']:.1f} ms, "
                  f"{out[name]['errors']} errors, server CPU {out[name]['server_cpu_us_per_request']:.0f} us/request",
                  flush=True)
        out["rss_mb_at_end"] = rss() / 2**20
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    return out


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = PHASES
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        vals = [run[n]["images_per_s"] for n in names] + [result["e_backend"]["images_per_s"]]
        xs = np.arange(len(names) + 1) + i * width
        a.bar(xs, vals, width, label=f"{run['workers']} worker(s)")
        for x, v in zip(xs, vals):
            a.text(x, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=7)
        p50 = [run[n]["latency_ms"]["p50"] for n in names]
        p99 = [run[n]["latency_ms"]["p99"] for n in names]
        b.bar(np.arange(len(names)) + i * width, p99, width, alpha=0.4, color=f"C{i}")
        b.bar(np.arange(len(names)) + i * width, p50, width, color=f"C{i}",
              label=f"{run['workers']} worker(s): p50 (dark), p99")
    a.set_xticks(np.arange(len(names) + 1) + width * (len(runs) - 1) / 2,
                 ["(a) floor\nreq=img", "(b) REST 1", "(c0) gRPC\nfloor", "(c) gRPC 1", "(d) REST 64",
                  "(e) backend\nalone"])
    a.set_yscale("log")
    a.set_ylabel("images/s (requests/s for a-c)")
    a.legend(fontsize=8)
    b.set_xticks(np.arange(len(names)) + width * (len(runs) - 1) / 2, ["(a)", "(b)", "(c0)", "(c)", "(d)"])
    b.set_ylabel("latency (ms)")
    b.legend(fontsize=8)
    fig.suptitle(f"{result['clients']} keep-alive clients, load average at start {result['machine']['loadavg_start']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, required=True, help="folder from `tfbitmeta convert`")
    ap.add_argument("--bits", default="4", help="which backend: backend_<bits>_split<exit>")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=200, help="requests per client for (a)-(c); (d) sends 1/4 as many")
    ap.add_argument("--warmup", type=int, default=20, help="warm-up requests per client (not counted)")
    ap.add_argument("--rounds", type=int, default=5, help="the phases alternate in this many rounds")
    ap.add_argument("--workers", default="1,2", help="server process counts to compare, e.g. 1,2")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-delay-ms", type=float, default=2.0)
    ap.add_argument("--batch-idle-ms", type=float, default=0.3)
    ap.add_argument("--client", choices=["h2load", "python"], default="h2load" if shutil.which("h2load") else "python",
                    help="load generator of the timed phases: nghttp2's h2load (apt-get install nghttp2-client; "
                         "the default when installed) or the tool's own asyncio clients")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/server_load"))
    args = ap.parse_args(argv)

    import tensorflow as tf

    from tfbitmeta.device.runtime import DeviceRuntime, backend_name
    from tfbitmeta.export.convert import run_tflite
    from tfbitmeta.quant.bitwidth import parse_config
    from tfbitmeta.serve.payload import FeatureSpec, encode_request, pack_codes, quantize
    from tensorflow_serving.apis import predict_pb2

    rt = DeviceRuntime(args.models)
    entry, front_path = rt.choose(parse_config(args.bits))
    model, spec = backend_name(entry), FeatureSpec.of_front_end(entry)
    pixels = np.random.default_rng(0).integers(0, 256, (args.max_batch, *rt.manifest["input"]["shape"][1:]))
    features = run_tflite(front_path, pixels.astype(np.float32))["features"]
    bodies = {"one": rt.request_bytes(entry, features[:1]), "64": encode_request(features, spec, packed=False)}
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    if spec.qdtype:
        q = quantize(features[:1], spec.scale, spec.zero_point)
        if spec.code_bits:
            req.inputs["features"].CopyFrom(tf.make_tensor_proto(
                np.array([pack_codes(q[0].astype(np.int32) - spec.zero_point, spec.code_bits)], dtype=object)))
            req.inputs["bits"].CopyFrom(tf.make_tensor_proto(np.int32(spec.code_bits)))
        else:
            req.inputs["features"].CopyFrom(tf.make_tensor_proto(q))
        req.inputs["scale"].CopyFrom(tf.make_tensor_proto(np.float32(spec.scale)))
        req.inputs["zero_point"].CopyFrom(tf.make_tensor_proto(np.int32(spec.zero_point)))
    else:
        req.inputs["features"].CopyFrom(tf.make_tensor_proto(features[:1]))

    import gc

    gc.collect()
    gc.freeze()  # the client process imported TensorFlow too: keep full collections of that heap out of the timings
    load0 = os.getloadavg()
    runs = [measure(args, int(w), bodies, req, model) for w in args.workers.split(",")]
    e = backend_alone(args.models, model, features)
    load1 = os.getloadavg()
    for run in runs:
        ratios = {"rest_vs_floor": run["b_rest_1"]["req_per_s"] / run["a_floor"]["req_per_s"],
                  "grpc_vs_rest": run["c_grpc_1"]["req_per_s"] / run["b_rest_1"]["req_per_s"],
                  "batch64_vs_backend": run["d_rest_64"]["images_per_s"] / e["images_per_s"],
                  "p99_over_p50_worst": max(run[n]["p99_over_p50"] for n in PHASES),
                  "grpc_floor_vs_rest": run["c0_grpc_floor"]["req_per_s"] / run["b_rest_1"]["req_per_s"]}
        cost = {n: run[n]["server_cpu_us_per_request"] for n in PHASES}
        # the same ratios from the server's CPU per request (capacity if the server had the cores to itself)
        run["cpu_ratios"] = {"rest_vs_floor": cost["a_floor"] / cost["b_rest_1"],
                             "grpc_vs_rest": cost["b_rest_1"] / cost["c_grpc_1"],
                             "batch64_vs_backend": (1e6 / (cost["d_rest_64"] / 64)) / e["images_per_s"],
                             "grpc_floor_vs_rest": cost["b_rest_1"] / cost["c0_grpc_floor"]}
        run["ratios"] = ratios
        run["met"] = {"rest_vs_floor": ratios["rest_vs_floor"] >= TARGETS["rest_vs_floor"],
                      "grpc_vs_rest": ratios["grpc_vs_rest"] >= TARGETS["grpc_vs_rest"],
                      "batch64_vs_backend": ratios["batch64_vs_backend"] >= TARGETS["batch64_vs_backend"],
                      "p99_over_p50": ratios["p99_over_p50_worst"] <= TARGETS["p99_over_p50"],
                      "zero_errors": all(run[n]["errors"] == 0 for n in PHASES)
                      and not any(run["warmup_errors"].values()),
                      "memory_flat": run["rss_mb_at_end"] - run["rss_mb_after_warmup"]
                      < max(10.0, 0.03 * run["rss_mb_at_start"])}
    result = {
        "command": "uv run python tools/load_server.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_start": [round(v, 2) for v in load0], "loadavg_end": [round(v, 2) for v in load1],
                    "note": "client, server and other developers' jobs share these CPUs: compare within this file"},
        "server": {"model": model, "max_batch": args.max_batch, "max_delay_ms": args.max_delay_ms,
                   "batch_idle_ms": args.batch_idle_ms,
                   "request_bytes_1": len(bodies["one"]), "request_bytes_64": len(bodies["64"]),
                   "grpc_request_bytes_1": req.ByteSize(),
                   "wire_format": "(b) packed k-bit codes, base64 JSON; (c) DT_STRING packed codes; (d) int8 base64 [64,...]"},
        "clients": args.clients, "load_generator": args.client, "targets": TARGETS, "e_backend": e, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({"e_backend_images_per_s": e["images_per_s"],
                      **{f"workers_{r['workers']}": {"ratios": r["ratios"], "cpu_ratios": r["cpu_ratios"], "met": r["met"]}
                         for r in runs}}, indent=1))


if __name__ == "__main__":
    main()
