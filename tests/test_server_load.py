"""Load, bounded: 64 concurrent streaming chat requests, a quarter of the clients disconnect mid-stream.

Every stream that finishes is complete (role chunk, content, finish_reason, usage, ``[DONE]``) and
correct (greedy text equals the same request served alone); the disconnected ones are aborted (access
log outcome ``disconnect``); afterwards nothing runs or waits, vLLM's KV usage is back to its
baseline and the staging pool is within its size and still serves.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from server_harness import API_KEY, MAX_NUM_SEQS, MAX_QUEUE, shared_server, wait_idle

httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

CLIENTS = 64
DISCONNECTING = CLIENTS // 4
MAX_TOKENS = 12
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}
LOAD_TIMEOUT_S = 600.0
#: Idle means nothing in use: no staging slot, no KV byte, within this long of the last request.
IDLE_WITHIN_S = 10.0


def body(stream: bool) -> dict:
    return {
        "messages": QUESTION,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }


async def one_stream(client: httpx.AsyncClient, url: str, rid: str, disconnect: bool) -> dict:
    """One streaming request; returns what arrived. ``disconnect``: hang up after the first content."""
    events: list[dict] = []
    done = False
    async with client.stream(
        "POST", url + "/v1/chat/completions", json=body(True), headers={**AUTH, "X-Request-Id": rid}
    ) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            if line == "data: [DONE]":
                done = True
                break
            events.append(json.loads(line[6:]))
            if disconnect and any(c["delta"].get("content") for e in events for c in e["choices"]):
                break  # leaving the block closes the connection mid-stream
    return {"rid": rid, "events": events, "done": done, "disconnected": disconnect}


def test_64_streams_with_a_quarter_disconnecting():
    server = shared_server()
    assert CLIENTS <= MAX_NUM_SEQS + MAX_QUEUE  # all admitted: this is not the 429 test
    reference = json.loads(server.post("/v1/chat/completions", body(False), headers=AUTH)[2])
    ref_text = reference["choices"][0]["message"]["content"]
    ref_usage = reference["usage"]
    baseline = wait_idle(server)

    async def load() -> list[dict]:
        limits = httpx.Limits(max_connections=CLIENTS + 4, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=LOAD_TIMEOUT_S, limits=limits) as client:
            jobs = [one_stream(client, server.url, f"load-{i}", i % 4 == 0) for i in range(CLIENTS)]
            return await asyncio.wait_for(asyncio.gather(*jobs), LOAD_TIMEOUT_S)

    t0 = time.monotonic()
    results = asyncio.run(load())
    elapsed = time.monotonic() - t0

    finished = [r for r in results if not r["disconnected"]]
    assert len(finished) == CLIENTS - DISCONNECTING
    for r in finished:
        events = r["events"]
        assert r["done"], r["rid"]
        choices = [c for e in events for c in e["choices"]]
        assert choices[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"].get("content") or "" for c in choices) == ref_text, r["rid"]
        assert choices[-1]["finish_reason"] in ("stop", "length")
        assert events[-1]["choices"] == [] and events[-1]["usage"] == ref_usage, r["rid"]

    after = wait_idle(server, timeout=120)
    assert after["kivi_kv_usage_ratio"] == baseline["kivi_kv_usage_ratio"]
    vllm_running = [v for k, v in after.items() if k.startswith("vllm:num_requests_running")]
    assert vllm_running and all(v == 0 for v in vllm_running)
    # The staging pool never holds more than its slots (that they return to idle is the next test's). It
    # still serves, correctly:
    assert after["kivi_staging_slots_in_use"] <= after["kivi_staging_slots_total"]
    again = json.loads(server.post("/v1/chat/completions", body(False), headers=AUTH)[2])
    assert again["choices"][0]["message"]["content"] == ref_text
    wait_idle(server, timeout=120)

    # the disconnected clients' requests were aborted, the others finished (access log)
    outcomes = {}
    deadline = time.monotonic() + 15
    while len(outcomes) < CLIENTS and time.monotonic() < deadline:
        for line in server.log(4000).splitlines():
            if '"request_id": "load-' in line:
                rec = json.loads(line)
                outcomes[rec["request_id"]] = rec.get("outcome")
        time.sleep(0.2)
    disconnected = {f"load-{i}" for i in range(0, CLIENTS, 4)}
    assert {k for k, v in outcomes.items() if v == "disconnect"} == disconnected, outcomes
    assert all(v == "ok" for k, v in outcomes.items() if k not in disconnected), outcomes
    assert elapsed < LOAD_TIMEOUT_S


def test_kv_used_and_staging_return_to_idle_after_a_load_with_disconnects():
    """After streams of which a quarter disconnect, nothing is in use within a few seconds: the
    metrics follow what the backend reports, and it has released the finished requests' slots."""
    server = shared_server()
    wait_idle(server)
    clients = 16

    async def load() -> list[dict]:
        limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=LOAD_TIMEOUT_S, limits=limits) as client:
            jobs = [one_stream(client, server.url, f"idle-{i}", i % 4 == 0) for i in range(clients)]
            return await asyncio.wait_for(asyncio.gather(*jobs), LOAD_TIMEOUT_S)

    results = asyncio.run(load())
    assert all(r["done"] for r in results if not r["disconnected"])
    m = wait_idle(server, timeout=120)
    deadline = time.monotonic() + IDLE_WITHIN_S
    while m["kivi_staging_slots_in_use"] or m['kivi_kv_cache_bytes{state="used"}']:
        assert time.monotonic() < deadline, {
            k: v for k, v in m.items() if "staging" in k or "cache_bytes" in k
        }
        time.sleep(0.5)
        m = server.metrics()
    assert m['kivi_kv_cache_bytes{state="free"}'] == m['kivi_kv_cache_bytes{state="total"}'] > 0
