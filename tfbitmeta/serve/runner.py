"""Running the app under uvicorn: in the foreground (``tfbitmeta serve``, one or several worker processes) or in a
thread (tests, tools).

:class:`HardenedProtocol` extends uvicorn's httptools protocol (uvicorn is pinned to the tested minor version in
pyproject.toml): a request head (request line + headers) larger than ``max_head_bytes`` gets 431 and the connection
is closed before the rest is buffered; a connection that has not completed a request head within
``head_timeout_s`` -- idle since it opened, or stuck half-way through the headers -- gets 408 and is closed; HTTP
that does not parse gets a JSON 400 instead of uvicorn's plain text.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tfbitmeta.serve.config import ServeConfig
from tfbitmeta.serve.errors import error_body

CONFIG_ENV = "TFBITMETA_SERVE_CONFIG"


class HardenedProtocol(HttpToolsProtocol):
    max_head_bytes = 64 * 1024
    head_timeout_s = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_bytes, self._in_head, self._tail = 0, True, b""
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_expired)

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._in_head:
            end = (self._tail + data).find(b"\r\n\r\n")
            size = self._head_bytes + (len(data) if end < 0 else end + 4 - len(self._tail))
            if size > self.max_head_bytes:
                self._reject(431, "headers_too_large", f"request line and headers exceed {self.max_head_bytes} bytes")
                return
            self._head_bytes = size if end < 0 else 0
            self._tail = (self._tail + data)[-3:] if end < 0 else b""
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._in_head:
            self._in_head, self._head_bytes, self._tail = True, 0, b""
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_expired)

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes, self._tail = False, 0, b""
        self._cancel_head_timer()
        super().on_headers_complete()

    def _cancel_head_timer(self) -> None:
        timer, self._head_timer = getattr(self, "_head_timer", None), None
        if timer is not None:
            timer.cancel()

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self._reject(408, "header_timeout", f"no complete request head within {self.head_timeout_s} s")

    def _reject(self, status: int, code: str, message: str) -> None:
        reason = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        body = error_body(status, code, message)
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n" % (status, reason, len(body)) + body)
        self._cancel_head_timer()
        self.transport.close()

    def send_400_response(self, msg: str) -> None:  # uvicorn's hook for unparseable HTTP
        self._reject(400, "invalid_http", msg)


def protocol_for(cfg: ServeConfig) -> type[HardenedProtocol]:
    """HardenedProtocol with ``cfg``'s limits (worker processes need the importable default class)."""
    if (cfg.max_head_bytes, cfg.head_timeout_s) == (HardenedProtocol.max_head_bytes, HardenedProtocol.head_timeout_s):
        return HardenedProtocol
    return type("TunedProtocol", (HardenedProtocol,), {"max_head_bytes": cfg.max_head_bytes,
                                                       "head_timeout_s": cfg.head_timeout_s})


def uvicorn_kwargs(cfg: ServeConfig, log_level: str = "warning") -> dict:
    return dict(host=cfg.host, port=cfg.port, http=protocol_for(cfg), loop="auto", lifespan="on", log_level=log_level,
                access_log=False, timeout_keep_alive=5, timeout_graceful_shutdown=5, server_header=False,
                limit_concurrency=4096, backlog=2048,
                proxy_headers=False)  # no proxy in front: X-Forwarded-* are not trusted (and one ASGI layer less)


def uvicorn_config(app, cfg: ServeConfig, log_level: str = "warning") -> uvicorn.Config:
    return uvicorn.Config(app, **uvicorn_kwargs(cfg, log_level))


def serve_forever(cfg: ServeConfig, log_level: str = "info") -> None:
    """``tfbitmeta serve``: one process, or ``cfg.workers`` processes on one listening socket (each loads the
    backends; the on-demand cache on disk is shared)."""
    if cfg.workers <= 1:
        from tfbitmeta.serve.app import create_app

        uvicorn.Server(uvicorn_config(create_app(cfg), cfg, log_level)).run()
        return
    os.environ[CONFIG_ENV] = json.dumps(cfg.to_dict())
    cfg = dataclasses.replace(cfg, max_head_bytes=HardenedProtocol.max_head_bytes,
                              head_timeout_s=HardenedProtocol.head_timeout_s)
    # a worker imports TensorFlow before it answers the supervisor's ping: 5 s (the default) is too short on a
    # loaded machine and the supervisor would kill and restart it forever
    uvicorn.run("tfbitmeta.serve.app:app_from_env", factory=True, workers=cfg.workers, timeout_worker_healthcheck=120,
                **uvicorn_kwargs(cfg, log_level))


def wait_healthy(url: str, process=None, timeout: float = 120.0) -> None:
    """Poll ``url/healthz`` until it answers 200; raise if ``process`` (a Popen of ``tfbitmeta serve``) exits first
    or ``timeout`` seconds pass."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process is not None and process.poll() is not None:
            err = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise RuntimeError(f"the server exited with code {process.returncode}: {err[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {url} did not become healthy in {timeout:.0f} s")
        time.sleep(0.2)


class BackgroundServer:
    """A real uvicorn on a loopback port, in a thread: ``with BackgroundServer(app, cfg) as url: ...``."""

    def __init__(self, app, cfg: ServeConfig):
        self.server = uvicorn.Server(uvicorn_config(app, cfg))
        self.url = f"http://{cfg.host}:{cfg.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
