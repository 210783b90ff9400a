"""Bounded load on the fallback server (127.0.0.1 only) and, in the same run, the backend's limit without HTTP.

Starts `tfbitmeta serve` as a subprocess on a free loopback port, sends ``--clients`` concurrent keep-alive
connections x ``--requests`` predict calls each (one image's int8 features per request, the device's exact wire
format), then stops.  The client is a minimal asyncio HTTP/1.1 client so that it takes as little of the shared CPU
as possible.  Writes ``<out>.json`` and ``<out>.png``: throughput, p50/p99 latency, errors, server RSS before/after,
and the limit = rows per second of batched backend calls (``--max-batch`` rows per call) without HTTP.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
TARGET = 0.7


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def client(port: int, path: str, body: bytes, n: int, latencies: list, errors: list):
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
            if not status_line.startswith(b"HTTP/1.1 200") or b'"outputs"' not in payload:
                errors.append(status_line.decode().strip() + " " + payload[:200].decode(errors="replace"))
    except (OSError, asyncio.IncompleteReadError) as e:
        errors.append(f"connection: {e!r}")
    finally:
        writer.close()


async def load(port, path, body, clients, requests):
    latencies, errors = [], []
    t0 = time.perf_counter()
    await asyncio.gather(*(client(port, path, body, requests, latencies, errors) for _ in range(clients)))
    return time.perf_counter() - t0, latencies, errors


def backend_limit(models: Path, model: str, features: np.ndarray, max_batch: int, seconds: float = 3.0) -> dict:
    """Rows per second of the server's own Backend.predict at full batches, no HTTP, no JSON."""
    from tfbitmeta.serve.models import ModelStore

    backend = ModelStore(models, max_batch).backends[model]
    x = np.repeat(features, max_batch, axis=0)[:max_batch]
    for _ in range(20):
        backend.predict(x)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        backend.predict(x)
        calls += 1
    dt = time.perf_counter() - t0
    return {"backend_calls_per_s": calls / dt, "rows_per_call": max_batch, "rows_per_s": calls * max_batch / dt}


def plot(result: dict, latencies: list, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.hist(np.array(latencies) * 1e3, bins=60)
    a.set_xlabel("latency (ms)")
    a.set_ylabel("requests")
    a.set_title(f"p50 {result['latency_ms']['p50']:.1f} ms, p99 {result['latency_ms']['p99']:.1f} ms, "
                f"{result['errors']} errors")
    vals = [result["throughput_req_per_s"], result["limit"]["rows_per_s"], TARGET * result["limit"]["rows_per_s"]]
    b.bar(["server (req/s)", "backend limit\n(images/s)", f"target {TARGET}x"], vals, color=["C0", "C1", "C2"])
    b.set_yscale("log")
    b.set_title(f"ratio {result['ratio']:.3f} (target {TARGET})")
    for i, v in enumerate(vals):
        b.text(i, v, f"{v:,.0f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, required=True, help="folder from `tfbitmeta convert`")
    ap.add_argument("--bits", default="4", help="which backend: backend_<bits>_split<exit>")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=300, help="requests per client")
    ap.add_argument("--warmup", type=int, default=20, help="warm-up requests per client (not counted)")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-delay-ms", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/server_load"))
    args = ap.parse_args(argv)

    from tfbitmeta.device.runtime import DeviceRuntime, backend_name
    from tfbitmeta.export.convert import run_tflite
    from tfbitmeta.quant.bitwidth import parse_config

    rt = DeviceRuntime(args.models)
    entry, front_path = rt.choose(parse_config(args.bits))
    model = backend_name(entry)
    pixels = np.random.default_rng(0).integers(0, 256, (1, *rt.manifest["input"]["shape"][1:])).astype(np.float32)
    features = run_tflite(front_path, pixels)["features"]
    body = rt.request_bytes(entry, features)
    path = f"/v1/models/{model}:predict"

    port = free_port()
    cmd = [sys.executable, "-m", "tfbitmeta.cli", "serve", "--models", str(args.models), "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import httpx

        from tfbitmeta.serve.runner import wait_healthy

        wait_healthy(f"http://127.0.0.1:{port}", server)
        proc = psutil.Process(server.pid)
        rss_start = proc.memory_info().rss
        asyncio.run(load(port, path, body, args.clients, args.warmup))
        rss_before = proc.memory_info().rss
        elapsed, latencies, errors = asyncio.run(load(port, path, body, args.clients, args.requests))
        rss_after = proc.memory_info().rss
        calls = httpx.get(f"http://127.0.0.1:{port}/healthz").json()["backend_calls"].get(model, 0)
    finally:
        server.terminate()
        server.wait(20)

    limit = backend_limit(args.models, model, features, args.max_batch)
    lat = np.array(latencies) * 1e3
    n = args.clients * args.requests
    thr = len(latencies) / elapsed
    result = {
        "command": "uv run python tools/load_server.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "note": "client, server and other jobs share these CPUs"},
        "server": {"model": model, "max_batch": args.max_batch, "max_delay_ms": args.max_delay_ms,
                   "request_bytes": len(body), "wire_format": "int8 features, base64, one image per request"},
        "clients": args.clients, "requests": n, "completed": len(latencies), "errors": len(errors),
        "error_samples": errors[:5], "seconds": elapsed, "throughput_req_per_s": thr,
        "mean_rows_per_backend_call": (n + args.clients * args.warmup) / calls if calls else None,
        "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                       "mean": float(lat.mean()), "max": float(lat.max())},
        "rss_mb": {"after_start": rss_start / 2**20, "before": rss_before / 2**20, "after": rss_after / 2**20,
                   "growth": (rss_after - rss_before) / 2**20},
        "limit": limit, "ratio": thr / limit["rows_per_s"], "target_ratio": TARGET,
        "ratio_note": "ratio = requests/s (one image each) / backend images/s at full batches; requests/s per backend "
                      "call/s would be ratio_vs_calls, which compares one image with a batch of max_batch images",
        "ratio_vs_calls": thr / limit["backend_calls_per_s"],
    }
    result["met"] = {"ratio": result["ratio"] >= TARGET, "zero_errors": not errors,
                     "memory_flat": result["rss_mb"]["growth"] < max(5.0, 0.05 * result["rss_mb"]["before"])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, latencies, args.out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("throughput_req_per_s", "latency_ms", "errors", "rss_mb", "limit", "ratio",
                                             "mean_rows_per_backend_call", "met")}, indent=1))


if __name__ == "__main__":
    main()
