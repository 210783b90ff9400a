"""Server settings and the start-up rule: no bearer token, no binding beyond loopback."""
from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
from pathlib import Path

from tfbitmeta.errors import TfbitmetaError


@dataclasses.dataclass
class ServeConfig:
    models: Path
    run: Path | None = None           # checkpoint for on-demand front ends (GET /v1/frontends/...)
    cache: Path | None = None         # where on-demand conversions are kept [default: <models>/.frontends]
    host: str = "127.0.0.1"
    port: int = 8500
    token: str | None = None
    max_batch: int = 64               # rows per backend call
    max_delay_ms: float = 2.0         # how long the first request of a batch waits for company at most
    batch_idle_ms: float = 0.3        # ... and no longer than this after the last arrival
    max_queue: int = 4096             # rows waiting for the backend; beyond that -> 503
    max_body_bytes: int = 4 << 20
    request_timeout_s: float = 10.0   # queue wait + backend call
    body_timeout_s: float = 10.0      # per read of the request body (slow uploads -> 408)
    conversion_timeout_s: float = 300.0
    max_head_bytes: int = 64 * 1024   # request line + headers; beyond -> 431 and the connection closes
    head_timeout_s: float = 10.0      # a connection must complete its request head within this (idle or slow -> 408)
    grpc_port: int | None = None      # TF Serving's gRPC PredictionService beside REST (None: off)
    workers: int = 1                  # server processes sharing the port(s), each with its own backends
    floor_endpoint: bool = False      # POST /v1/floor and gRPC model __floor__: constants (the load benchmark's floors)

    def __post_init__(self):
        self.models = Path(self.models)
        self.cache = Path(self.cache) if self.cache else self.models / ".frontends"
        if self.token is not None and not self.token.strip():
            self.token = None
        if self.max_batch < 1 or self.max_queue < self.max_batch:
            raise TfbitmetaError(f"max_batch must be >= 1 and max_queue >= max_batch (got max_batch={self.max_batch}, "
                                 f"max_queue={self.max_queue})", param="max_batch")

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}

    def check_security(self) -> None:
        """Refuse to start when the server can be reached from other machines without a token."""
        if self.token is None and not is_loopback(self.host):
            raise TfbitmetaError(f"binding to {self.host} exposes the server beyond this machine: set a bearer token "
                                 "(token, or the TFBITMETA_TOKEN environment variable) or bind to 127.0.0.1",
                                 param="token")
        if self.token is not None and len(self.token) < 16:
            raise TfbitmetaError("the bearer token must have at least 16 characters")
        if self.token is not None and not TOKEN_CHARS.fullmatch(self.token):
            raise TfbitmetaError("the bearer token may only contain ASCII letters, digits and - . _ ~ + / = "
                                 "(no spaces or other characters: clients could never send it)")


TOKEN_CHARS = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 b64token


def is_loopback(host: str) -> bool:
    """True if every address ``host`` resolves to is a loopback address ('' and 0.0.0.0 / :: are not)."""
    if host in ("", "0.0.0.0", "::"):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)
