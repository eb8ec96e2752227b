"""SIGTERM during a stream on the real engine: the server keeps listening but refuses new work (/ready 503
``draining``, /v1 503 with Retry-After), the stream completes, exit code 0. (Both drain outcomes,
finished and cut at the deadline, are tested over a stand-in engine in test_server_connections.py.)

Uses (and ends) the shared server; a module that runs after this one gets a fresh one.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
from server_harness import API_KEY, MAX_TOKENS_LIMIT, take_shared_server

httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

MAX_TOKENS = 24
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def hold_a_stream(url: str, release: threading.Event, started: threading.Event) -> None:
    """A long stream that keeps the drain open (however fast the engine) until ``release``; then the
    client hangs up, which aborts it (a disconnect, not a cut)."""
    body = {"prompt": "Count:", "max_tokens": MAX_TOKENS_LIMIT, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=600) as client, client.stream("POST", url, headers=AUTH, json=body) as resp:
        for _ in resp.iter_lines():
            started.set()
            if release.is_set():
                return


def test_sigterm_drains_the_stream_and_exits_0():
    server = take_shared_server()
    events: list[dict] = []
    done = threading.Event()
    first_content = threading.Event()
    result: dict = {}

    def stream() -> None:
        try:
            with httpx.Client(timeout=600) as client:
                with client.stream(
                    "POST",
                    server.url + "/v1/completions",
                    headers=AUTH,
                    json={
                        "prompt": "Once upon a time",
                        "max_tokens": MAX_TOKENS,
                        "ignore_eos": True,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    },
                ) as resp:
                    result["status"] = resp.status_code
                    for line in resp.iter_lines():
                        if line == "data: [DONE]":
                            result["done"] = True
                        elif line.startswith("data: "):
                            events.append(json.loads(line[6:]))
                            if events[-1]["choices"] and events[-1]["choices"][0]["text"]:
                                first_content.set()
        except Exception as exc:  # reported by the assertions below
            result["error"] = repr(exc)
        finally:
            first_content.set()
            done.set()

    release, holding = threading.Event(), threading.Event()
    holder = threading.Thread(
        target=hold_a_stream, args=(server.url + "/v1/completions", release, holding), daemon=True
    )
    holder.start()
    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    assert holding.wait(300) and first_content.wait(300), "no token within 300 s"
    assert "error" not in result, result
    server.proc.send_signal(signal.SIGTERM)

    # Still listening while it drains, but refusing new work.
    time.sleep(0.2)
    ready = httpx.get(server.url + "/ready", timeout=30)
    assert ready.status_code == 503 and ready.json()["status"] == "draining", ready.text
    refused = httpx.post(
        server.url + "/v1/completions",
        headers=AUTH,
        json={"prompt": "Hi", "max_tokens": 1},
        timeout=30,
    )
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5", refused.text
    release.set()
    holder.join(120)

    assert done.wait(600), "the stream did not finish"
    assert "error" not in result, result
    assert result.get("status") == 200 and result.get("done"), result
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert events[-1]["usage"]["completion_tokens"] == MAX_TOKENS, events[-1]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert text
    code = server.proc.wait(timeout=120)  # no second signal: that would force the exit
    assert code == 0, server.log(80)
    log = server.log(400)
    assert "draining in-flight requests" in log and "Traceback" not in log
