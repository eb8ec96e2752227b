"""The HTTP endpoints: OpenAI's /v1 subset, plus /health, /ready, /version and /metrics.

A request becomes a :class:`Job` (token-id prompts + sampling options, all bounds checked), is
admitted against the queue bound (429 beyond it), and runs on the engine: collected into one JSON
response, or streamed as server-sent events ending in ``data: [DONE]``. A client that goes away
aborts its engine requests; so does the request timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kivi_serve import __version__
from kivi_serve.engine.types import (
    EngineError,
    EngineOverloadedError,
    EngineRequestError,
    EngineUnavailableError,
    SamplingOptions,
    StepOutput,
    TokenLogprob,
)
from kivi_serve.server.errors import APIError, error_body
from kivi_serve.server.metrics import ServerMetrics
from kivi_serve.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    ReadyResponse,
    VersionResponse,
)
from kivi_serve.server.settings import ServeSettings

#: Stand-in for -inf in logprobs (JSON has no infinity).
MIN_LOGPROB = -9999.0


@dataclass
class ServerState:
    """What the routes share: settings, the engine, metrics and the admission counter."""

    settings: ServeSettings
    engine: Any  # kivi_serve.engine.Engine (or a stand-in with the same methods in tests)
    metrics: ServerMetrics
    admitted: int = 0
    draining: bool = False
    started: float = field(default_factory=time.time)

    @property
    def capacity(self) -> int:
        """Sequences the server admits at once: the engine's batch plus the bounded queue."""
        return max(1, int(self.engine.max_num_seqs or 1)) + self.settings.max_queue


def _state(request: Request) -> ServerState:
    return request.app.state.kivi


def _errors(*codes: int) -> dict:
    return {code: {"model": ErrorResponse} for code in codes}


V1_ERRORS = _errors(400, 401, 404, 413, 429, 503, 504)
router = APIRouter()


# ---------------------------------------------------------------------------------------- plumbing
class RequestTimeout(Exception):
    pass


class ClientDisconnected(Exception):
    pass


def _require_engine(state: ServerState) -> Any:
    if state.draining:
        raise APIError(
            503, "The server is shutting down.", code="shutting_down", headers={"Retry-After": "5"}
        )
    engine = state.engine
    if not engine.ready:
        if engine.state in ("failed", "stopped", "stopping"):
            raise APIError(503, f"The engine is not available ({engine.state}).", code="engine_unavailable")
        raise APIError(
            503,
            "The model is still loading; retry shortly.",
            code="model_loading",
            headers={"Retry-After": "5"},
        )
    return engine


def _check_model(state: ServerState, model: str | None) -> str:
    name = state.engine.model_name
    if model is not None and model != name:
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
    return name


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _until_disconnect(request: Request, work: Any) -> Any:
    """Run ``work``; if the client disconnects first, cancel it (aborting its engine requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


def _engine_error(exc: Exception) -> APIError:
    if isinstance(exc, EngineRequestError):
        return APIError(400, exc.message, param=exc.param, code=exc.code or "invalid_value")
    if isinstance(exc, EngineOverloadedError):
        return APIError(
            429,
            f"The engine is overloaded ({exc}); retry later.",
            code="engine_overloaded",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, EngineUnavailableError):
        return APIError(503, str(exc), code="engine_unavailable")
    if isinstance(exc, RequestTimeout):
        return APIError(504, str(exc) or "request timed out", code="request_timeout")
    return APIError(500, f"generation failed: {exc}", code="internal_error")


# --------------------------------------------------------------------------------------------- jobs
@dataclass
class Job:
    """One HTTP request's work: token-id prompts, sampling options and how to answer."""

    kind: str  # "completion" | "chat"
    id: str
    model: str
    prompts: list[list[int]]
    opts: SamplingOptions
    stream: bool
    include_usage: bool = False
    echo_texts: list[str] | None = None
    logprobs: int | None = None  # completions: top-k; chat: top_logprobs (None: no logprobs)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def sequences(self) -> int:
        return len(self.prompts) * self.opts.n


