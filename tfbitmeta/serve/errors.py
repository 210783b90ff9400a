"""Structured JSON errors: every failure answers ``{"error": message, "code": name, "status": http_status}``."""
from __future__ import annotations

import json


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_body(status: int, code: str, message: str) -> bytes:
    return json.dumps({"error": message, "code": code, "status": status}).encode()


async def send_error(send, status: int, code: str, message: str, headers: dict | None = None) -> None:
    """Answer an ASGI request with a JSON error (for middleware, which runs outside FastAPI's handlers)."""
    body = error_body(status, code, message)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
