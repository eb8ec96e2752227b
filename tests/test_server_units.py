"""Fast server tests without vLLM: settings (flags > env > YAML), ``--help``, and the HTTP layer over a
stand-in engine (timeouts, loading, backpressure, SSE framing, metric names). The real-engine tests
are test_server_api / _schema / _load / _sigterm.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

from server_harness import FakeEngine, fake_client  # noqa: E402

from kivi_serve.server.app import run_cli  # noqa: E402
from kivi_serve.server.settings import ServeSettings, SettingsError, build_parser, load_settings  # noqa: E402
from kivi_serve.server.state import ServingEngine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------- settings
def test_flags_beat_env_beat_yaml_beat_defaults(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 9100\nmax-model-len: 512\nmax_n: 3\nbackend: default\n")
    monkeypatch.setenv("KIVI_SERVE_PORT", "9200")
    monkeypatch.setenv("KIVI_SERVE_MAX_N", "5")
    s = load_settings({"port": 9300}, cfg)
    assert s.port == 9300  # flag
    assert s.max_n == 5  # env over YAML
    assert s.max_model_len == 512  # YAML
    assert s.backend == "default"
    assert s.host == "127.0.0.1"  # default
    monkeypatch.setenv("KIVI_SERVE_CONFIG", str(cfg))
    assert load_settings({}).max_model_len == 512  # the config file from the environment


def test_bad_settings_are_readable_errors(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("prot: 1\n")
    with pytest.raises(SettingsError, match="unknown option 'prot'"):
        load_settings({}, cfg)
    with pytest.raises(SettingsError, match="not found"):
        load_settings({}, tmp_path / "missing.yaml")
    monkeypatch.setenv("KIVI_SERVE_PORT", "not-a-port")
    with pytest.raises(SettingsError, match="port"):
        load_settings({})


def test_shipped_configs_are_valid():
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert any(f.name == "cpu-smollm2.yaml" for f in files)
    for f in files:
        s = load_settings({}, f)
        assert isinstance(s, ServeSettings)


def test_help_reads_like_vllm_serve(capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kivi-serve serve")
    for flag in (
        "--model PATH",
        "--host HOST",
        "--port PORT",
        "--api-key KEY",
        "--max-model-len N",
        "--page-size N",
        "--gpu-memory-utilization FRAC",
        "--tensor-parallel-size N",
        "--config FILE",
        "[env: KIVI_SERVE_PORT]",
        "Model and engine:",
        "HTTP server:",
        "Limits:",
    ):
        assert flag in out, flag


def test_bad_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--no-such-flag"])
    assert exc.value.code == 2
    assert run_cli(["--max-n", "0"]) == 2
    assert "max_n" in capsys.readouterr().err
    assert run_cli(["--port", "nope"]) == 2
    assert "port" in capsys.readouterr().err


# ------------------------------------------------------------------------ the app over FakeEngine
def run(coro):
    return asyncio.run(coro)


def test_both_engines_satisfy_the_servers_engine_protocol():
    from kivi_serve.engine import Engine, EngineConfig

    assert isinstance(FakeEngine(), ServingEngine)
    assert isinstance(Engine(EngineConfig()), ServingEngine)  # not started: no vLLM needed


def test_request_timeout_is_504_and_aborts():
    engine = FakeEngine(delay=0.2)

    async def go():
        async with fake_client(engine, request_timeout=0.5) as c:
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 50})
            s = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 50, "stream": True})
            return r, s

    r, s = run(go())
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "request_timeout"
    assert s.status_code == 200
    events = [e for e in s.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["code"] == "request_timeout"
    assert engine.aborted == 2


def test_loading_engine_is_503_on_ready_and_v1():
    engine = FakeEngine(state="loading")

    async def go():
        async with fake_client(engine) as c:
            return (
                await c.get("/ready"),
                await c.get("/health"),
                await c.post("/v1/completions", json={"prompt": "x"}),
            )

    ready, health, comp = run(go())
    assert ready.status_code == 503 and ready.json()["status"] == "loading"
    assert health.status_code == 200
    assert comp.status_code == 503 and comp.json()["error"]["code"] == "model_loading"
    assert comp.headers["retry-after"] == "5"


def test_admission_bound_gives_429_then_recovers():
    engine = FakeEngine(delay=0.05)

    async def go():
        async with fake_client(engine, max_queue=1) as c:  # capacity: 2 running + 1 queued = 3 sequences
            slow = [
                asyncio.create_task(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 20}))
                for _ in range(3)
            ]
            await asyncio.sleep(0.2)
            rejected = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            done = await asyncio.gather(*slow)
            after = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            too_big = await c.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1, "n": 2})
            return rejected, done, after, too_big

    rejected, done, after, too_big = run(go())
    assert rejected.status_code == 429 and rejected.headers["retry-after"] == "1"
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    assert [d.status_code for d in done] == [200, 200, 200]
    assert after.status_code == 200
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "n"


def test_batch_prompts_n_and_sse_framing():
    engine = FakeEngine()

    async def go():
        async with fake_client(engine) as c:
            whole = await c.post(
                "/v1/completions",
                json={"prompt": ["ab", "cd"], "n": 2, "max_tokens": 3, "logprobs": 1, "echo": False},
            )
            stream = await c.post(
                "/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 2,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "logprobs": True,
                    "top_logprobs": 1,
                },
            )
            echo = await c.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2, "echo": True})
            return whole, stream, echo

    whole, stream, echo = run(go())
    body = whole.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == "aaa" and c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16}
    assert body["choices"][0]["logprobs"]["text_offset"] == [0, 1, 2]
    events = [json.loads(e[6:]) for e in stream.text.split("\n\n") if e and e != "data: [DONE]"]
    assert stream.text.endswith("data: [DONE]\n\n")
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[0]["object"] == "chat.completion.chunk" and events[0]["usage"] is None
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2
    assert events[1]["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]["token"] == "a"
    assert echo.json()["choices"][0]["text"] == "abaa"


def test_metrics_names_render_from_engine_facts():
    engine = FakeEngine()

    async def go():
        async with fake_client(engine) as c:
            await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            return (await c.get("/metrics")).text

    text = run(go())
    for name in (
        'kivi_kv_cache_bytes{state="total"} 1200.0',
        'kivi_kv_cache_bytes{state="used"} 300.0',
        'kivi_kv_cache_bytes{state="free"} 900.0',
        "kivi_kv_capacity_tokens 1280.0",
        "kivi_kv_bits_per_element 2.5",
        "kivi_kv_compression_ratio 6.4",
        "kivi_staging_slots_in_use 1.0",
        "kivi_staging_slots_total 4.0",
        "kivi_early_finalisations_total 3.0",
        "kivi_requests_running 1.0",
        "kivi_requests_waiting 0.0",
        "kivi_scheduler_stats_age_seconds 0.1",
        'kivi_requests_total{route="/v1/completions",status="200"} 1.0',
        "kivi_request_ttft_seconds_count 1.0",
        "kivi_request_tpot_seconds_count 1.0",
        "kivi_request_e2e_seconds_count 1.0",
        "kivi_engine_ready 1.0",
    ):
        assert name in text, name


def test_api_key_and_body_limit_middleware():
    engine = FakeEngine()

    async def go():
        async with fake_client(engine, api_key="k", max_body_bytes=2048) as c:
            return (
                await c.post("/v1/completions", json={"prompt": "x"}),
                await c.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer k"}),
                await c.post(
                    "/v1/completions", json={"prompt": "x" * 5000}, headers={"Authorization": "Bearer k"}
                ),
                await c.get("/openapi.json", headers={"Authorization": "Bearer k"}),
            )

    missing, ok, big, schema = run(go())
    assert missing.status_code == 401 and ok.status_code == 200 and big.status_code == 413
    spec = schema.json()
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert all("422" not in op["responses"] for ops in spec["paths"].values() for op in ops.values())


# ------------------------------------------------- request validation: every client mistake is a 4xx
API_KEY = "k"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
#: A server as tests/server_harness.py starts the real one, over a fake engine.
LIMITS = dict(api_key=API_KEY, max_tokens_limit=256, max_n=4, max_body_bytes=65536)
CONTEXT = 1024
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def ask(*requests: tuple[str, str, dict | bytes | None], headers: dict | None = AUTH) -> list:
    """Send (method, path, JSON body or raw bytes) requests to the fake server; the responses."""

    async def go():
        async with fake_client(FakeEngine(max_model_len=CONTEXT), **LIMITS) as c:
            out = []
            for method, path, body in requests:
                raw = {"content": body} if isinstance(body, bytes) else {"json": body}
                hdrs = {"Content-Type": "application/json", **(headers or {})}
                out.append(await c.request(method, path, headers=hdrs, **raw))
            return out

    return run(go())


def error_of(response) -> dict:
    data = response.json()
    assert set(data) == {"error"}, data
    assert set(data["error"]) == {"message", "type", "param", "code"}, data
    if response.status_code < 429:
        assert data["error"]["type"] == "invalid_request_error", data
    return data["error"]


def test_malformed_json_is_400():
    (r,) = ask(("POST", "/v1/completions", b'{"prompt": "hi", '))
    err = error_of(r)
    assert r.status_code == 400 and err["code"] == "invalid_json"
    assert err["message"].startswith("The request body is not valid UTF-8 JSON: ")


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": 5}, "prompt"),
        ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "temperature": 3.5}, "temperature"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "stop": 7}, "stop"),
        ({"prompt": "hi", "logprobs": 99}, "logprobs"),
        ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "hi", "n": 5}, "n"),  # above --max-n
        ({"prompt": [1, 2, 10**6]}, "prompt"),  # not a token id
        ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
        ({"prompt": "hi", "min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"prompt": "hi", "stop": [""]}, "stop"),
        ({"prompt": "hi", "suffix": "x"}, "suffix"),
        ({"prompt": "hi", "best_of": 3}, "best_of"),
        ({"prompt": "hi", "echo": True, "logprobs": 1}, "echo"),
    ],
)
def test_completion_wrong_types_and_ranges_are_400(body, param):
    (r,) = ask(("POST", "/v1/completions", body))
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] == param


def test_chat_validation_errors_are_400():
    cases = (
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"messages": QUESTION, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    )
    for (body, param), r in zip(cases, ask(*(("POST", "/v1/chat/completions", b) for b, _ in cases))):
        assert r.status_code == 400 and error_of(r)["param"] == param, (body, r.text)


def test_unknown_model_is_404_streamed_or_not():
    plain, streamed, card = ask(
        ("POST", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}),
        ("POST", "/v1/chat/completions", {"model": "gpt-9", "messages": QUESTION, "stream": True}),
        ("GET", "/v1/models/gpt-9", None),
    )
    for r in (plain, streamed, card):
        err = error_of(r)
        assert r.status_code == 404 and err["code"] == "model_not_found" and err["param"] == "model"
        assert "gpt-9" in err["message"]


def test_max_tokens_above_the_limit_or_the_context_is_400():
    huge, over, long_prompt, long_chat, empty = ask(
        ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 10**12}),
        ("POST", "/v1/completions", {"prompt": [1] * (CONTEXT - 100), "max_tokens": 200}),
        ("POST", "/v1/completions", {"prompt": "x" * CONTEXT, "max_tokens": 1}),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 2000}]}),
        ("POST", "/v1/completions", {"prompt": ""}),
    )
    assert huge.status_code == 400 and "at most 256" in error_of(huge)["message"]
    err = error_of(over)
    assert over.status_code == 400 and err["param"] == "max_tokens"
    assert err["code"] == "context_length_exceeded"
    assert f"maximum context length is {CONTEXT} tokens" in err["message"]
    assert f"you requested {CONTEXT - 100 + 200} tokens" in err["message"]
    err = error_of(long_prompt)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert f"your prompt resulted in {CONTEXT} tokens" in err["message"]
    err = error_of(long_chat)
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert error_of(empty)["code"] == "empty_prompt"


def test_missing_and_wrong_api_key_are_401_and_ops_endpoints_stay_open():
    missing, health, metrics = ask(
        ("POST", "/v1/completions", {"prompt": "hi"}),
        ("GET", "/health", None),
        ("GET", "/metrics", None),
        headers=None,
    )
    assert missing.status_code == 401 and error_of(missing)["code"] == "missing_api_key"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    (wrong,) = ask(("GET", "/v1/models", None), headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and error_of(wrong)["code"] == "invalid_api_key"
    assert health.status_code == 200 and metrics.status_code == 200


def test_body_limit_413_unknown_path_404_wrong_method_405():
    big, unknown, method = ask(
        ("POST", "/v1/completions", {"prompt": "x" * 100_000}),
        ("GET", "/v1/nope", None),
        ("GET", "/v1/completions", None),
    )
    assert big.status_code == 413 and error_of(big)["code"] == "body_too_large"
    assert unknown.status_code == 404 and error_of(unknown)["code"] == "not_found"
    assert method.status_code == 405 and error_of(method)["code"] == "method_not_allowed"


def test_kv_used_and_staging_slots_are_the_backends_latest_report():
    """The adapter reads the backend's stats on every scrape (no copy that would keep a load's level),
    so /metrics returns to idle as soon as the backend has released its slots."""
    from prometheus_client.parser import text_string_to_metric_families

    from kivi_serve.backend.stats import BackendStats
    from kivi_serve.engine import Engine, EngineConfig
    from kivi_serve.server.metrics import ServerMetrics

    report = {
        "stats": BackendStats(active=True, staging_slots_total=4, staging_slots_in_use=3, staging_bytes=4000)
    }

    class Workers:  # vLLM's AsyncLLM as the adapter uses it: one worker's answer per RPC
        errored = False

        async def collective_rpc(self, method):
            assert method == "kivi_cache_stats"
            return [report["stats"].as_dict()]

    engine = Engine(EngineConfig())
    engine.state, engine._llm, engine.block_size, engine.num_blocks = "ready", Workers(), 128, 10
    engine._layout = [{"num_blocks": 10, "tensor_bytes": 60_000, "page_size_bytes": 6000, "num_kv_heads": 2}]
    engine._model_dims = (2, 2, 64)
    metrics = ServerMetrics()

    def scrape() -> dict:
        run(metrics.refresh(engine))
        text = metrics.render().decode()
        return {
            s.name + str(s.labels): s.value for f in text_string_to_metric_families(text) for s in f.samples
        }

    busy = scrape()
    assert busy["kivi_staging_slots_in_use{}"] == 3
    assert (
        busy["kivi_kv_cache_bytes{'state': 'used'}"] == 3 * 1000
    )  # 3 slots of 4000 / 4 bytes; no blocks held
    report["stats"] = BackendStats(
        active=True, staging_slots_total=4, staging_slots_in_use=0, staging_bytes=4000
    )
    idle = scrape()
    assert idle["kivi_staging_slots_in_use{}"] == 0 and idle["kivi_kv_cache_bytes{'state': 'used'}"] == 0
    assert (
        idle["kivi_kv_cache_bytes{'state': 'free'}"]
        == idle["kivi_kv_cache_bytes{'state': 'total'}"]
        == 64_000
    )
