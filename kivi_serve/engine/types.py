"""Plain data that crosses the engine boundary: what the server sends in and gets back.

Nothing here imports vLLM, so the server (and its tests) can use these types without it; the
adapter converts them to and from vLLM's own classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class EngineError(RuntimeError):
    """Base class of the errors the engine adapter raises."""


class EngineRequestError(EngineError, ValueError):
    """The request itself is invalid (a client mistake: the server answers 400)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class EngineOverloadedError(EngineError):
    """vLLM's own admission control refused the request (the server answers 429/503)."""


class EngineUnavailableError(EngineError):
    """The engine is not started, is shutting down, or died (the server answers 503)."""


@dataclass
class SamplingOptions:
    """What the server asks of one request; converted to ``vllm.SamplingParams`` by the adapter.

    ``logprobs`` is the number of top alternatives per generated token (``None``: no logprobs,
    ``0``: only the sampled token's).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True


@dataclass
class TokenLogprob:
    """One generated token's logprob and its top alternatives (token text, logprob), best first."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class CompletionDelta:
    """What one choice (``index`` in ``0..n-1``) produced since the previous step."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" (or None while running)


@dataclass
class StepOutput:
    """One update of a running request: the new pieces of each choice that moved."""

    request_id: str
    deltas: list[CompletionDelta]
    finished: bool


@dataclass
class CacheFacts:
    """The KV cache as the running engine really has it (what /metrics publishes).

    Sizes are bytes over all layers, KV heads and (tensor-parallel) workers. ``compression_vs_bf16``
    and ``bits_per_element`` are computed from the real block count and page bytes (staging pool
    included), never taken from a constant.
    """

    backend: str  # "kivi" or "default" (what was asked for)
    attention_impl: str  # qualified name of the attention implementation that runs
    kv_cache_dtype: str  # dtype of the layers' cache tensors ("torch.uint8" with our backend)
    page_size: int  # tokens per vLLM block (= one kivi page)
    num_blocks: int
    capacity_tokens: int
    page_bytes: int  # one page of one layer and one KV head (the kivi page; bf16 K+V for default)
    kv_bytes_total: int
    kv_bytes_used: int
    kv_bytes_free: int
    kv_usage: float  # vLLM's fraction of blocks in use
    bits_per_element: float  # effective, staging included
    page_bits_per_element: float  # the page format alone
    compression_vs_bf16: float
    staging_slots_total: int
    staging_slots_in_use: int
    early_finalisations: int
    reopened: int
    reclaimed: int
    running: int
    waiting: int
    preemptions: int
    stats_age_s: float  # seconds since vLLM last reported scheduler stats
