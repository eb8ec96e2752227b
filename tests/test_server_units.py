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

from kivi_serve.engine.types import CacheFacts, CompletionDelta, SamplingOptions, StepOutput, TokenLogprob  # noqa: E402
from kivi_serve.server.app import create_app, run_cli  # noqa: E402
from kivi_serve.server.settings import ServeSettings, SettingsError, build_parser, load_settings  # noqa: E402

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


# ------------------------------------------------------------------------------ a stand-in engine
class FakeEngine:
    """Generates one "a" per step after ``delay`` seconds; enough engine for the HTTP layer."""

    def __init__(self, delay: float = 0.0, state: str = "ready"):
        self.delay = delay
        self.state = state
        self.error = None
        self.model_name = "fake"
        self.model_path = None
        self.max_model_len = 64
        self.max_num_seqs = 2
        self.vocab_size = 1000
        self.vllm_version = "0"
        self.generated = 0
        self.aborted = 0

    ready = property(lambda self: self.state == "ready")
    healthy = property(lambda self: self.state == "ready")

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 1000 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def render_chat(self, messages):
        text = "".join(m["content"] for m in messages)
        return text, self.encode(text)

    def sampling_params(self, opts: SamplingOptions):
        return opts

    async def generate(self, ids, opts: SamplingOptions, request_id: str):
        finished = False
        try:
            for i in range(opts.max_tokens):
                await asyncio.sleep(self.delay)
                last = i == opts.max_tokens - 1
                lps = [TokenLogprob(97, "a", -0.5, [(97, "a", -0.5)])] if opts.logprobs is not None else None
                deltas = [
                    CompletionDelta(k, "a", [97], lps, "length" if last else None) for k in range(opts.n)
                ]
                self.generated += opts.n
                finished = last
                yield StepOutput(request_id, len(ids), deltas, last)
        finally:
            if not finished:
                self.aborted += 1

    def describe(self):
        return {"model": "fake", "state": self.state}

    async def cache_facts(self):
        return CacheFacts(
            backend="kivi",
            attention_impl="fake.Impl",
            kv_cache_dtype="torch.uint8",
            page_size=128,
            num_blocks=10,
            capacity_tokens=1280,
            page_bytes=5376,
            block_bytes=100,
            pages_bytes_total=1000,
            staging_bytes=200,
            kv_bytes_total=1200,
            kv_bytes_used=300,
            kv_bytes_free=900,
            kv_usage=0.25,
            bf16_bytes_per_token=23040,
            bits_per_element=2.5,
            page_bits_per_element=2.4,
            compression_vs_bf16=6.4,
            staging_slots_total=4,
            staging_slots_in_use=1,
            early_finalisations=3,
            reopened=1,
            reclaimed=2,
            running=1,
            waiting=0,
            preemptions=0,
            stats_age_s=0.1,
        )

    def vllm_metrics_registry(self):
        return None

    async def shutdown(self):
        self.state = "stopped"


def make_client(engine: FakeEngine, **settings) -> httpx.AsyncClient:
    app = create_app(ServeSettings(**settings), engine=engine)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def run(coro):
    return asyncio.run(coro)


def test_request_timeout_is_504_and_aborts():
    engine = FakeEngine(delay=0.2)

    async def go():
        async with make_client(engine, request_timeout=0.5) as c:
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
        async with make_client(engine) as c:
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
        async with make_client(engine, max_queue=1) as c:  # capacity: 2 running + 1 queued = 3 sequences
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
        async with make_client(engine) as c:
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
        async with make_client(engine) as c:
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
        async with make_client(engine, api_key="k", max_body_bytes=2048) as c:
            return (
                await c.post("/v1/completions", json={"prompt": "x"}),
                await c.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer k"}),
                await c.post(
                    "/v1/completions", json={"prompt": "x" * 5000}, headers={"Authorization": "Bearer k"}
                ),
                await c.get("/openapi.json"),
            )

    missing, ok, big, schema = run(go())
    assert missing.status_code == 401 and ok.status_code == 200 and big.status_code == 413
    spec = schema.json()
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert all("422" not in op["responses"] for ops in spec["paths"].values() for op in ops.values())
