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
    return APIError(500, f"generation failed: {exc}", code="internal_error")


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
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
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return (
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not "
            "valid JSON.)",
            None,
        )
    # Union members show up as extra path parts (e.g. prompt.str, prompt.list[int]); keep the field.
    param = loc[0] if loc else None
    where = ".".join(p for p in loc if not p.startswith(("list[", "str", "int", "function-"))) or "body"
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{where}: {msg}{more}", param


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
            detail = f"Unknown path {request.url.path}"
        elif exc.status_code == 405:
            detail = f"Method {request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, detail, code=codes.get(exc.status_code), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error ({type(exc).__name__})", code="internal_error")
