"""Pure ASGI middleware (no BaseHTTPMiddleware: it would break streaming and disconnect detection).

Outermost first: :class:`RequestContext` (request id, access log, ``kivi_requests_total``),
:class:`ApiKeyAuth` (``Authorization: Bearer``, constant-time compare), :class:`BodyLimit` (413, and
408 for a body that arrives too slowly).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from kivi_serve.server.errors import error_body

ASGIApp = Callable[..., Any]
access_log = logging.getLogger("kivi_serve.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


async def send_error(
    send, status: int, message: str, code: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer an OpenAI-shaped error straight from the middleware (the app never sees the request)."""
    data = json.dumps(error_body(status, message, code=code)).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": hdrs + list(headers or [])})
    await send({"type": "http.response.body", "body": data})


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line; ``extra={"fields": {...}}`` adds keys."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_access_log(enabled: bool) -> None:
    access_log.propagate = False
    access_log.handlers.clear()
    if enabled:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonLogFormatter())
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
    else:
        access_log.setLevel(logging.CRITICAL + 1)


class RequestContext:
    """Give every request an id (``X-Request-Id`` in and out), log it as one JSON line, count it.

    Routes add fields to the log line through ``request.state.log`` (a dict).
    """

    def __init__(self, app: ASGIApp, on_done: Callable[[str, int], None] | None = None):
        self.app = app
        self.on_done = on_done

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        given = _header(scope, b"x-request-id")
        rid = given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["log"] = {}
        status = {"code": 500, "bytes": 0, "started": False}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", rid.encode())]
            elif message["type"] == "http.response.body":
                status["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            code = status["code"] if status["started"] else state["log"].get("status", 499)
            path = scope.get("path", "")
            if self.on_done is not None:
                self.on_done(path, code)
            client = scope.get("client")
            fields = {
                "request_id": rid,
                "method": scope.get("method"),
                "path": path,
                "status": code,
                "duration_ms": round((time.perf_counter() - t0) * 1000, 1),
                "bytes": status["bytes"],
                "client": f"{client[0]}:{client[1]}" if client else None,
            }
            fields.update(state.get("log") or {})
            access_log.info("access", extra={"fields": fields})


#: Paths that need the API key when one is set: the API, and its description.
PROTECTED = ("/v1/", "/docs", "/openapi.json")


class ApiKeyAuth:
    """Require ``Authorization: Bearer <key>`` on :data:`PROTECTED` paths (constant-time compare).

    Every request learns whether it showed the key (``request.state.authorized``; always true
    without a key), so an open endpoint such as /version can say more to those that did.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, protected: tuple[str, ...] = PROTECTED):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.protected = protected

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = _header(scope, b"authorization") or ""
        scheme, _, token = header.partition(" ")
        token = token.strip()
        shown = scheme.lower() == "bearer" and bool(token)
        authorized = self.key is None or (shown and hmac.compare_digest(token.encode(), self.key))
        scope.setdefault("state", {})["authorized"] = authorized
        path = scope.get("path", "")
        if authorized or not (path.startswith(self.protected) or path == "/v1"):
            await self.app(scope, receive, send)
            return
        challenge = [(b"www-authenticate", b'Bearer realm="kivi-serve"')]
        if not shown:
            message = (
                "You didn't provide an API key. You need to provide your API key in an Authorization "
                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
            await send_error(send, 401, message, "missing_api_key", challenge)
            return
        await send_error(send, 401, "Incorrect API key provided.", "invalid_api_key", challenge)


class BodyLimit:
    """Read the whole request body up to ``limit`` bytes (413 beyond it) within ``timeout`` seconds
    (408 and the connection closed after that: a client dribbling its body holds no connection
    for long), then replay it to the app."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float = 30.0):
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await send_error(send, 400, "invalid Content-Length header", "invalid_header")
                return
            if int(declared) > self.limit:
                await self._too_large(send)
                return
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                await self._too_slow(send)
                return
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await self._too_large(send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_slow(self, send) -> None:
        message = f"the request body did not arrive within {self.timeout:g} s"
        await send_error(send, 408, message, "body_timeout", [(b"connection", b"close")])

    async def _too_large(self, send) -> None:
        message = f"request body is larger than the limit of {self.limit} bytes"
        await send_error(send, 413, message, "body_too_large", [(b"connection", b"close")])


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None
