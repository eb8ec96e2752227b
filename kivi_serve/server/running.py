"""Running a :class:`~kivi_serve.server.jobs.Job`: admission, the engine requests, one JSON or an SSE stream.

A job is admitted against the queue bound (429 beyond it) and runs every prompt on the engine at
once. Without ``stream`` the steps are collected into one JSON response; with it they go out as
server-sent events ending in ``data: [DONE]`` (an engine error, the timeout or the drain deadline
becomes an error event before it). A client that goes away aborts its engine requests; so do the
request timeout and the drain deadline (:attr:`ServerState.cut`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kivi_serve.engine.types import EngineError, StepOutput
from kivi_serve.server.errors import APIError, DrainCut, RequestTimeout, api_error_for
from kivi_serve.server.jobs import Job, shutting_down
from kivi_serve.server.render import Renderer
from kivi_serve.server.state import ServerState, ServingEngine

DONE = b"data: [DONE]\n\n"
#: What stops a job before its engine requests finish (each answered by api_error_for).
STOPPED = (EngineError, RequestTimeout, DrainCut)
log = logging.getLogger("kivi_serve.server")


class ClientDisconnected(Exception):
    pass


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


# ------------------------------------------------------------------------------------ engine steps
async def merged_steps(engine: ServingEngine, job: Job) -> AsyncIterator[tuple[int, StepOutput]]:
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


async def _cancel(task: asyncio.Future) -> None:
    """Cancel ``task`` and wait until it has stopped (its generator may then be closed)."""
    task.cancel()
    await asyncio.wait({task})


async def bounded(steps: AsyncIterator, deadline: float, timeout: float, cut: asyncio.Event) -> AsyncIterator:
    """Re-yield ``steps`` until ``deadline`` (monotonic: then :class:`RequestTimeout`) or until ``cut``
    is set (then :class:`DrainCut`); the pending step is cancelled either way."""
    stop = asyncio.ensure_future(cut.wait())
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeout(f"request timed out after {timeout:g} s")
            step = asyncio.ensure_future(steps.__anext__())
            try:
                await asyncio.wait({step, stop}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not step.done():
                    await _cancel(step)
            if step.cancelled():
                if cut.is_set():
                    raise DrainCut()
                raise RequestTimeout(f"request timed out after {timeout:g} s")
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        stop.cancel()


async def job_steps(state: ServerState, job: Job) -> AsyncIterator[tuple[int, StepOutput]]:
    """The job's steps, cut at ``--request-timeout`` or at the drain deadline."""
    timeout = state.settings.request_timeout
    async with contextlib.aclosing(merged_steps(state.engine, job)) as steps:
        async for item in bounded(steps, time.monotonic() + timeout, timeout, state.cut):
            yield item


async def until_disconnect(request: Request, work: Coroutine) -> Any:
    """Run ``work``; if the client disconnects first, cancel it (aborting its engine requests)."""

    async def wait_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect())
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


# ------------------------------------------------------------------------------- admission and log
def admit(state: ServerState, job: Job) -> None:
    if state.draining:  # SIGTERM arrived while the request was validated
        raise shutting_down()
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


def finish(state: ServerState, request: Request, out: Renderer, outcome: str) -> None:
    """Release the job's admission; log its outcome and timings; count a served one in the metrics."""
    state.admitted -= out.job.sequences
    state.metrics.inflight.set(state.admitted)
    ttft, e2e, tpot = out.timings()
    request.state.log.update(
        {
            "id": out.job.id,
            "outcome": outcome,
            "stream": out.job.stream,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
            "e2e_ms": round(e2e * 1000, 1),
        }
    )
    if outcome == "ok":
        state.metrics.observe_generation(ttft, e2e, out.completion_tokens, out.prompt_tokens, tpot)


def _outcome(exc: Exception) -> str:
    return {RequestTimeout: "timeout", DrainCut: "cut"}.get(type(exc), "error")


def _answer(exc: Exception, job: Job) -> APIError:
    """The error a stopped job answers; a failure of ours (5xx, but the drain's) is logged."""
    err = api_error_for(exc)
    if err.status >= 500 and not isinstance(exc, DrainCut):
        log.error("request %s failed: %s", job.id, err.message)
    return err


# ------------------------------------------------------------------------------------------ run it
async def run_job(state: ServerState, request: Request, job: Job) -> Response:
    """Admit ``job`` and answer it: one JSON response, or an SSE stream."""
    admit(state, job)
    out = job.renderer(job)
    if job.stream:
        return JobStream(state, request, out)

    async def collect() -> None:
        async for p, step in job_steps(state, job):
            out.add(p, step)

    outcome = "error"
    try:
        await until_disconnect(request, collect())
        outcome = "ok"
    except ClientDisconnected:
        outcome = "disconnect"
        request.state.log["status"] = 499
        return Response(status_code=499)
    except STOPPED as exc:
        outcome = _outcome(exc)
        raise _answer(exc, job) from None
    finally:
        finish(state, request, out, outcome)
    return JSONResponse(out.response())


class JobStream(StreamingResponse):
    """The SSE response of a streamed job; it finishes its job exactly once, however the stream ends.

    A stream the client abandons before its first chunk is never iterated, so the generator's own
    ``finally`` cannot be trusted with the admission counter; this response's ``__call__`` can.
    """

    def __init__(self, state: ServerState, request: Request, out: Renderer):
        self.outcome = "disconnect"  # if the client goes away, Starlette cancels the stream
        super().__init__(
            self._events(state, out),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._finish: Callable[[], None] | None = lambda: finish(state, request, out, self.outcome)

    async def _events(self, state: ServerState, out: Renderer) -> AsyncIterator[bytes]:
        try:
            async with contextlib.aclosing(job_steps(state, out.job)) as steps:
                async for p, step in steps:
                    for chunk in out.stream_chunks(p, step):
                        yield sse(chunk)
            if out.job.include_usage:
                yield sse(out.usage_chunk())
            self.outcome = "ok"
            yield DONE
        except STOPPED as exc:
            self.outcome = _outcome(exc)
            err = _answer(exc, out.job)
            yield sse(err.body())
            yield DONE

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            done, self._finish = self._finish, None
            if done is not None:
                done()
