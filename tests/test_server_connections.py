"""The server as a network service, over the tests' FakeEngine (no model): connection timeouts and
limits on a real uvicorn (in a thread), and SIGTERM's drain on a real server process, both ways:
streams that finish within ``--drain-timeout``, and streams cut at it.

Timeouts here are short (0.5-1.5 s) and each check allows a few seconds more for a busy machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

from server_harness import FakeEngine, ServerProcess  # noqa: E402

from kivi_serve.bench.server_process import free_port  # noqa: E402
from kivi_serve.server.app import EXIT_DRAIN_CUT, EXIT_OK, KiviServer, create_app, uvicorn_config  # noqa: E402
from kivi_serve.server.settings import ServeSettings  # noqa: E402

TESTS = Path(__file__).resolve().parent
SLACK_S = 3.0  # on top of a timeout, for a loaded 2-core machine


# ------------------------------------------------------------------------------ a live uvicorn
@contextlib.contextmanager
def live_server(**settings):
    """The app over a FakeEngine, served by our uvicorn configuration in a thread; yields its port."""
    s = ServeSettings(port=free_port(), **settings)
    app = create_app(s, engine=FakeEngine(delay=0.01, max_model_len=256))
    server = KiviServer(uvicorn_config(app, s), app)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield s.port
    finally:
        server.should_exit = True
        thread.join(30)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when that was (seconds from
    now); fails if it is still open after ``limit_s``."""
    t0 = time.monotonic()
    sock.settimeout(limit_s)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return data, time.monotonic() - t0
        data += chunk


def dribble(
    sock: socket.socket, data: bytes, every_s: float = 0.2, limit_s: float = 20.0
) -> tuple[bytes, float]:
    """Send ``data`` one byte every ``every_s`` until the server answers or closes; returns what it
    sent back and when it did (seconds from the first byte)."""
    t0 = time.monotonic()
    for i in range(len(data)):
        if select.select([sock], [], [], 0 if i == 0 else every_s)[0] or time.monotonic() - t0 > limit_s:
            break  # the server answered (or closed): stop writing, so nothing resets what it sent
        try:
            sock.sendall(data[i : i + 1])
        except OSError:
            break
    answer, _ = read_until_closed(sock, SLACK_S)
    return answer, time.monotonic() - t0


def response_parts(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def assert_openai_error(raw: bytes, status: int, code: str) -> dict:
    got, headers, body = response_parts(raw)
    assert got == status and headers["content-type"] == "application/json", raw[:300]
    err = json.loads(body)["error"]
    assert err["code"] == code and set(err) == {"message", "type", "param", "code"}, err
    return headers


def test_idle_and_slow_connections_are_closed_within_the_timeouts():
    header_t, body_t, idle_t = 1.0, 1.5, 0.5
    with live_server(header_timeout=header_t, body_timeout=body_t, keep_alive_timeout=idle_t) as port:
        # a connection that never sends a byte: closed quietly at the header timeout
        with connect(port) as sock:
            data, closed = read_until_closed(sock, header_t + SLACK_S)
        assert data == b"" and closed >= header_t * 0.8, closed

        # slowloris: one header byte every 0.2 s never completes its headers in time -> 408
        with connect(port) as sock:
            data, closed = dribble(sock, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000)
        assert header_t * 0.8 <= closed <= header_t + SLACK_S, closed
        assert_openai_error(data, 408, "header_timeout")

        # a body dribbled a byte every 0.2 s: 408 at the body timeout, connection closed
        body = json.dumps({"prompt": "x" * 200}).encode()
        with connect(port) as sock:
            head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
            sock.sendall(head.encode())
            data, closed = dribble(sock, body)
        assert body_t * 0.8 <= closed <= body_t + SLACK_S, closed
        assert_openai_error(data, 408, "body_timeout")

        # keep-alive: served, then closed after idling for the keep-alive timeout
        with connect(port) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            data, closed = read_until_closed(sock, idle_t + SLACK_S)
        assert response_parts(data)[0] == 200 and closed >= idle_t * 0.8, closed


def test_connections_beyond_the_limit_get_503_and_bad_http_gets_a_json_400():
    with live_server(max_connections=3) as port:
        held = [connect(port) for _ in range(3)]
        try:
            with connect(port) as extra:
                extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                data, _ = read_until_closed(extra, SLACK_S)
            headers = assert_openai_error(data, 503, "too_many_connections")
            assert headers["retry-after"] == "1"
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.3)
        with connect(port) as sock:  # below the limit again: served
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert response_parts(read_until_closed(sock, SLACK_S)[0])[0] == 200
        with connect(port) as sock:  # what httptools cannot parse: uvicorn's own 400, in our shape
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}")
            data, _ = read_until_closed(sock, SLACK_S)
        assert_openai_error(data, 400, "invalid_http_request")


