"""What the routes share: the engine they drive (typed by :class:`ServingEngine`) and the server state."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from fastapi import Request

from kivi_serve.engine.types import CacheFacts, SamplingOptions, StepOutput
from kivi_serve.server.metrics import ServerMetrics
from kivi_serve.server.settings import ServeSettings


@runtime_checkable
class ServingEngine(Protocol):
    """The engine as the server uses it: :class:`kivi_serve.engine.Engine`, or a test's stand-in.

    ``state`` is ``new``, ``loading``, ``ready``, ``stopping``, ``stopped`` or ``failed``; the facts
    below it are known once ready. ``render_chat`` returns the templated prompt and its token ids,
    ``sampling_params`` validates options the engine's way (``EngineRequestError``), and closing
    ``generate``'s iterator early aborts the request.
    """

    state: str
    error: str | None
    model_name: str
    max_model_len: int
    max_num_seqs: int
    vocab_size: int
    vllm_version: str

    @property
    def ready(self) -> bool: ...
    @property
    def healthy(self) -> bool: ...
    async def start(self) -> None: ...
    async def shutdown(self) -> None: ...
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def render_chat(self, messages: list[dict]) -> tuple[str, list[int]]: ...
    def sampling_params(self, opts: SamplingOptions) -> Any: ...
    def generate(
        self, ids: Sequence[int], opts: SamplingOptions, request_id: str
    ) -> AsyncIterator[StepOutput]: ...
    def describe(self) -> dict: ...
    async def cache_facts(self) -> CacheFacts: ...
    def vllm_metrics_registry(self) -> Any: ...  # prometheus-client registry of vllm:* (or None)


T = TypeVar("T")


@dataclass
class ServerState:
    """Settings, the engine, metrics, the admission counter and the drain (``app.state.kivi``).

    ``draining``: SIGTERM arrived; new /v1 requests get 503. ``cut``: the drain deadline passed;
    every running job stops (a stream with an error event). ``workers``: the bounded pool that
    tokenizes and renders chat templates off the event loop (:meth:`off_loop`).
    """

    settings: ServeSettings
    engine: ServingEngine
    metrics: ServerMetrics
    admitted: int = 0
    draining: bool = False
    started: float = field(default_factory=time.time)
    cut: asyncio.Event = field(default_factory=asyncio.Event)
    workers: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.workers = ThreadPoolExecutor(self.settings.tokenizer_threads, thread_name_prefix="kivi-tokenize")

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread; the event loop serves other requests meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.workers, fn, *args)

    @property
    def capacity(self) -> int:
        """Sequences the server admits at once: the engine's batch plus the bounded queue."""
        return max(1, int(self.engine.max_num_seqs or 1)) + self.settings.max_queue


def state_of(request: Request) -> ServerState:
    return request.app.state.kivi
