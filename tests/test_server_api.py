"""The OpenAI-compatible server, end to end: a real uvicorn server on 127.0.0.1 in a subprocess, a real
vLLM engine (our backend when it exists), the embedded SmolLM2, and the official ``openai`` client.

Covers the API surface (completions, chat, streaming, n, stop, seed, logprobs, usage), the context
length with the real tokenizer, backpressure (429), disconnects, metrics and the access log. The
server is shared with the other test_server_* modules (tests/server_harness.py); every other error
case is tested over a fake engine in test_server_units.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from server_harness import (
    API_KEY,
    MAX_MODEL_LEN,
    MAX_N,
    MAX_NUM_SEQS,
    MAX_QUEUE,
    MAX_TOKENS_LIMIT,
    metric_samples,
    parse_metrics,
    server_backend,
    shared_server,
    wait_idle,
)
from test_deploy import missing_from

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

AUTH = {"Authorization": f"Bearer {API_KEY}"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
#: Every series the Grafana dashboard and the issue name (the metric contract).
CONTRACT = (
    'kivi_kv_cache_bytes{state="total"}',
    'kivi_kv_cache_bytes{state="used"}',
    'kivi_kv_cache_bytes{state="free"}',
    "kivi_kv_capacity_tokens",
    "kivi_kv_bits_per_element",
    "kivi_kv_compression_ratio",
    "kivi_staging_slots_in_use",
    "kivi_staging_slots_total",
    "kivi_early_finalisations_total",
    "kivi_request_ttft_seconds_count",
    "kivi_request_tpot_seconds_count",
    "kivi_request_e2e_seconds_count",
    "kivi_requests_running",
    "kivi_requests_waiting",
)


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from kivi_serve.model.prepare import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2"))


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def complete(client, model):
    """``complete(prompt, **kw)``: a completion that ignores EOS (token counts are exact)."""
    return lambda prompt, **kw: client.completions.create(
        model=model, prompt=prompt, extra_body={"ignore_eos": True}, **kw
    )


@pytest.fixture(scope="module")
def chat(client, model):
    """``chat(**kw)``: a chat completion of :data:`QUESTION`."""
    return lambda **kw: client.chat.completions.create(model=model, messages=QUESTION, **kw)


STREAM_USAGE = dict(stream=True, stream_options={"include_usage": True})


def chat_prompt_tokens(tokenizer, messages) -> int:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer.encode(text, add_special_tokens=False))


def error_of(status_body: tuple) -> dict:
    status, _, body = status_body
    data = json.loads(body)
    assert set(data) == {"error"}, data
    assert set(data["error"]) == {"message", "type", "param", "code"}, data
    return data["error"]


# ------------------------------------------------------------------------------------- ops endpoints
def test_ready_answered_503_while_loading_then_200(server):
    statuses = server.ready_statuses
    assert statuses and statuses[-1] == 200
    assert 503 in statuses, f"/ready never answered 503 while the engine loaded: {statuses[:10]}"


def test_health_version_and_models(server, client):
    status, _, body = server.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = server.get("/version")
    assert status == 200 and json.loads(body) == {
        "version": json.loads(body)["version"],
        "vllm_version": "0.32.0",
        "engine": None,  # engine details only with the key
    }
    status, _, body = server.get("/version", headers=AUTH)
    info = json.loads(body)
    assert status == 200 and info["vllm_version"] == "0.32.0"
    assert info["engine"]["backend"] == server_backend() and "model_path" not in info["engine"]
    assert info["engine"]["max_model_len"] == MAX_MODEL_LEN
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2"]
    assert client.models.retrieve("smollm2").id == "smollm2"
    assert server.get("/openapi.json")[0] == server.get("/docs")[0] == 401  # they follow the key
    status, _, body = server.get("/openapi.json", headers=AUTH)
    assert status == 200 and "/v1/chat/completions" in json.loads(body)["paths"]
    status, _, body = server.get("/docs", headers=AUTH)
    assert status == 200 and b"swagger" in body.lower()


def test_serves_through_our_backend(server):
    if server_backend() != "kivi":
        pytest.skip("KIVI_TEST_BACKEND selects vLLM's default backend for this run")
    engine = json.loads(server.get("/version", headers=AUTH)[2])["engine"]
    assert engine["attention_impl"].startswith("kivi_serve.backend."), engine
    assert engine["kv_cache_dtype"] == "torch.uint8", engine
    assert engine["scheme"] == "kivi-serve-2bit" and engine["page_size"] == 128, engine  # the defaults
    m = server.metrics()
    info = [k for k in m if k.startswith("kivi_backend_info{")]
    assert info and 'backend="kivi"' in info[0] and 'kv_cache_dtype="torch.uint8"' in info[0], info
    # The compression ratio is bf16 bytes / our bytes at the engine's real capacity, never a constant.
    bf16_per_token = 2 * 30 * 3 * 64 * 2  # SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64
    total = m['kivi_kv_cache_bytes{state="total"}']
    capacity = m["kivi_kv_capacity_tokens"]
    assert m["kivi_kv_compression_ratio"] == pytest.approx(bf16_per_token * capacity / total, rel=1e-6)
    assert m["kivi_kv_compression_ratio"] > 3.0
    assert m["kivi_kv_bits_per_element"] == pytest.approx(16.0 / m["kivi_kv_compression_ratio"], rel=1e-6)
    assert m["kivi_staging_slots_total"] > 0


# ----------------------------------------------------------------------------------- the OpenAI API
def test_completion_greedy_usage_matches_tokenizer(tokenizer, complete):
    prompt = "The capital of France is"
    r = complete(prompt, max_tokens=6, temperature=0, logprobs=0)
    choice = r.choices[0]
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert "Paris" in choice.text
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert r.usage.completion_tokens == 6 == len(choice.logprobs.tokens)
    assert "".join(choice.logprobs.tokens) == choice.text
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_greedy_uses_the_chat_template(tokenizer, chat):
    r = chat(max_tokens=16, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    assert r.usage.prompt_tokens == chat_prompt_tokens(tokenizer, QUESTION)
    assert r.usage.completion_tokens >= len(
        tokenizer.encode(choice.message.content, add_special_tokens=False)
    )


def test_streaming_completion_equals_the_non_streamed_one(complete):
    whole = complete("Once upon a time", max_tokens=8, temperature=0)
    chunks = list(complete("Once upon a time", max_tokens=8, temperature=0, **STREAM_USAGE))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_chat_role_content_and_usage(tokenizer, chat):
    chunks = list(chat(max_tokens=16, temperature=0, **STREAM_USAGE))
    deltas = [c.choices[0] for c in chunks if c.choices]
    assert deltas[0].delta.role == "assistant"
    assert "Paris" in "".join(d.delta.content or "" for d in deltas)
    assert deltas[-1].finish_reason == "stop"
    usage = chunks[-1].usage
    assert usage.prompt_tokens == chat_prompt_tokens(tokenizer, QUESTION) and usage.completion_tokens > 0


def test_streaming_without_include_usage_ends_with_done(server, model):
    body = {"model": model, "prompt": "Hello", "max_tokens": 3, "stream": True}
    status, headers, raw = server.post("/v1/completions", body, headers=AUTH)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])


def test_n2_completion_and_streamed_chat(complete, chat):
    r = complete("My favourite colour is", n=2, max_tokens=4, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 8
    chunks = list(chat(n=2, max_tokens=4, seed=3, **STREAM_USAGE))
    finished = {
        c.choices[0].index: c.choices[0].finish_reason
        for c in chunks
        if c.choices and c.choices[0].finish_reason
    }
    assert set(finished) == {0, 1}
    assert chunks[-1].usage.completion_tokens <= 8


def test_stop_sequence(chat):
    r = chat(max_tokens=16, temperature=0, stop=["Paris"])
    assert "Paris" not in r.choices[0].message.content
    assert r.choices[0].message.content.startswith("The capital of France is")
    assert r.choices[0].finish_reason == "stop"


def test_seed_gives_identical_text(complete):
    first, second = (complete("Write a word:", max_tokens=8, temperature=1.0, seed=1234) for _ in range(2))
    assert first.choices[0].text == second.choices[0].text


def test_logprobs_shapes(complete, chat):
    r = complete("The capital of France is", max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(
        max(top.values()) == pytest.approx(x, abs=1e-4) for top, x in zip(lp.top_logprobs, lp.token_logprobs)
    )
    c = chat(max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == c.choices[0].message.content


# ----------------------------------------------------------------------------------------- errors
# (every other validation error is tested over a fake engine in test_server_units.py)
def test_over_long_prompt_is_400_with_the_context_length_message(server, client, model):
    result = server.post(
        "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * 3000}]}, headers=AUTH
    )
    assert result[0] == 400
    err = error_of(result)
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert re.search(
        rf"maximum context length is {MAX_MODEL_LEN} tokens\. However, your messages resulted in "
        r"\d+ tokens",
        err["message"],
    ), err["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt="hello " * 3000, max_tokens=1)
    assert info.value.status_code == 400 and "maximum context length" in str(info.value)


# ----------------------------------------------------------------------- backpressure, disconnects
async def _hold_streams(url: str, count: int, n: int) -> tuple[list, list]:
    """Open ``count`` long streaming requests (n choices each); returns (responses, clients)."""
    held, clients = [], []
    for _ in range(count):
        c = httpx.AsyncClient(timeout=120)
        req = c.build_request(
            "POST",
            url + "/v1/completions",
            headers=AUTH,
            json={
                "prompt": "Count:",
                "max_tokens": MAX_TOKENS_LIMIT,
                "n": n,
                "ignore_eos": True,
                "stream": True,
            },
        )
        resp = await c.send(req, stream=True)
        assert resp.status_code == 200
        held.append(resp)
        clients.append(c)
    return held, clients


def test_queue_full_is_429_with_retry_after(server):
    capacity = MAX_NUM_SEQS + MAX_QUEUE
    per_request = MAX_N
    assert capacity % per_request == 0

    async def scenario():
        held, clients = await _hold_streams(server.url, capacity // per_request, per_request)
        try:
            async with httpx.AsyncClient(timeout=60) as c:
                r = await c.post(
                    server.url + "/v1/completions", headers=AUTH, json={"prompt": "hi", "max_tokens": 1}
                )
            return r.status_code, dict(r.headers), r.json()
        finally:
            for resp, c in zip(held, clients):
                await resp.aclose()
                await c.aclose()

    status, headers, body = asyncio.run(scenario())
    assert status == 429, body
    assert headers.get("retry-after") == "1"
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "queue_full"
    wait_idle(server)


def test_client_disconnect_aborts_a_non_streamed_request(server):
    body = json.dumps({"prompt": "Count:", "max_tokens": MAX_TOKENS_LIMIT, "ignore_eos": True}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nX-Request-Id: disconnect-test-1\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + body)
        deadline = time.monotonic() + 120
        while server.metrics().get("kivi_requests_running", 0) < 1:  # it reached the engine
            assert time.monotonic() < deadline, "the request never started running"
            time.sleep(0.2)
    wait_idle(server, timeout=120)
    elapsed = time.monotonic() - t0
    deadline = time.monotonic() + 10
    while '"request_id": "disconnect-test-1"' not in server.log(400):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    line = next(x for x in server.log(400).splitlines() if '"request_id": "disconnect-test-1"' in x)
    assert json.loads(line)["outcome"] == "disconnect", line
    assert elapsed < 120


# --------------------------------------------------------------------------------- metrics and logs
def test_metrics_expose_the_contract_the_dashboard_and_vllm_series(server, complete):
    complete("Hi", max_tokens=2)
    assert server.post("/v1/completions", {"prompt": "hi", "n": 0}, headers=AUTH)[0] == 400
    status, headers, body = server.get("/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    missing = missing_from(metric_samples(body.decode()))
    assert not missing, "dashboard queries metrics the server does not export:\n" + "\n".join(missing)
    m = parse_metrics(body.decode())
    missing = [name for name in CONTRACT if name not in m]
    assert not missing, missing
    assert m['kivi_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert m['kivi_requests_total{route="/v1/completions",status="400"}'] >= 1
    assert m["kivi_request_ttft_seconds_count"] >= 1 and m["kivi_request_e2e_seconds_count"] >= 1
    kv = [m[f'kivi_kv_cache_bytes{{state="{s}"}}'] for s in ("total", "used", "free")]
    assert kv[0] == kv[1] + kv[2] and kv[0] > 0
    vllm = [k for k in m if k.startswith("vllm:")]
    assert any(k.startswith("vllm:num_requests_running") for k in vllm)
    assert any(k.startswith("vllm:kv_cache_usage_perc") for k in vllm)
    assert any(k.startswith("vllm:generation_tokens_total") for k in vllm)


def test_access_log_line_carries_the_request_id(server, model):
    status, headers, _ = server.post(
        "/v1/completions",
        {"model": model, "prompt": "Hi", "max_tokens": 1},
        headers={**AUTH, "X-Request-Id": "trace-me-42"},
    )
    assert status == 200
    assert {k.lower(): v for k, v in headers.items()}["x-request-id"] == "trace-me-42"
    deadline = time.monotonic() + 10
    while '"request_id": "trace-me-42"' not in server.log(400):
        assert time.monotonic() < deadline, server.log(40)
        time.sleep(0.2)
    line = next(x for x in server.log(400).splitlines() if '"request_id": "trace-me-42"' in x)
    record = json.loads(line)
    assert record["status"] == 200 and record["path"] == "/v1/completions" and record["outcome"] == "ok"
    assert record["prompt_tokens"] >= 1 and record["completion_tokens"] == 1
    # a generated id when the client sends none
    status, headers, _ = server.get("/health")
    assert re.fullmatch(r"[0-9a-f]{32}", {k.lower(): v for k, v in headers.items()}["x-request-id"])


# ------------------------------------------------------------------------- the README's "Use it" examples
README = Path(__file__).resolve().parents[1] / "README.md"
README_KEY = 'api_key="unused"'  # what the README's Python example passes (`make serve` sets no key)


def readme_use_it_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block in README.md's "## Use it" section, in order."""
    text = README.read_text()
    assert "\n## Use it\n" in text, "README.md lost its '## Use it' section"
    section = text.split("\n## Use it\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```(\w+)\n(.*?)^```", section, re.S | re.M)


