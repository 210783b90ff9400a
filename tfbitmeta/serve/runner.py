"""Running the app under uvicorn: in the foreground (``tfbitmeta serve``) or in a thread (tests, tools)."""
from __future__ import annotations

import threading
import time

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tfbitmeta.serve.config import ServeConfig
from tfbitmeta.serve.errors import error_body


class JsonErrorProtocol(HttpToolsProtocol):
    """uvicorn answers unparseable HTTP itself, in plain text; answer JSON like the app does."""

    def send_400_response(self, msg: str) -> None:
        body = error_body(400, "invalid_http", msg)
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
        self.transport.close()


def uvicorn_config(app, cfg: ServeConfig, log_level: str = "warning") -> uvicorn.Config:
    return uvicorn.Config(app, host=cfg.host, port=cfg.port, http=JsonErrorProtocol, loop="auto", lifespan="on",
                          log_level=log_level, access_log=False, timeout_keep_alive=5,
                          timeout_graceful_shutdown=5, h11_max_incomplete_event_size=64 * 1024, server_header=False)


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
