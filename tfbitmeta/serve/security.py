"""Bearer-token check, request body limit and body read timeout, as one ASGI middleware in front of the app."""
from __future__ import annotations

import asyncio
import hmac

from tfbitmeta.serve.errors import ApiError, send_error

OPEN_PATHS = frozenset({"/healthz"})


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, "body_too_large", f"request body exceeds the {limit}-byte limit")


class BodyTimeout(ApiError):
    def __init__(self, seconds: float):
        super().__init__(408, "body_timeout", f"request body not received within {seconds} s")


class Guard:
    """Rejects requests without the bearer token (401) and bodies over ``max_body_bytes`` (413, checked on the
    Content-Length header and again on the bytes actually received, for chunked uploads) and bodies that trickle
    in slower than ``body_timeout_s`` per read (408)."""

    def __init__(self, app, token: str | None, max_body_bytes: int, body_timeout_s: float = 10.0):
        self.app, self.token, self.limit, self.body_timeout = app, token, max_body_bytes, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token is not None and scope["path"] not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not given:
                return await send_error(send, 401, "unauthorized", "missing bearer token: send 'Authorization: Bearer <token>'",
                                        {"WWW-Authenticate": "Bearer"})
            if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                return await send_error(send, 401, "unauthorized", "wrong bearer token", {"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await send_error(send, 400, "bad_request", "Content-Length is not a number")
            if n > self.limit:
                return await send_error(send, 413, "body_too_large", f"request body exceeds the {self.limit}-byte limit")
        received = 0

        async def limited_receive():
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                raise BodyTimeout(self.body_timeout) from None
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        return await self.app(scope, limited_receive, send)