def test_readme_use_it_examples_run_as_written(server, model, tmp_path):
    """Every example in the README's "Use it" section, run against this real server.

    The examples are written for `make serve` defaults (127.0.0.1:8000, no API key); only the
    address and the key differ here: the URL is rewritten to this server's port, and curl / the
    Python client get the shared server's key. Anything else in the examples runs verbatim.
    """
    from kivi_serve.server.settings import ServeSettings

    defaults = ServeSettings.model_fields
    default_addr = f"{defaults['host'].default}:{defaults['port'].default}"
    assert default_addr == "127.0.0.1:8000"
    here = server.url.removeprefix("http://")
    blocks = readme_use_it_blocks()
    assert [lang for lang, _ in blocks] == ["bash", "python", "bash", "yaml"], blocks
    for lang, code in blocks:
        assert default_addr in code, (lang, code)
        # every model name an example passes is the one the server reports in /v1/models
        names = re.findall(r'"model": "([^"]+)"|model="([^"]+)"', code)
        assert all(model in pair for pair in names), (names, model)
    assert model == "smollm2"

    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")

    def bash(code: str) -> str:
        script = f'curl() {{ command curl -H "Authorization: Bearer {API_KEY}" "$@"; }}\n'
        script += code.replace(default_addr, here)
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, (code, done.stdout[-2000:], done.stderr[-2000:])
        return done.stdout

    # 1. curl: chat completion
    _, chat_code = blocks[0]
    assert "/v1/chat/completions" in chat_code
    reply = json.loads(bash(chat_code))
    assert reply["object"] == "chat.completion" and reply["model"] == model, reply
    assert reply["choices"] and reply["choices"][0]["message"]["content"].strip(), reply
    assert reply["usage"]["completion_tokens"] >= 1, reply

    # 2. the openai client, plain then streamed
    _, py_code = blocks[1]
    assert README_KEY in py_code and "stream=True" in py_code
    script = tmp_path / "readme_example.py"
    script.write_text(py_code.replace(default_addr, here).replace(README_KEY, f'api_key="{API_KEY}"'))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    assert done.stdout.strip(), "the openai example printed no text"
    assert len([line for line in done.stdout.splitlines() if line.strip()]) >= 2, done.stdout

    # 3. the metrics one-liner
    _, metrics_code = blocks[2]
    assert "/metrics" in metrics_code
    m = parse_metrics(bash(metrics_code))
    assert m, "the metrics example printed nothing"
    assert all(key.startswith("kivi_") for key in m), list(m)
    assert m["kivi_kv_compression_ratio"] > 1.0, m

    # 4. the Prometheus scrape config: valid, and its target answers with the kivi_* series
    import yaml

    _, yaml_code = blocks[3]
    jobs = {job["job_name"]: job for job in yaml.safe_load(yaml_code)["scrape_configs"]}
    job = jobs["kivi-serve"]
    deploy_cfg = yaml.safe_load((README.parent / "deploy" / "prometheus.yml").read_text())
    deployed = {j["job_name"]: j for j in deploy_cfg["scrape_configs"]}
    assert job["metrics_path"] == deployed["kivi-serve"]["metrics_path"] == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    assert target == default_addr
    status, _, body = server.get(job["metrics_path"])  # the same path on this server's port
    assert status == 200 and "kivi_kv_compression_ratio" in parse_metrics(body.decode())
