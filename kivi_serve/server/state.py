"""What the routes share: the engine they drive (typed by :class:`ServingEngine`) and the server state."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

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
    model_path: Path | None
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


@dataclass
class ServerState:
    """Settings, the engine, metrics and the admission counter (``app.state.kivi``)."""

    settings: ServeSettings
    engine: ServingEngine
    metrics: ServerMetrics
    admitted: int = 0
    draining: bool = False
    started: float = field(default_factory=time.time)

    @property
    def capacity(self) -> int:
        """Sequences the server admits at once: the engine's batch plus the bounded queue."""
        return max(1, int(self.engine.max_num_seqs or 1)) + self.settings.max_queue


def state_of(request: Request) -> ServerState:
    return request.app.state.kivi