# ---------------------------------------------------------------------------------------- drain
def fake_server(*flags: str) -> ServerProcess:
    """The real server process over FakeEngine (0.05 s per token), ready."""
    server = ServerProcess(
        list(flags),
        module="support.fake_server",
        env={"PYTHONPATH": f"{TESTS}:{TESTS.parent}"},
        clean_env=True,
    ).start()
    server.wait_ready(120)
    return server


async def stream(client: httpx.AsyncClient, url: str, max_tokens: int, first: asyncio.Event) -> dict:
    events, done = [], False
    body = {"prompt": "hi", "max_tokens": max_tokens, "stream": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        status = resp.status_code
        async for line in resp.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                events.append(json.loads(line[6:]))
                first.set()
    return {"status": status, "events": events, "done": done}


async def drain_scenario(server: ServerProcess, max_tokens: int) -> dict:
    """Three streams and one plain request run; SIGTERM; what /ready and a new request get during the
    drain, what each running request got in the end, and how long the process took to exit."""
    async with httpx.AsyncClient(timeout=120) as client:
        firsts = [asyncio.Event() for _ in range(3)]
        streams = [asyncio.ensure_future(stream(client, server.url, max_tokens, f)) for f in firsts]
        plain = asyncio.ensure_future(
            client.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": max_tokens})
        )
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 60)
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        ready = await client.get(server.url + "/ready")
        refused = await client.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        results = await asyncio.gather(*streams)
        plain_resp = await plain
        t_end = time.monotonic()
    code = await asyncio.to_thread(server.proc.wait, 60)
    return {
        "ready": ready,
        "refused": refused,
        "streams": results,
        "plain": plain_resp,
        "code": code,
        "exit_after_s": time.monotonic() - t_end,
    }


def assert_drain_answers(out: dict) -> None:
    ready, refused = out["ready"], out["refused"]
    assert ready.status_code == 503 and ready.json()["status"] == "draining", ready.text
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5", refused.text
    assert refused.json()["error"]["code"] == "shutting_down"


def assert_clean_log(log: str) -> None:
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    assert " ERROR " not in log and '"level": "error"' not in log, log[-3000:]


def test_sigterm_drain_lets_streams_finish_then_exits_0():
    server = fake_server("--drain-timeout", "60")
    try:
        out = asyncio.run(drain_scenario(server, max_tokens=40))  # ~2 s per request
    finally:
        server.stop(signal.SIGKILL)
    assert_drain_answers(out)
    for s in out["streams"]:
        assert s["status"] == 200 and s["done"], s
        texts = [c["text"] for e in s["events"] for c in e["choices"]]
        assert "".join(texts) == "a" * 40 and s["events"][-1]["choices"][0]["finish_reason"] == "length"
    assert out["plain"].status_code == 200 and out["plain"].json()["usage"]["completion_tokens"] == 40
    assert out["code"] == EXIT_OK and out["exit_after_s"] < 15, out
    log = server.log(400)
    assert "received SIGTERM: draining in-flight requests" in log and "drain timeout" not in log
    assert_clean_log(log)


def test_sigterm_drain_cuts_streams_at_the_deadline_with_an_error_event():
    server = fake_server("--drain-timeout", "1")
    try:
        t0 = time.monotonic()
        out = asyncio.run(drain_scenario(server, max_tokens=2000))  # ~100 s per request: cut
        elapsed = time.monotonic() - t0
    finally:
        server.stop(signal.SIGKILL)
    assert_drain_answers(out)
    for s in out["streams"]:
        assert s["status"] == 200 and s["done"], s  # ... data: {"error": ...}, data: [DONE]
        *chunks, last = s["events"]
        assert chunks and all("choices" in c for c in chunks)
        assert (
            last["error"]["code"] == "shutting_down" and last["error"]["type"] == "service_unavailable_error"
        )
    plain = out["plain"]
    assert plain.status_code == 503 and plain.json()["error"]["code"] == "shutting_down", plain.text
    assert out["code"] == EXIT_DRAIN_CUT, out
    assert elapsed < 60, elapsed
    log = server.log(400)
    assert len([line for line in log.splitlines() if "drain timeout" in line]) == 1, log
    assert_clean_log(log)