def _context_error(limit: int, prompt_len: int, max_tokens: int | None, what: str) -> APIError:
    if max_tokens is None:
        message = (
            f"This model's maximum context length is {limit} tokens. However, your {what} resulted in "
            f"{prompt_len} tokens. Please reduce the length of the {what}."
        )
        return APIError(400, message, param=what, code="context_length_exceeded")
    message = (
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the completion). "
        f"Please reduce the length of the {what} or completion."
    )
    return APIError(400, message, param="max_tokens", code="context_length_exceeded")


def _max_tokens(
    state: ServerState, requested: int | None, prompt_len: int, default: int | None, what: str
) -> int:
    limit = state.engine.max_model_len
    cap = state.settings.max_tokens_limit
    if requested is not None and cap is not None and requested > cap:
        raise APIError(
            400,
            f"max_tokens is {requested}, but this server allows at most {cap}.",
            param="max_tokens",
            code="invalid_value",
        )
    if prompt_len >= limit:
        raise _context_error(limit, prompt_len, None, what)
    if requested is not None:
        if prompt_len + requested > limit:
            raise _context_error(limit, prompt_len, requested, what)
        return requested
    value = limit - prompt_len if default is None else default
    if cap is not None:
        value = min(value, cap)
    return max(1, min(value, limit - prompt_len))


def _sampling(state: ServerState, req: Any, max_tokens: int, logprobs: int | None) -> SamplingOptions:
    s = state.settings
    n = req.n if req.n is not None else 1
    if n > s.max_n:
        raise APIError(
            400, f"n is {n}, but this server allows at most {s.max_n}.", param="n", code="invalid_value"
        )
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not x for x in stop):
        raise APIError(400, "stop sequences must not be empty strings.", param="stop", code="invalid_value")
    logit_bias = None
    if req.logit_bias:
        logit_bias = {}
        vocab = state.engine.vocab_size
        for key, value in req.logit_bias.items():
            try:
                token = int(key)
            except ValueError:
                token = -1
            if not 0 <= token < vocab:
                raise APIError(
                    400,
                    f"logit_bias key {key!r} is not a token id in [0, {vocab}).",
                    param="logit_bias",
                    code="invalid_value",
                )
            logit_bias[token] = float(value)
    min_tokens = req.min_tokens or 0
    if min_tokens > max_tokens:
        raise APIError(
            400,
            f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens}).",
            param="min_tokens",
            code="invalid_value",
        )
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        n=n,
        stop=stop,
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logprobs=logprobs,
        ignore_eos=bool(req.ignore_eos),
        min_tokens=min_tokens,
        logit_bias=logit_bias,
    )


def _check_token_ids(state: ServerState, ids: list[int]) -> None:
    vocab = state.engine.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(
            400,
            f"token id {bad} is out of the vocabulary [0, {vocab}).",
            param="prompt",
            code="invalid_value",
        )


