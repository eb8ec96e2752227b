"""Request validation: an OpenAI request becomes a :class:`Job`, or an :class:`APIError` with the right 4xx.

The pydantic models (:mod:`kivi_serve.server.protocol`) check what the API contract fixes; this
module checks what depends on the running server: the model's name, context length and
vocabulary, ``--max-n``, ``--max-tokens-limit``, and finally vLLM's own sampling validation, so
that nothing is streamed for a request the engine would refuse. Tokenizing and rendering the chat
template run in the server's worker threads (:meth:`ServerState.off_loop`): a 2 MB prompt takes
seconds, and the event loop must keep answering meanwhile.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from kivi_serve.engine.types import EngineRequestError, SamplingOptions
from kivi_serve.server.errors import APIError, api_error_for, clip
from kivi_serve.server.protocol import ChatCompletionRequest, CompletionRequest
from kivi_serve.server.render import ChatRenderer, CompletionRenderer, Renderer
from kivi_serve.server.state import ServerState, ServingEngine


@dataclass
class Job:
    """One HTTP request's work: token-id prompts, sampling options and how to answer."""

    id: str
    model: str
    prompts: list[list[int]]
    opts: SamplingOptions
    stream: bool
    renderer: type[Renderer]
    include_usage: bool = False
    echo_texts: list[str] | None = None
    logprobs: int | None = None  # completions: top-k; chat: top_logprobs (None: no logprobs)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def sequences(self) -> int:
        return len(self.prompts) * self.opts.n


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down.", code="shutting_down", headers={"Retry-After": "5"})


def require_engine(state: ServerState) -> ServingEngine:
    """The engine, if it serves; else 503 (draining, loading or gone)."""
    if state.draining:
        raise shutting_down()
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


def check_model(state: ServerState, model: str | None) -> str:
    name = state.engine.model_name
    if model is not None and model != name:
        raise APIError(
            404, f"The model `{clip(model)}` does not exist.", param="model", code="model_not_found"
        )
    return name


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


def _invalid(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _max_tokens(
    state: ServerState, requested: int | None, prompt_len: int, default: int | None, what: str
) -> int:
    limit = state.engine.max_model_len
    cap = state.settings.max_tokens_limit
    if requested is not None and cap is not None and requested > cap:
        raise _invalid("max_tokens", f"max_tokens is {requested}, but this server allows at most {cap}.")
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


def _logit_bias(state: ServerState, bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    vocab = state.engine.vocab_size
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab:
            raise _invalid(
                "logit_bias", f"logit_bias key {clip(repr(key))} is not a token id in [0, {vocab})."
            )
        out[token] = float(value)
    return out


def _sampling(state: ServerState, req: Any, max_tokens: int, logprobs: int | None) -> SamplingOptions:
    """``req``'s sampling fields (both request kinds share them) as :class:`SamplingOptions`."""
    n = req.n if req.n is not None else 1
    if n > state.settings.max_n:
        raise _invalid("n", f"n is {n}, but this server allows at most {state.settings.max_n}.")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not x for x in stop):
        raise _invalid("stop", "stop sequences must not be empty strings.")
    logit_bias = _logit_bias(state, req.logit_bias)
    vocab = state.engine.vocab_size
    if req.top_k is not None and req.top_k > vocab:
        raise _invalid("top_k", f"top_k is {req.top_k}; it must be -1 or 0 (all tokens), or at most {vocab}.")
    min_tokens = req.min_tokens or 0
    if min_tokens > max_tokens:
        raise _invalid("min_tokens", f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens}).")
    opts = SamplingOptions(
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
    state.engine.sampling_params(opts)  # vLLM's own validation, before anything is streamed
    return opts


def _token_ids(state: ServerState, ids: list[int]) -> list[int]:
    vocab = state.engine.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise _invalid("prompt", f"token ids must be in [0, {vocab}); got {clip(bad, 32)}.")
    return ids


def _prompts(
    state: ServerState, items: list[str | list[int]], echo: bool
) -> tuple[list[list[int]], list[str]]:
    """Token ids of each prompt, and its text when echoed (runs in a worker thread: it tokenizes)."""
    engine = state.engine
    prompts: list[list[int]] = []
    texts: list[str] = []
    for item in items:
        if isinstance(item, str):
            ids = engine.encode(item)
            texts.append(item)
        else:
            ids = _token_ids(state, list(item))
            texts.append(engine.decode(ids) if echo else "")
        if not ids:
            raise APIError(400, "The prompt is empty.", param="prompt", code="empty_prompt")
        prompts.append(ids)
    return prompts, texts


def _include_usage(req: Any) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


async def completion_job(state: ServerState, req: CompletionRequest) -> Job:
    require_engine(state)
    model = check_model(state, req.model)
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
    try:
        prompts, texts = await state.off_loop(_prompts, state, items, bool(req.echo))
    except EngineRequestError as exc:
        raise api_error_for(exc) from None
    max_tokens = min(_max_tokens(state, req.max_tokens, len(ids), 16, "prompt") for ids in prompts)
    return Job(
        id=f"cmpl-{uuid.uuid4().hex}",
        model=model,
        prompts=prompts,
        opts=_sampling(state, req, max_tokens, req.logprobs),
        stream=bool(req.stream),
        renderer=CompletionRenderer,
        include_usage=_include_usage(req),
        echo_texts=texts if req.echo else None,
        logprobs=req.logprobs,
    )


async def chat_job(state: ServerState, req: ChatCompletionRequest) -> Job:
    engine = require_engine(state)
    model = check_model(state, req.model)
    if req.tools:
        raise APIError(400, "tools are not supported by this server.", param="tools", code="unsupported")
    if req.top_logprobs is not None and not req.logprobs:
        raise _invalid("top_logprobs", "top_logprobs requires logprobs to be true.")
    messages = []
    for m in req.messages:
        content = "".join(p.text for p in m.content) if isinstance(m.content, list) else m.content or ""
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    try:
        _, ids = await state.off_loop(engine.render_chat, messages)
    except EngineRequestError as exc:
        raise api_error_for(exc) from None
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = _max_tokens(state, requested, len(ids), None, "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return Job(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        model=model,
        prompts=[ids],
        opts=_sampling(state, req, max_tokens, logprobs),
        stream=bool(req.stream),
        renderer=ChatRenderer,
        include_usage=_include_usage(req),
        logprobs=logprobs,
    )
