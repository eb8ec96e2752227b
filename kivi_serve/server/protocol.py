"""Pydantic models of the OpenAI API subset we serve (requests, responses, stream chunks, errors).

Field bounds here are the API contract (and what /openapi.json tells clients and schemathesis);
bounds that depend on the running server (context length, ``--max-n``, ``--max-tokens-limit``) are
checked in :mod:`kivi_serve.server.jobs`, token ids too (their range is the vocabulary's). Unknown
request fields are ignored, as vLLM does, so newer SDKs keep working.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_LOGPROBS = 20
MAX_STOP = 16
MAX_SEED = 2**63 - 1

FinishReason = Literal["stop", "length", "abort"]


class _Request(BaseModel):
    # NaN and infinities are no number a client means (the JSON decoder refuses them too).
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# ------------------------------------------------------------------------------------------ errors
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


# ----------------------------------------------------------------------------------------- sampling
class StreamOptions(_Request):
    include_usage: bool | None = Field(
        False, description="Send a last chunk with `usage` (and `usage: null` before)."
    )


class _Sampling(_Request):
    """Parameters shared by completions and chat completions (``None`` means the default)."""

    model: str | None = Field(None, description="The served model name (default: the only model served).")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(
        None,
        ge=-1,
        description="Extension: sample from the k best tokens (0 or -1: all; at most the vocabulary size).",
    )
    n: int | None = Field(None, ge=1, description="Choices per prompt.")
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0, description="Extension (vLLM).")
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = Field(False, description="Extension: keep generating past end-of-sequence.")
    min_tokens: int | None = Field(None, ge=0, description="Extension: generate at least this many tokens.")


class CompletionRequest(_Sampling):
    prompt: (
        Annotated[str, Field(max_length=4_000_000)]
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    )
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Top alternatives per token.")
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1, description="Only best_of == n is supported.")
    suffix: str | None = Field(None, description="Not supported (must be empty).")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ResponseFormat(_Request):
    type: Literal["text"] = "text"


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens (wins if both).")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = Field(None, description="Not supported (must be empty).")


# --------------------------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class _Response(BaseModel):
    """The envelope of a (chat) completion; each kind sets ``object`` and ``choices``."""

    id: str
    object: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list
    usage: Usage
    system_fingerprint: str | None = None


class _StreamEvent(BaseModel):
    """The envelope of one ``data:`` event of a stream (documentation of the SSE stream)."""

    id: str
    object: str
    created: int
    model: str
    choices: list
    usage: Usage | None = None


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class CompletionStreamResponse(_StreamEvent):
    """One ``data:`` event of a streamed completion (documentation of the SSE stream)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionStreamResponse(_StreamEvent):
    """One ``data:`` event of a streamed chat completion (documentation of the SSE stream)."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]


# -------------------------------------------------------------------------------------- the rest
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kivi-serve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: Literal["ok", "failed"]
    detail: str | None = None


class ReadyResponse(BaseModel):
    status: Literal["ready", "loading", "draining", "failed", "stopped"]
    detail: str | None = None


class VersionResponse(BaseModel):
    version: str
    vllm_version: str | None = None
    engine: dict | None = None
