"""Errors in OpenAI's JSON shape, with the right status code; a client mistake is never a 500."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kivi_serve.engine.types import EngineOverloadedError, EngineRequestError, EngineUnavailableError

log = logging.getLogger("kivi_serve.server")

#: status → OpenAI error ``type`` (other 4xx: ``invalid_request_error``, other 5xx: ``server_error``).
ERROR_TYPES = {429: "rate_limit_error", 503: "service_unavailable_error", 504: "timeout_error"}
#: Longest piece of client input an error message quotes, and longest message (characters).
MAX_ECHO = 256
MAX_MESSAGE = 2048
#: What a union-typed field accepts, for its validation error (pydantic lists every member's failure).
UNION_SHAPES = {
    "prompt": "a string, an array of strings, an array of token ids or an array of arrays of token ids",
    "stop": "a string or an array of strings",
    "content": "a string or an array of text parts",
}


class APIError(Exception):
    """Raise from a route to answer ``status`` with an OpenAI-shaped error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


class RequestTimeout(Exception):
    """A request ran past ``--request-timeout`` (answered 504; its engine requests are aborted)."""


class DrainCut(Exception):
    """The server's drain deadline passed while the request ran (answered 503; its engine requests
    are aborted; a stream ends with this error event and ``[DONE]``)."""


def clip(text: object, limit: int = MAX_ECHO) -> str:
    """Client input as an error message may quote it: at most ``limit`` characters, always encodable
    as UTF-8 (a lone surrogate is written as its escape, e.g. ``\\ud800``)."""
    text = str(text)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def api_error_for(exc: Exception) -> APIError:
    """The HTTP answer to an engine error (or a :class:`RequestTimeout`)."""
    if isinstance(exc, EngineRequestError):
        return APIError(400, exc.message, param=exc.param, code=exc.code or "invalid_value")
    if isinstance(exc, EngineOverloadedError):
        return APIError(
            429,
            f"The engine is overloaded ({exc}); retry later.",
            code="engine_overloaded",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, EngineUnavailableError):
        return APIError(503, str(exc), code="engine_unavailable")
    if isinstance(exc, RequestTimeout):
        return APIError(504, str(exc) or "request timed out", code="request_timeout")
    if isinstance(exc, DrainCut):
        return APIError(
            503,
            "The server is shutting down; the request was stopped.",
            code="shutting_down",
            headers={"Retry-After": "5"},
        )
    return APIError(500, f"generation failed: {exc}", code="internal_error")


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape; the message is clipped and made encodable (it may quote client input)."""
    return {
        "error": {
            "message": clip(message, MAX_MESSAGE),
            "type": ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(status: int, message: str, *, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(
        error_body(status, message, param=param, code=code), status_code=status, headers=headers
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [clip(p, 64) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    # A union's members show up as extra path parts (prompt.list[str].0, ...): name the field and what
    # it accepts instead of listing every member's failure.
    member = next((i for i, p in enumerate(loc) if _union_tag(p)), None)
    if member and loc[member - 1] in UNION_SHAPES:
        return f"{'.'.join(loc[:member])} must be {UNION_SHAPES[loc[member - 1]]}.", param
    where = ".".join(p for p in loc if not _union_tag(p)) or "body"
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{where}: {msg}{more}", param


def _union_tag(part: str) -> bool:
    """Whether a pydantic error location part names a union member (``str``, ``list[int]``, ...)."""
    return (
        part in ("str", "int", "float", "bool")
        or "[" in part
        or part.startswith(("constrained-", "function-"))
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param, code="invalid_value" if param else "invalid_json")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            detail = f"Unknown path {clip(request.url.path)}"
        elif exc.status_code == 405:
            detail = f"Method {clip(request.method, 16)} is not allowed on {clip(request.url.path)}"
        return error_response(exc.status_code, detail, code=codes.get(exc.status_code), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error ({type(exc).__name__})", code="internal_error")
