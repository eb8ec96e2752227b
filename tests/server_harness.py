"""The server under test, two ways: a real one in a subprocess, shared by the test_server_* modules, and
the app in process over :class:`FakeEngine` (no model) for everything HTTP-level.

The shared server (:func:`shared_server`): an engine takes ~30 s (idle machine) to minutes (busy 2
cores) to start, so the modules reuse it; a module that stops it (the SIGTERM test) leaves the
next caller a fresh one. Everything is loopback and bounded.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import os
import signal
import time

import msgspec

from kivi_serve.bench.server_process import (  # noqa: F401 (re-exported for the test modules)
    ServerProcess,
    http,
    metric_samples,
    parse_metrics,
)
from kivi_serve.engine.tokens import encode_text, render_chat
from kivi_serve.engine.types import CacheFacts, CompletionDelta, SamplingOptions, StepOutput, TokenLogprob

#: Engine start on 2 busy cores can take minutes; on an idle CI machine ~30 s.
READY_TIMEOUT_S = float(os.environ.get("KIVI_TEST_READY_TIMEOUT", "420"))
API_KEY = "test-key-1234"
#: The shared server's limits (tests assert against these numbers).
MAX_MODEL_LEN = 1024
MAX_TOKENS_LIMIT = 256
MAX_N = 4
MAX_NUM_SEQS = 32
MAX_QUEUE = 32  # capacity = MAX_NUM_SEQS + MAX_QUEUE = 64 sequences
MAX_BODY_BYTES = 65536


def server_backend() -> str:
    """The backend the shared server runs: ours (KIVI_TEST_BACKEND=default selects vLLM's)."""
    return os.environ.get("KIVI_TEST_BACKEND") or "kivi"


def shared_args() -> list[str]:
    flags = {
        "--backend": server_backend(),
        "--api-key": API_KEY,
        "--max-model-len": MAX_MODEL_LEN,
        "--max-tokens-limit": MAX_TOKENS_LIMIT,
        "--max-n": MAX_N,
        "--max-num-seqs": MAX_NUM_SEQS,
        "--max-queue": MAX_QUEUE,
        "--max-body-bytes": MAX_BODY_BYTES,
        "--kv-cache-space": 1,
        "--request-timeout": 300,
        "--drain-timeout": 120,
    }
    return [str(x) for pair in flags.items() for x in pair]


_SHARED: list[ServerProcess] = []


def shared_server() -> ServerProcess:
    """The server shared by this pytest run (started on first use, restarted if it was stopped)."""
    if _SHARED and _SHARED[0].alive:
        return _SHARED[0]
    _SHARED.clear()
    server = ServerProcess(shared_args(), clean_env=True).start()
    _SHARED.append(server)
    try:
        server.wait_ready(READY_TIMEOUT_S)
    except Exception:
        server.stop(signal.SIGKILL)
        _SHARED.clear()
        raise
    return server


def take_shared_server() -> ServerProcess:
    """The shared server, handed over for good (the caller stops it; the next user starts another)."""
    server = shared_server()
    _SHARED.clear()
    return server


def wait_idle(server: ServerProcess, timeout: float = 180.0) -> dict[str, float]:
    """Poll /metrics until the server has nothing in flight and vLLM runs nothing; the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if all(m.get(f"kivi_requests_{x}") == 0 for x in ("inflight", "running", "waiting")):
            return m
        busy = {k: v for k, v in m.items() if "requests" in k}
        assert time.monotonic() < deadline, f"not idle after {timeout} s: {busy}"
        time.sleep(0.5)


@atexit.register
def _stop_shared() -> None:
    for server in _SHARED:
        server.stop(timeout=60)
    _SHARED.clear()


# ------------------------------------------------------------------------------ a stand-in engine
class FakeEngine:
    """Generates one "a" per step after ``delay`` seconds; enough engine for the HTTP layer.

    Tokens are characters (``ord(c) % 1000``), the chat template concatenates the contents. Where
    the real engine fails on input, so does this one: text that is not valid Unicode cannot be
    tokenized (as with the Rust tokenizer), and sampling options travel to the engine core as
    msgpack (ints within 64 bits) when a request starts.
    """

    def __init__(self, delay: float = 0.0, state: str = "ready", max_model_len: int = 64):
        self.delay = delay
        self.state = state
        self.error = None
        self.model_name = "fake"
        self.max_model_len = max_model_len
        self.max_num_seqs = 2
        self.vocab_size = 1000
        self.vllm_version = "0"
        self.generated = 0
        self.aborted = 0

    ready = property(lambda self: self.state == "ready")
    healthy = property(lambda self: self.state == "ready")

    async def start(self):
        self.state = "ready"

    async def shutdown(self):
        self.state = "stopped"

    def encode(self, text, add_special_tokens=True):
        text.encode("utf-8")  # raises on a lone surrogate, like the tokenizer
        return [ord(c) % 1000 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def render_chat(self, messages):
        text = "".join(m["content"] for m in messages)
        return text, self.encode(text)

    def sampling_params(self, opts: SamplingOptions):
        return opts

    async def generate(self, ids, opts: SamplingOptions, request_id: str):
        msgspec.msgpack.encode(dataclasses.asdict(opts))  # what vLLM sends its engine core
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
                yield StepOutput(request_id, deltas, last)
        finally:
            if not finished:
                self.aborted += 1

    def describe(self):
        return {"model": "fake", "state": self.state}

    async def cache_facts(self) -> CacheFacts:
        return FAKE_FACTS

    def vllm_metrics_registry(self):
        return None


class TokenizingEngine(FakeEngine):
    """:class:`FakeEngine` with the served model's real tokenizer and chat template, through the
    engine's own functions (:mod:`kivi_serve.engine.tokens`): the tokenization path without vLLM."""

    def __init__(self, **kwargs):
        from transformers import AutoTokenizer

        from kivi_serve.model.prepare import resolve_model

        super().__init__(max_model_len=8192, **kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
        self.vocab_size = len(self.tokenizer)

    def encode(self, text, add_special_tokens=True):
        return encode_text(self.tokenizer, text, add_special_tokens)

    def render_chat(self, messages):
        return render_chat(self.tokenizer, messages, self.model_name)


#: What :class:`FakeEngine` reports about its KV cache (every number distinct, to catch mix-ups).
FAKE_FACTS = CacheFacts(
    backend="kivi",
    attention_impl="fake.Impl",
    kv_cache_dtype="torch.uint8",
    page_size=128,
    num_blocks=10,
    capacity_tokens=1280,
    page_bytes=5376,
    kv_bytes_total=1200,
    kv_bytes_used=300,
    kv_bytes_free=900,
    kv_usage=0.25,
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


def fake_client(engine: FakeEngine | None = None, **settings):
    """An httpx client of the app over ``engine`` (default: a fresh :class:`FakeEngine`), in process."""
    import httpx

    from kivi_serve.server.app import create_app
    from kivi_serve.server.settings import ServeSettings

    app = create_app(ServeSettings(**settings), engine=engine if engine is not None else FakeEngine())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
