"""The JSON body of a /v1 request, decoded strictly before FastAPI validates it.

Python's ``json.loads`` is lenient where an API must not be: it guesses UTF-16/32 from the first
bytes (so a NUL byte can turn a body into some other valid JSON), accepts ``NaN`` and
``Infinity``, raises ``RecursionError`` on deep nesting, and decodes ``"\\ud800"`` into a string
no tokenizer or JSON encoder takes. :func:`decode_json_body` takes UTF-8 only and answers each of
these with a 400 that says what is wrong (and where, for a lone surrogate).
:class:`JSONBodyRoute` applies it to a route, whatever the request's ``Content-Type`` says: JSON
is the only body these endpoints take.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from kivi_serve.server.errors import APIError, clip

#: A ``\\uD800``-``\\uDFFF`` escape: the only way a surrogate gets into a strictly UTF-8 body.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _invalid_body(message: str) -> APIError:
    return APIError(400, message, code="invalid_json")


def _reject_constant(name: str) -> Any:
    raise _invalid_body(f"The request body is not valid UTF-8 JSON: {name} is not a JSON number.")


def decode_json_body(body: bytes) -> dict:
    """``body`` as a JSON object, or an :class:`APIError` (400) saying why not."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid_body(
            f"The request body is not valid UTF-8 JSON: byte 0x{body[exc.start]:02x} at position "
            f"{exc.start} is not UTF-8."
        ) from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise _invalid_body(
            f"The request body is not valid UTF-8 JSON: {exc.msg} at line {exc.lineno} column {exc.colno}."
        ) from None
    except RecursionError:
        raise _invalid_body("The request body is not valid UTF-8 JSON: it is nested too deeply.") from None
    if not isinstance(value, dict):
        raise _invalid_body(f"The request body must be a JSON object, not {type(value).__name__}.")
    if _SURROGATE_ESCAPE.search(body):
        where = _lone_surrogate(value, [])
        if where is not None:
            path = ".".join(where)
            raise APIError(
                400,
                f"{path} contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is "
                "not valid Unicode.",
                param=where[0],
                code="invalid_value",
            )
    return value


def _lone_surrogate(value: Any, path: list[str]) -> list[str] | None:
    """The path (keys and indexes) to the first string or key holding a lone surrogate, or None."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            here = [*path, clip(key, 64)]
            if _SURROGATE.search(key):
                return here
            found = _lone_surrogate(item, here)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, [*path, str(i)])
            if found is not None:
                return found
    return None


class _DecodedRequest(Request):
    """A request whose body has been read and decoded already."""

    def __init__(self, request: Request, body: bytes, value: dict):
        super().__init__(request.scope, request.receive)
        self._raw_body = body
        self._value = value

    async def body(self) -> bytes:
        return self._raw_body

    async def json(self) -> Any:
        return self._value


_JSON = (b"content-type", b"application/json")


class JSONBodyRoute(APIRoute):
    """A route whose body (if it takes one) is decoded by :func:`decode_json_body` before FastAPI
    validates it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def decoded(request: Request) -> Response:
            body = await request.body()
            if body:
                value = decode_json_body(body)
                # FastAPI parses a body only when it is declared JSON; this one is, whatever was sent.
                request.scope["headers"] = [
                    (k, v) for k, v in request.scope["headers"] if k.lower() != b"content-type"
                ] + [_JSON]
                request = _DecodedRequest(request, body, value)
            return await handler(request)

        return decoded
