"""The FastAPI app: TF Serving's REST routes over the backends, the exported files, on-demand front ends; the gRPC
PredictionService (serve/grpc_service.py) runs beside it in the same process, on the same backends, when enabled."""
from __future__ import annotations

import asyncio
import gc
import json
import os
import time

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from tfbitmeta.serve.batching import Models
from tfbitmeta.serve.config import ServeConfig
from tfbitmeta.serve.errors import ApiError, error_body
from tfbitmeta.serve.frontends import FrontendCache, parse_route
from tfbitmeta.serve.models import ModelStore
from tfbitmeta.serve.payload import parse_request
from tfbitmeta.serve.security import AUTHORIZED, Guard

INLINE_PARSE_BYTES = 64 * 1024  # bodies above this are parsed in a worker thread, not on the event loop


def _error(status: int, code: str, message: str, headers=None) -> Response:
    return Response(error_body(status, code, message), status, headers, media_type="application/json")


def _json(obj) -> Response:
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def _file(path, sha256: str) -> FileResponse:
    return FileResponse(path, media_type="application/octet-stream",
                        headers={"X-Sha256": sha256, "ETag": f'"{sha256}"', "Cache-Control": "no-cache"})


def create_app(cfg: ServeConfig, store: ModelStore | None = None) -> FastAPI:
    frontends = FrontendCache(cfg.run, cfg.cache)
    store = store or ModelStore(cfg.models, cfg.max_batch, frontends)
    models = Models(cfg, store)
    app = FastAPI(title="tfbitmeta fallback server", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.redirect_slashes = False  # Starlette's redirect would echo the Host header
    app.state.store, app.state.batchers, app.state.config, app.state.models = store, models.batchers, cfg, models
    app.state.grpc = None

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return _error(e.status, e.code, e.message, e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        message = "no such endpoint" if e.status_code == 404 else str(e.detail)
        return _error(e.status_code, code, message, getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        return _error(400, "invalid_request", "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))

    @app.on_event("startup")
    async def start_grpc():
        # TensorFlow leaves ~10^6 objects on the heap: a full collection of them stalls every request for tens of
        # ms; freezing them keeps the collector to what requests allocate (measured: p99 58 -> see benchmarks)
        gc.collect()
        gc.freeze()
        if cfg.grpc_port is not None:
            from tfbitmeta.serve.grpc_service import GrpcThread

            app.state.grpc = await run_in_threadpool(GrpcThread(cfg, store).start)

    @app.on_event("shutdown")
    async def close_batchers():
        if app.state.grpc is not None:
            await run_in_threadpool(app.state.grpc.stop)
        await models.close()

    @app.get("/healthz")
    async def healthz(request: Request):
        if not request.scope.get(AUTHORIZED, False):  # open for liveness probes, details only with the token
            return {"status": "ok"}
        return {"status": "ok", "pid": os.getpid(), "models": sorted(store.backends),
                "backend_calls": {name: b.calls for name, b in models.batchers.items()}}

    @app.get("/manifest.json")
    async def manifest():
        return _json(store.manifest)

    @app.get("/models/{file}")
    async def model_file(file: str):
        entry = store.files.get(file)  # only files listed in the manifest: no path tricks
        if entry is None:
            raise ApiError(404, "not_found", f"unknown file {file[:80]!r}: see /manifest.json")
        return _file(store.folder / file, entry["sha256"])

    async def predict(request: Request):
        name = request.path_params["name"]
        spec = models.backend(name).spec
        body = await request.body()
        if len(body) > INLINE_PARSE_BYTES:
            x, kind = await run_in_threadpool(parse_request, body, spec)
        else:
            x, kind = parse_request(body, spec)
        probs = await models.predict(name, x)
        return _json({"outputs" if kind == "inputs" else "predictions": probs})

    # plain Starlette routes (no FastAPI dependency machinery) on the hot path
    app.router.add_route("/v1/models/{name}:predict", predict, methods=["POST"])

    if cfg.floor_endpoint:
        floor_answer = orjson.dumps({"outputs": [[0.1] * 10]})

        async def floor(request: Request):
            await request.body()
            return Response(floor_answer, media_type="application/json")

        app.router.add_route("/v1/floor", floor, methods=["POST"])

    @app.get("/v1/models/{name}")
    async def status(name: str):
        if name.endswith(":predict"):
            raise ApiError(405, "method_not_allowed", "predict takes POST with a JSON body", {"Allow": "POST"})
        e = models.backend(name).entry
        return {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}],
                "metadata": {"bits": e["bits"], "split": e["split"], "sha256": e["sha256"],
                             "inputs": e["inputs"], "outputs": e["outputs"], "signature": e["signature"]}}

    @app.get("/v1/frontends/{family}/{bits}/{exit_file}")
    async def frontend(family: str, bits: str, exit_file: str):
        cfg_bits, exit_, ext = parse_route(bits, exit_file)
        t0 = time.perf_counter()
        try:
            path, entry, converted = await asyncio.wait_for(
                run_in_threadpool(frontends.get, family, cfg_bits, exit_), cfg.conversion_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"conversion did not finish within {cfg.conversion_timeout_s} s") from None
        if converted is not None:
            await run_in_threadpool(store.add, path.parent, converted)
        if ext == "json":
            return entry
        resp = _file(path, entry["sha256"])
        resp.headers["X-Converted-Seconds"] = f"{time.perf_counter() - t0:.3f}" if converted else "0"
        return resp

    app.add_middleware(Guard, token=cfg.token, max_body_bytes=cfg.max_body_bytes, body_timeout_s=cfg.body_timeout_s)
    return app


def app_from_env() -> FastAPI:
    """uvicorn's app factory for worker processes (``tfbitmeta serve --workers N``)."""
    from tfbitmeta.serve.runner import CONFIG_ENV

    return create_app(ServeConfig(**json.loads(os.environ[CONFIG_ENV])))
