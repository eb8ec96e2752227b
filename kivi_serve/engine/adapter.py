"""The engine the server talks to: vLLM's ``AsyncLLM`` with our backend selected, behind a small API.

    engine = Engine(EngineConfig(model="smollm2"))
    await engine.start()                       # ~10-40 s on 2 CPU cores; engine.state tells
    ids = engine.encode("Hello")
    async with contextlib.aclosing(engine.generate(ids, SamplingOptions(max_tokens=8), "r1")) as gen:
        async for step in gen:                 # StepOutput: new text/tokens of each choice
            ...
    facts = await engine.cache_facts()         # blocks, bytes, compression, staging, running
    await engine.shutdown()

vLLM runs the engine core in a child process; what our attention backend knows is read there over
``collective_rpc`` (see :mod:`kivi_serve.engine.worker_ext`). Prompts go in as token ids only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from kivi_serve.backend.stats import BackendStats
from kivi_serve.engine.args import build_engine_args, is_cpu_platform, served_name
from kivi_serve.engine.config import EngineConfig
from kivi_serve.engine.facts import compute_facts
from kivi_serve.engine.stats import SchedulerSnapshot, recorder_factory
from kivi_serve.engine.tokens import encode_text, render_chat
from kivi_serve.engine.types import (
    CacheFacts,
    CompletionDelta,
    EngineError,
    EngineOverloadedError,
    EngineRequestError,
    EngineUnavailableError,
    SamplingOptions,
    StepOutput,
    TokenLogprob,
)

log = logging.getLogger("kivi_serve.engine")
#: How long the engine core process may take to tear down (free the KV cache, stop its workers)
#: before vLLM kills it; a few seconds on a busy 2-core machine.
ENGINE_STOP_TIMEOUT_S = 15.0


class Engine:
    """vLLM's ``AsyncLLM`` in this process's event loop, started from an :class:`EngineConfig`."""

    def __init__(self, cfg: EngineConfig, **extra_engine_args: Any):
        self.cfg = cfg
        self.state = "new"  # → loading → ready → stopping → stopped; or failed
        self.error: str | None = None
        self.load_seconds: float | None = None
        self._extra = extra_engine_args
        self._llm: Any = None
        self._snapshot = SchedulerSnapshot()
        self._inflight: set[str] = set()
        self._layout: list[dict] = []
        self._stats_task: asyncio.Future | None = None
        self._last_stats = BackendStats()
        self._probe: dict = {}
        # Filled by start():
        self.model_path: Path | None = None
        self.model_name: str = cfg.served_model_name or cfg.model
        self.max_model_len = 0
        self.block_size = 0
        self.num_blocks = 0
        self.max_num_seqs = 0
        self.vocab_size = 0
        self.vllm_version = ""
        self._model_dims = (0, 0, 0)  # layers, kv heads, head dim (whole model)

    # ------------------------------------------------------------------ lifecycle
    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def start(self) -> None:
        """Build vLLM's engine (in a worker thread, so the event loop keeps serving /health)."""
        if self.state != "new":
            raise EngineError(f"engine already started (state {self.state})")
        self.state = "loading"
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(self._start_sync)
            await self._read_static_facts()
        except BaseException as exc:
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            await self._close_llm()
            raise
        self.load_seconds = time.monotonic() - t0
        self.state = "ready"
        log.info(
            "engine ready in %.1f s: model=%s backend=%s impl=%s blocks=%d x %d tokens",
            self.load_seconds,
            self.model_name,
            self.cfg.backend,
            self.attention_impl,
            self.num_blocks,
            self.block_size,
        )

    def _start_sync(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        from kivi_serve.model.prepare import resolve_model

        self.model_path = resolve_model(self.cfg.model)
        if is_cpu_platform():
            # The default thread binding runs the model on one core (see DESIGN.md).
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        args = build_engine_args(self.cfg, self.model_path, **self._extra)
        self._llm = AsyncLLM.from_engine_args(args, stat_loggers=[recorder_factory(self._snapshot)])
        vc = self._llm.vllm_config
        mc = vc.model_config
        self.model_name = served_name(self.cfg, self.model_path)
        self.max_model_len = int(mc.max_model_len)
        self.block_size = int(vc.cache_config.block_size)
        self.num_blocks = int(vc.cache_config.num_gpu_blocks or 0)
        self.max_num_seqs = int(vc.scheduler_config.max_num_seqs)
        self.vocab_size = int(mc.get_vocab_size())
        self._model_dims = (
            int(mc.hf_config.num_hidden_layers),
            int(mc.get_total_num_kv_heads()),
            int(mc.get_head_size()),
        )
        import vllm

        self.vllm_version = vllm.__version__

    async def _read_static_facts(self) -> None:
        self._layout = await self._llm.collective_rpc("kivi_kv_layout")
        self._probe = (await self._llm.collective_rpc("kivi_attention_probe"))[0]
        self.num_blocks = self._layout[0]["num_blocks"]
        if self.cfg.backend == "kivi":
            # the first answer /metrics can fall back on (state is still "loading")
            self._last_stats = await self.backend_stats(self._llm)

    async def shutdown(self) -> None:
        """Abort what is left and stop the engine process (idempotent)."""
        if self.state in ("stopped", "new"):
            self.state = "stopped"
            return
        self.state = "stopping"
        if self._stats_task is not None:
            self._stats_task.cancel()
        await self._close_llm()
        self.state = "stopped"

    async def _close_llm(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            # Nothing of ours runs any more. vLLM's output handler would report the engine core's
            # exit below as a crash (EngineDeadError, with a traceback): stop it first.
            if llm.output_handler is not None:
                llm.output_handler.cancel()
            await asyncio.to_thread(llm.shutdown, ENGINE_STOP_TIMEOUT_S)

    def _require(self) -> Any:
        if self.state != "ready" or self._llm is None:
            raise EngineUnavailableError(f"engine is not ready (state: {self.state})")
        if self._llm.errored:
            self.state = "failed"
            self.error = "engine process died"
            raise EngineUnavailableError("engine process died")
        return self._llm

    @property
    def healthy(self) -> bool:
        return self.state == "ready" and self._llm is not None and not self._llm.errored

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self) -> Any:
        """vLLM's tokenizer for the served model (the one it detokenizes with)."""
        return self._require().get_tokenizer()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (thread-safe: see :mod:`kivi_serve.engine.tokens`)."""
        return encode_text(self.tokenizer, text, add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> tuple[str, list[int]]:
        """Apply the model's chat template; returns the prompt text and its token ids."""
        return render_chat(self.tokenizer, messages, self.model_name, add_generation_prompt)

    # ------------------------------------------------------------------ requests
    def sampling_params(self, opts: SamplingOptions) -> Any:
        """Our :class:`SamplingOptions` as a vLLM ``SamplingParams`` that streams deltas."""
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        # SamplingOptions has SamplingParams' names; vLLM wants None for "no stops" / "no bias".
        values = asdict(opts) | {
            "stop": list(opts.stop) or None,
            "stop_token_ids": list(opts.stop_token_ids) or None,
            "logit_bias": opts.logit_bias or None,
        }
        try:
            return SamplingParams(**values, output_kind=RequestOutputKind.DELTA)
        except (ValueError, TypeError, VLLMClientError) as exc:  # vLLM's validation: a client mistake
            raise EngineRequestError(str(exc), param=getattr(exc, "parameter", None)) from None

    async def generate(
        self, prompt_token_ids: Sequence[int], opts: SamplingOptions, request_id: str
    ) -> AsyncIterator[StepOutput]:
        """Run one request; yields what each choice produced since the previous step.

        Closing the iterator early (``aclose``, or cancelling the task that iterates it) aborts the
        request in vLLM. Raises :class:`EngineRequestError` for invalid requests,
        :class:`EngineOverloadedError` when vLLM's admission control refuses, and
        :class:`EngineUnavailableError` when the engine is gone.
        """
        from vllm import TokensPrompt
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        llm = self._require()
        params = self.sampling_params(opts)
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise EngineRequestError("the prompt is empty", param="prompt")
        self._inflight.add(request_id)
        try:
            stream = llm.generate(TokensPrompt(prompt_token_ids=ids), params, request_id)
            async with contextlib.aclosing(stream):
                async for out in stream:
                    yield StepOutput(
                        request_id=request_id,
                        deltas=[_delta(c, params.logprobs) for c in out.outputs],
                        finished=bool(out.finished),
                    )
        except EngineDeadError:
            self.state = "failed"
            self.error = "engine process died"
            raise EngineUnavailableError("engine process died") from None
        except VLLMClientError as exc:
            name = type(exc).__name__
            if name in ("QueueOverflowError", "MaxQueuedTokensError"):
                raise EngineOverloadedError(str(exc) or name) from None
            raise EngineRequestError(str(exc), param=getattr(exc, "parameter", None)) from None
        except EngineGenerateError as exc:
            cause = exc.__cause__
            if isinstance(cause, (ValueError, TypeError)):
                raise EngineRequestError(str(cause)) from None
            raise EngineError(f"generation failed: {cause or exc}") from exc
        finally:
            self._inflight.discard(request_id)

    # ------------------------------------------------------------------ stats
    async def backend_stats(self, llm: Any = None) -> BackendStats:
        """Our backend's :class:`BackendStats` from every engine worker, merged."""
        answers = await (llm or self._require()).collective_rpc("kivi_cache_stats")
        return BackendStats.merged(answers)

    async def _backend_stats_cached(self, timeout: float) -> BackendStats:
        task = self._stats_task
        if task is None or task.done():
            task = self._stats_task = asyncio.ensure_future(self.backend_stats())
            task.add_done_callback(self._keep_stats)
        with contextlib.suppress(asyncio.TimeoutError, EngineError):
            await asyncio.wait_for(asyncio.shield(task), timeout)
        return self._last_stats

    def _keep_stats(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is None:
            self._last_stats = task.result()

    @property
    def attention_impl(self) -> str:
        impls = self._probe.get("impls") or {}
        return ",".join(sorted(impls)) or "unknown"

    def scheduler_snapshot(self) -> SchedulerSnapshot:
        """vLLM's latest scheduler numbers; with nothing of ours in flight, its scheduler is idle.

        vLLM reports running / waiting / KV usage after each engine step. An abort (client gone,
        stop string found by the front end) frees the request's blocks without a step, so after
        the last request ends that way the report still counts it until the next request runs.
        Every request of this engine goes through :meth:`generate`, so when none is in flight the
        scheduler holds nothing (blocks of finished requests are free, cached or not); ``updated``
        keeps the time of vLLM's last report (``stats_age_s`` in the facts).
        """
        snap = replace(self._snapshot)
        if not self._inflight:
            snap = replace(snap, running=0, waiting=0, kv_usage=0.0)
        return snap

    async def cache_facts(self, timeout: float = 2.0) -> CacheFacts:
        """The KV cache as the running engine has it: real block count, real bytes, live usage.

        Scheduler numbers come with every engine step (:meth:`scheduler_snapshot`). The backend's
        staging numbers need an RPC to the engine process, which answers between steps; if that
        takes longer than ``timeout`` (a long prefill step on CPU), the previous answer is used and
        the pending one updates it when it arrives.
        """
        stats = await self._backend_stats_cached(timeout) if self.cfg.backend == "kivi" else BackendStats()
        return compute_facts(
            backend=self.cfg.backend,
            attention_impl=self.attention_impl,
            kv_cache_dtype=",".join(sorted(self._probe.get("kv_dtypes") or {})) or "unknown",
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            layouts=self._layout,
            stats=stats,
            snapshot=self.scheduler_snapshot(),
            model_dims=self._model_dims,
        )

    def vllm_metrics_registry(self) -> Any:
        """The prometheus-client registry that holds vLLM's own ``vllm:*`` series."""
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        return get_prometheus_registry()

    def describe(self) -> dict:
        """Static facts for /version and logs."""
        return {
            "model": self.model_name,
            "backend": self.cfg.backend,
            "attention_impl": self.attention_impl,
            "attention_backends": sorted(self._probe.get("backends") or {}),
            "kv_cache_dtype": ",".join(sorted(self._probe.get("kv_dtypes") or {})) or None,
            "kv_cache_shape": self._probe.get("kv_shape") or None,
            "scheme": self.cfg.scheme if self.cfg.backend == "kivi" else None,  # the page format
            "page_size": self.block_size,
            "num_blocks": self.num_blocks,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "vllm_version": self.vllm_version,
            "load_seconds": round(self.load_seconds, 2) if self.load_seconds else None,
            "state": self.state,
        }


def _delta(c: Any, want_logprobs: int | None) -> CompletionDelta:
    logprobs = None
    if want_logprobs is not None and c.logprobs is not None:
        logprobs = []
        for tok, pos in zip(c.token_ids, c.logprobs):
            if not pos:
                continue
            chosen = pos.get(tok)
            top = sorted(
                (
                    (tid, lp)
                    for tid, lp in pos.items()
                    if lp.rank is not None and lp.rank <= max(want_logprobs, 0)
                ),
                key=lambda item: item[1].rank,
            )
            logprobs.append(
                TokenLogprob(
                    token_id=int(tok),
                    token=(chosen.decoded_token if chosen is not None else None) or "",
                    logprob=float(chosen.logprob) if chosen is not None else float("-inf"),
                    top=[(int(tid), lp.decoded_token or "", float(lp.logprob)) for tid, lp in top],
                )
            )
    return CompletionDelta(
        index=int(c.index),
        text=c.text,
        token_ids=list(c.token_ids),
        logprobs=logprobs,
        finish_reason=c.finish_reason,
    )
