"""The FastAPI app: TF Serving's REST routes over the backends, the exported files, on-demand front ends."""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from tfbitmeta.serve.batching import DynamicBatcher
from tfbitmeta.serve.config import ServeConfig
from tfbitmeta.serve.errors import ApiError, error_body
from tfbitmeta.serve.frontends import FrontendCache, parse_route
from tfbitmeta.serve.models import ModelStore
from tfbitmeta.serve.payload import parse_request
from tfbitmeta.serve.security import Guard


def _error(status: int, code: str, message: str, headers=None) -> Response:
    return Response(error_body(status, code, message), status, headers, media_type="application/json")


def _file(path, sha256: str) -> FileResponse:
    return FileResponse(path, media_type="application/octet-stream",
                        headers={"X-Sha256": sha256, "ETag": f'"{sha256}"', "Cache-Control": "no-cache"})


def create_app(cfg: ServeConfig, store: ModelStore | None = None) -> FastAPI:
    store = store or ModelStore(cfg.models, cfg.max_batch)
    frontends = FrontendCache(cfg.run, cfg.cache)
    batchers = {}
    app = FastAPI(title="tfbitmeta fallback server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.batchers, app.state.config = store, batchers, cfg

    def batcher(name: str) -> DynamicBatcher:
        if name not in store.backends:
            raise ApiError(404, "unknown_model", f"unknown model {name!r}: available {sorted(store.backends)}")
        if name not in batchers:
            batchers[name] = DynamicBatcher(store.backends[name].predict, cfg.max_batch, cfg.max_delay_ms / 1e3,
                                            cfg.max_queue)
        return batchers[name]

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

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        return _error(500, "internal", f"internal error ({type(e).__name__})")

    @app.on_event("shutdown")
    async def close_batchers():
        for b in batchers.values():
            await b.close()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "models": sorted(store.backends),
                "backend_calls": {name: b.calls for name, b in batchers.items()}}

    @app.get("/manifest.json")
    async def manifest():
        return JSONResponse(store.manifest)

    @app.get("/models/{file}")
    async def model_file(file: str):
        entry = store.files.get(file)  # only files listed in the manifest: no path tricks
        if entry is None:
            raise ApiError(404, "not_found", f"unknown file {file!r}: see /manifest.json")
        return _file(store.folder / file, entry["sha256"])

    @app.post("/v1/models/{name}:predict")
    async def predict(name: str, request: Request):
        b = batcher(name)
        x, kind = parse_request(await request.body(), store.backends[name].spec)
        try:
            probs = await asyncio.wait_for(b.submit(x), cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"no answer within {cfg.request_timeout_s} s") from None
        key = "outputs" if kind == "inputs" else "predictions"
        return Response(json.dumps({key: probs.tolist()}), media_type="application/json")

    @app.get("/v1/models/{name}")
    async def status(name: str):
        if name.endswith(":predict"):
            raise ApiError(405, "method_not_allowed", "predict takes POST with a JSON body", {"Allow": "POST"})
        if name not in store.backends:
            raise ApiError(404, "unknown_model", f"unknown model {name!r}: available {sorted(store.backends)}")
        e = store.backends[name].entry
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