def completion_job(state: ServerState, req: CompletionRequest) -> Job:
    engine = _require_engine(state)
    model = _check_model(state, req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported.", param="suffix", code="unsupported")
    n = req.n if req.n is not None else 1
    if req.best_of is not None and req.best_of != n:
        raise APIError(400, "best_of is only supported equal to n.", param="best_of", code="unsupported")
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported.", param="echo", code="unsupported")
    raw = req.prompt
    if isinstance(raw, str):
        items: list[str | list[int]] = [raw]
    elif raw and isinstance(raw[0], int):
        items = [list(raw)]  # type: ignore[arg-type]
    else:
        items = list(raw)  # type: ignore[arg-type]
    prompts: list[list[int]] = []
    texts: list[str] = []
    for item in items:
        if isinstance(item, str):
            ids = engine.encode(item)
            texts.append(item)
        else:
            ids = list(item)
            _check_token_ids(state, ids)
            texts.append(engine.decode(ids) if req.echo else "")
        if not ids:
            raise APIError(400, "The prompt is empty.", param="prompt", code="empty_prompt")
        prompts.append(ids)
    max_tokens = min(_max_tokens(state, req.max_tokens, len(ids), 16, "prompt") for ids in prompts)
    opts = _sampling(state, req, max_tokens, req.logprobs)
    engine.sampling_params(opts)  # vLLM's own validation, before anything is streamed
    return Job(
        kind="completion",
        id=f"cmpl-{uuid.uuid4().hex}",
        model=model,
        prompts=prompts,
        opts=opts,
        stream=bool(req.stream),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        echo_texts=texts if req.echo else None,
        logprobs=req.logprobs,
    )


def chat_job(state: ServerState, req: ChatCompletionRequest) -> Job:
    engine = _require_engine(state)
    model = _check_model(state, req.model)
    if req.tools:
        raise APIError(400, "tools are not supported by this server.", param="tools", code="unsupported")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(
            400, "top_logprobs requires logprobs to be true.", param="top_logprobs", code="invalid_value"
        )
    messages = []
    for m in req.messages:
        if isinstance(m.content, list):
            content = "".join(part.text for part in m.content)
        else:
            content = m.content or ""
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    try:
        _, ids = engine.render_chat(messages)
    except EngineRequestError as exc:
        raise _engine_error(exc) from None
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = _max_tokens(state, requested, len(ids), None, "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    opts = _sampling(state, req, max_tokens, logprobs)
    engine.sampling_params(opts)
    return Job(
        kind="chat",
        id=f"chatcmpl-{uuid.uuid4().hex}",
        model=model,
        prompts=[ids],
        opts=opts,
        stream=bool(req.stream),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        logprobs=logprobs,
    )


# ------------------------------------------------------------------------------------ running jobs
async def merged_steps(engine: Any, job: Job) -> AsyncIterator[tuple[int, StepOutput]]:
    """Run every prompt of ``job`` on the engine; yield ``(prompt_index, step)`` as they come."""
    if len(job.prompts) == 1:
        async with contextlib.aclosing(engine.generate(job.prompts[0], job.opts, f"{job.id}-0")) as gen:
            async for step in gen:
                yield 0, step
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(p: int, ids: list[int]) -> None:
        try:
            async with contextlib.aclosing(engine.generate(ids, job.opts, f"{job.id}-{p}")) as gen:
                async for step in gen:
                    queue.put_nowait((p, step))
            queue.put_nowait((p, done))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            queue.put_nowait((p, exc))

    tasks = [asyncio.ensure_future(pump(p, ids)) for p, ids in enumerate(job.prompts)]
    try:
        remaining = len(tasks)
        while remaining:
            p, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield p, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def with_deadline(steps: AsyncIterator, deadline: float, timeout: float) -> AsyncIterator:
    """Re-yield ``steps`` until ``deadline`` (monotonic); then raise :class:`RequestTimeout`."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RequestTimeout(f"request timed out after {timeout:g} s")
        try:
            item = await asyncio.wait_for(steps.__anext__(), remaining)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise RequestTimeout(f"request timed out after {timeout:g} s") from None
        yield item


def _lp(x: float) -> float:
    return x if math.isfinite(x) else MIN_LOGPROB


@dataclass
class Choice:
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    started: bool = False  # streaming: the first chunk (role / echo) was sent
    offset: int = 0  # completions logprobs: text offset of the next token


class Collector:
    """Folds engine steps into choices, usage and timings; renders responses and stream chunks."""

    def __init__(self, job: Job):
        self.job = job
        self.choices: dict[int, Choice] = {}
        self.t0 = time.monotonic()
        self.t_first: float | None = None
        self.t_last: float | None = None

    def choice(self, p: int, index: int) -> Choice:
        key = p * self.job.opts.n + index
        c = self.choices.get(key)
        if c is None:
            c = self.choices[key] = Choice()
            if self.job.echo_texts is not None:
                c.offset = len(self.job.echo_texts[p])
        return c

    def add(self, p: int, step: StepOutput) -> None:
        now = time.monotonic()
        for d in step.deltas:
            c = self.choice(p, d.index)
            if d.token_ids:
                if self.t_first is None:
                    self.t_first = now
                self.t_last = now
            c.text.append(d.text)
            c.tokens += len(d.token_ids)
            if d.logprobs:
                c.logprobs.extend(d.logprobs)
            if d.finish_reason is not None:
                c.finish_reason = d.finish_reason

    # -- numbers
    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.job.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices.values())

    def usage(self) -> dict:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def timings(self) -> tuple[float | None, float, float | None]:
        end = self.t_last or time.monotonic()
        ttft = None if self.t_first is None else self.t_first - self.t0
        most = max((c.tokens for c in self.choices.values()), default=0)
        tpot = None
        if self.t_first is not None and most > 1:
            tpot = (end - self.t_first) / (most - 1)
        return ttft, end - self.t0, tpot

    # -- logprobs renderers
    def completion_logprobs(self, c: Choice, items: list[TokenLogprob]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in items:
            out["tokens"].append(lp.token)
            out["token_logprobs"].append(_lp(lp.logprob))
            out["top_logprobs"].append({tok: _lp(v) for _, tok, v in lp.top} if self.job.logprobs else None)
            out["text_offset"].append(c.offset)
            c.offset += len(lp.token)
        return out

    @staticmethod
    def chat_logprobs(items: list[TokenLogprob]) -> dict:
        return {
            "content": [
                {
                    "token": lp.token,
                    "logprob": _lp(lp.logprob),
                    "bytes": list(lp.token.encode("utf-8")),
                    "top_logprobs": [
                        {"token": tok, "logprob": _lp(v), "bytes": list(tok.encode("utf-8"))}
                        for _, tok, v in lp.top
                    ],
                }
                for lp in items
            ]
        }

    # -- whole responses
    def response(self) -> dict:
        job = self.job
        choices = []
        for key in sorted(self.choices):
            c = self.choices[key]
            text = "".join(c.text)
            if job.kind == "completion":
                p = key // job.opts.n
                if job.echo_texts is not None:
                    text = job.echo_texts[p] + text
                lps = None
                if job.logprobs is not None:
                    c.offset = len(job.echo_texts[p]) if job.echo_texts is not None else 0
                    lps = self.completion_logprobs(c, c.logprobs)
                choices.append(
                    {"index": key, "text": text, "logprobs": lps, "finish_reason": c.finish_reason}
                )
            else:
                lps = self.chat_logprobs(c.logprobs) if job.logprobs is not None else None
                choices.append(
                    {
                        "index": key,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": lps,
                        "finish_reason": c.finish_reason,
                    }
                )
        obj = "text_completion" if job.kind == "completion" else "chat.completion"
        return {
            "id": job.id,
            "object": obj,
            "created": job.created,
            "model": job.model,
            "choices": choices,
            "usage": self.usage(),
            "system_fingerprint": f"kivi-serve-{__version__}",
        }

    # -- stream chunks
    def _chunk(self, choices: list[dict]) -> dict:
        job = self.job
        chunk = {
            "id": job.id,
            "object": "text_completion" if job.kind == "completion" else "chat.completion.chunk",
            "created": job.created,
            "model": job.model,
            "choices": choices,
        }
        if job.include_usage:
            chunk["usage"] = None
        return chunk

    def stream_chunks(self, p: int, step: StepOutput) -> list[dict]:
        job = self.job
        self.add(p, step)
        out = []
        for d in step.deltas:
            key = p * job.opts.n + d.index
            c = self.choices[key]
            if job.kind == "chat":
                if not c.started:
                    c.started = True
                    out.append(
                        self._chunk(
                            [
                                {
                                    "index": key,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ]
                        )
                    )
                if d.text or d.logprobs or d.finish_reason:
                    delta = {"content": d.text} if d.text else {}
                    lps = self.chat_logprobs(d.logprobs) if job.logprobs is not None and d.logprobs else None
                    out.append(
                        self._chunk(
                            [
                                {
                                    "index": key,
                                    "delta": delta,
                                    "logprobs": lps,
                                    "finish_reason": d.finish_reason,
                                }
                            ]
                        )
                    )
            else:
                text = d.text
                if not c.started:
                    c.started = True
                    if job.echo_texts is not None:
                        text = job.echo_texts[p] + text
                if text or d.finish_reason or d.logprobs:
                    lps = None
                    if job.logprobs is not None and d.logprobs:
                        lps = self.completion_logprobs(c, d.logprobs)
                    out.append(
                        self._chunk(
                            [{"index": key, "text": text, "logprobs": lps, "finish_reason": d.finish_reason}]
                        )
                    )
        return out

    def usage_chunk(self) -> dict:
        chunk = self._chunk([])
        chunk["usage"] = self.usage()
        return chunk


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def _admit(state: ServerState, job: Job) -> None:
    cap = state.capacity
    if job.sequences > cap:
        raise APIError(
            400,
            f"This request needs {job.sequences} sequences (prompts x n); the server runs at most {cap}.",
            param="n",
            code="invalid_value",
        )
    if state.admitted + job.sequences > cap:
        raise APIError(
            429,
            f"The server is at capacity ({state.admitted} sequences in flight, limit {cap}); retry later.",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    state.admitted += job.sequences
    state.metrics.inflight.set(state.admitted)


def _release(state: ServerState, job: Job) -> None:
    state.admitted -= job.sequences
    state.metrics.inflight.set(state.admitted)


def _finish(state: ServerState, request: Request, col: Collector, outcome: str) -> None:
    log = request.state.log
    ttft, e2e, tpot = col.timings()
    log.update(
        {
            "id": col.job.id,
            "outcome": outcome,
            "stream": col.job.stream,
            "prompt_tokens": col.prompt_tokens,
            "completion_tokens": col.completion_tokens,
            "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
            "e2e_ms": round(e2e * 1000, 1),
        }
    )
    if outcome == "ok":
        state.metrics.observe_generation(ttft, e2e, col.completion_tokens, col.prompt_tokens, tpot)


async def run_job(state: ServerState, request: Request, job: Job) -> Response:
    _admit(state, job)
    col = Collector(job)
    timeout = state.settings.request_timeout
    deadline = time.monotonic() + timeout
    engine = state.engine
    if job.stream:
        outcome = {"value": "disconnect"}  # if the client goes away, Starlette cancels the stream

        def close() -> None:
            _release(state, job)
            _finish(state, request, col, outcome["value"])

        return JobStream(_stream(state, job, col, deadline, timeout, outcome), close)

    async def collect() -> None:
        async with contextlib.aclosing(merged_steps(engine, job)) as steps:
            async for p, step in with_deadline(steps, deadline, timeout):
                col.add(p, step)

    outcome = "error"
    try:
        await _until_disconnect(request, collect())
        outcome = "ok"
    except ClientDisconnected:
        outcome = "disconnect"
        request.state.log["status"] = 499
        return Response(status_code=499)
    except (EngineError, RequestTimeout) as exc:
        outcome = "timeout" if isinstance(exc, RequestTimeout) else "error"
        raise _engine_error(exc) from None
    finally:
        _release(state, job)
        _finish(state, request, col, outcome)
    return JSONResponse(col.response())


class JobStream(StreamingResponse):
    """An SSE response that releases its job exactly once, however the stream ends.

    A stream the client abandons before its first chunk is never iterated, so the generator's own
    ``finally`` cannot be trusted with the admission counter; this response's ``__call__`` can.
    """

    def __init__(self, body: AsyncIterator[bytes], on_close: Any):
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()


async def _stream(
    state: ServerState, job: Job, col: Collector, deadline: float, timeout: float, outcome: dict
) -> AsyncIterator[bytes]:
    try:
        async with contextlib.aclosing(merged_steps(state.engine, job)) as steps:
            async for p, step in with_deadline(steps, deadline, timeout):
                for chunk in col.stream_chunks(p, step):
                    yield _sse(chunk)
        if job.include_usage:
            yield _sse(col.usage_chunk())
        outcome["value"] = "ok"
        yield DONE
    except (EngineError, RequestTimeout) as exc:
        outcome["value"] = "timeout" if isinstance(exc, RequestTimeout) else "error"
        err = _engine_error(exc)
        yield _sse(error_body(err.status, err.message, param=err.param, code=err.code))
        yield DONE


# ------------------------------------------------------------------------------------------- routes
# One server-sent event (how OpenAPI tools such as Schemathesis read a text/event-stream body: event
# by event). ``data`` is a chunk's JSON, or ``[DONE]`` for the last event.
_STREAM_DOC = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "description": "One server-sent event: `data: <chunk JSON>`; the stream ends with `data: [DONE]`.",
            "properties": {
                "data": {"type": "string"},
                "event": {"type": "string"},
                "id": {"type": "string"},
                "retry": {"type": "integer"},
            },
            "required": ["data"],
        }
    }
}


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={
        **V1_ERRORS,
        200: {
            "content": _STREAM_DOC,
            "description": "A completion, or with `stream: true` "
            "a stream of CompletionStreamResponse events.",
        },
    },
    tags=["OpenAI"],
)
async def completions(body: CompletionRequest, request: Request) -> Response:
    """Create a completion for one prompt or a batch (text or token ids)."""
    state = _state(request)
    job = completion_job(state, body)
    return await run_job(state, request, job)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={
        **V1_ERRORS,
        200: {
            "content": _STREAM_DOC,
            "description": "A chat completion, or with "
            "`stream: true` a stream of ChatCompletionStreamResponse events.",
        },
    },
    tags=["OpenAI"],
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """Create a chat completion; the messages go through the model's chat template."""
    state = _state(request)
    job = chat_job(state, body)
    return await run_job(state, request, job)


def _model_card(state: ServerState) -> dict:
    engine = state.engine
    return ModelCard(
        id=engine.model_name,
        created=int(state.started),
        root=str(engine.model_path) if getattr(engine, "model_path", None) else None,
        max_model_len=engine.max_model_len or None,
    ).model_dump()


@router.get("/v1/models", response_model=ModelList, responses=_errors(401, 503), tags=["OpenAI"])
async def list_models(request: Request) -> dict:
    """The served model."""
    state = _state(request)
    _require_engine(state)
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/v1/models/{model}", response_model=ModelCard, responses=_errors(401, 404, 503), tags=["OpenAI"])
async def get_model(model: str, request: Request) -> dict:
    state = _state(request)
    _require_engine(state)
    _check_model(state, model)
    return _model_card(state)


@router.get(
    "/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}}, tags=["ops"]
)
async def health(request: Request) -> JSONResponse:
    """Liveness: 200 while the process and its engine are alive (also while loading)."""
    engine = _state(request).engine
    if engine.state == "failed" or (engine.ready and not engine.healthy):
        return JSONResponse({"status": "failed", "detail": engine.error}, status_code=503)
    return JSONResponse({"status": "ok", "detail": None})


@router.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}}, tags=["ops"])
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 once the model is loaded; 503 while loading, draining or failed."""
    state = _state(request)
    engine = state.engine
    if state.draining:
        return JSONResponse({"status": "draining", "detail": None}, status_code=503)
    if engine.ready and engine.healthy:
        return JSONResponse({"status": "ready", "detail": None})
    status = {"failed": "failed", "stopped": "stopped", "stopping": "draining"}.get(engine.state, "loading")
    return JSONResponse(
        {"status": status, "detail": engine.error},
        status_code=503,
        headers={"Retry-After": "5"} if status == "loading" else None,
    )


@router.get("/version", response_model=VersionResponse, tags=["ops"])
async def version(request: Request) -> dict:
    """kivi-serve and vLLM versions, and what the engine runs (backend, attention impl, cache dtype)."""
    engine = _state(request).engine
    described = engine.describe() if engine.ready else {"state": engine.state}
    return {
        "version": __version__,
        "vllm_version": getattr(engine, "vllm_version", None) or None,
        "engine": described,
    }


@router.get(
    "/metrics",
    tags=["ops"],
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text format: kivi_* and vllm:* series.",
        }
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: ours (kivi_*) and vLLM's own (vllm:*)."""
    state = _state(request)
    engine = state.engine
    await state.metrics.refresh(engine)
    registry = engine.vllm_metrics_registry() if engine.ready else None
    return Response(state.metrics.render(registry), media_type="text/plain; version=0.0.4; charset=utf-8")
