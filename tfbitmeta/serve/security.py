"""Bearer-token check, request body limit and body read timeout, as one ASGI middleware in front of the app;
it also turns any unforeseen exception into a JSON 500 that keeps the connection open and logs one line."""
from __future__ import annotations

import asyncio
import hmac
import logging

from tfbitmeta.serve.errors import ApiError, send_error

OPEN_PATHS = frozenset({"/healthz"})
AUTHORIZED = "tfbitmeta.authorized"  # scope key: the request carried the right token (or none is configured)
log = logging.getLogger("tfbitmeta.serve")


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, "body_too_large", f"request body exceeds the {limit}-byte limit")


class BodyTimeout(ApiError):
    def __init__(self, seconds: float):
        super().__init__(408, "body_timeout", f"request body not received within {seconds} s")


def token_matches(header_value: str | None, token: str) -> bool | None:
    """None: no bearer token given; else whether it equals ``token`` (constant time)."""
    scheme, _, given = (header_value or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return None
    return hmac.compare_digest(given.strip().encode("utf-8", "replace"), token.encode())


class Guard:
    """Rejects requests without the bearer token (401) and bodies over ``max_body_bytes`` (413, checked on the
    Content-Length header and again on the bytes actually received, for chunked uploads) and bodies that trickle
    in slower than ``body_timeout_s`` per read (408)."""

    def __init__(self, app, token: str | None, max_body_bytes: int, body_timeout_s: float = 10.0):
        self.app, self.token, self.limit, self.body_timeout = app, token, max_body_bytes, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = True
            await send(message)

        try:
            await self._guarded(scope, receive, tracking_send)
        except Exception as e:  # noqa: BLE001 - a bug must not close keep-alive connections or dump tracebacks
            log.error("internal error on %s %s: %s: %s", scope.get("method"), scope.get("path", "")[:200],
                      type(e).__name__, str(e)[:200])
            if not started:
                await send_error(send, 500, "internal", f"internal error ({type(e).__name__})")

    async def _guarded(self, scope, receive, send):
        headers = dict(scope["headers"])
        ok = True
        if self.token is not None:
            ok = token_matches(headers.get(b"authorization", b"").decode("latin-1"), self.token)
            if scope["path"] not in OPEN_PATHS:
                if ok is None:
                    return await send_error(send, 401, "unauthorized",
                                            "missing bearer token: send 'Authorization: Bearer <token>'",
                                            {"WWW-Authenticate": "Bearer"})
                if not ok:
                    return await send_error(send, 401, "unauthorized", "wrong bearer token",
                                            {"WWW-Authenticate": "Bearer"})
        scope[AUTHORIZED] = bool(ok)
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or len(length) > 18:
                return await send_error(send, 400, "bad_request", "Content-Length is not a number")
            if int(length) > self.limit:
                return await send_error(send, 413, "body_too_large", f"request body exceeds the {self.limit}-byte limit")
        received = 0

        async def limited_receive():
            nonlocal received
            try:
                async with asyncio.timeout(self.body_timeout):  # a timer, not a task per read like wait_for
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.body_timeout) from None
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        return await self.app(scope, limited_receive, send)
