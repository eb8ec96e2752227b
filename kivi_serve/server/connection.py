"""uvicorn's HTTP/1.1 protocol (httptools) with the limits it lacks, and its own errors in OpenAI's shape.

uvicorn closes a keep-alive connection that idles after a response (``timeout_keep_alive``), but
it never times out a connection that is still to send its request: one that sends nothing, or its
headers a byte every few seconds (slowloris), is held for ever. :class:`GuardedHttpProtocol`
gives every request ``header_timeout`` seconds, from the moment the connection waits for it, to
deliver its headers (then 408 and close; an idle connection is closed quietly); the body's own
deadline is :class:`~kivi_serve.server.middleware.BodyLimit`'s. It also answers requests beyond
``max_connections`` open connections with 503 and Retry-After, and writes uvicorn's own 400 (a
request httptools cannot parse) as an OpenAI error body instead of plain text.
"""

from __future__ import annotations

import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from kivi_serve.server.errors import error_body
from kivi_serve.server.middleware import send_error


def _raw_response(status: int, body: dict, default_headers: list, extra: bytes = b"") -> bytes:
    data = json.dumps(body).encode()
    head = [STATUS_LINE[status]]
    for name, value in default_headers:
        head += [name, b": ", value, b"\r\n"]
    head += [
        b"content-type: application/json\r\n",
        b"content-length: " + str(len(data)).encode() + b"\r\n",
        b"connection: close\r\n",
        extra,
        b"\r\n",
        data,
    ]
    return b"".join(head)


async def _too_many_connections(scope, receive, send) -> None:
    """The ASGI app a request beyond ``max_connections`` gets."""
    message = "The server has too many open connections; retry later."
    headers = [(b"retry-after", b"1"), (b"connection", b"close")]
    await send_error(send, 503, message, "too_many_connections", headers)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus a header deadline, a connection limit and JSON 400s.

    The limits come from the uvicorn config's ``kivi_limits`` (:func:`kivi_serve.server.app.uvicorn_config`
    sets it): ``header_timeout`` (seconds) and ``max_connections``.
    """

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        limits = getattr(config, "kivi_limits", {})
        self.header_timeout: float = limits.get("header_timeout", 10.0)
        self.max_connections: int | None = limits.get("max_connections")
        self.served_app = self.app
        self.header_timer: Any = None
        self.request_begun = False

    # -- the header deadline: armed whenever the connection waits for a request
    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self.request_begun = False
        self.header_timer = self.loop.call_later(self.header_timeout, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timeout(self) -> None:
        self.header_timer = None
        if self.transport.is_closing():
            return
        if self.request_begun:  # a request started, its headers never finished: tell the client
            message = f"the request headers did not arrive within {self.header_timeout:g} s"
            body = error_body(408, message, code="header_timeout")
            self.transport.write(_raw_response(408, body, self.server_state.default_headers))
        self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.request_begun = True

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        over = self.max_connections is not None and len(self.connections) > self.max_connections
        self.app = _too_many_connections if over else self.served_app
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # uvicorn armed its keep-alive timer: the connection now waits for its next request.
        if self.timeout_keep_alive_task is not None:
            self._arm_header_timer()

    # -- uvicorn's own 400, in the API's error shape
    def send_400_response(self, msg: str) -> None:
        # ``msg`` is uvicorn's "Invalid HTTP request received."; say what that means.
        message = "The request is not valid HTTP/1.1: its request line or headers cannot be parsed."
        body = error_body(400, message, code="invalid_http_request")
        self.transport.write(_raw_response(400, body, self.server_state.default_headers))
        self.transport.close()
