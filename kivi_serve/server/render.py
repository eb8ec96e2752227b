"""Rendering: a job's engine steps folded into choices, usage and timings, and written as OpenAI JSON.

:class:`Renderer` folds the steps (both APIs alike); :class:`CompletionRenderer` and
:class:`ChatRenderer` write a whole response, or the chunks of a stream, in their API's shape.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from kivi_serve import __version__
from kivi_serve.engine.types import CompletionDelta, StepOutput, TokenLogprob

if TYPE_CHECKING:
    from kivi_serve.server.jobs import Job

#: Stand-in for -inf in logprobs (JSON has no infinity).
MIN_LOGPROB = -9999.0


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


class Renderer:
    """Folds engine steps into choices (key ``prompt * n + index``), usage and timings."""

    object: ClassVar[str]  # the whole response's ``object``
    chunk_object: ClassVar[str]  # a stream chunk's ``object``

    def __init__(self, job: Job):
        self.job = job
        self.choices: dict[int, Choice] = {}
        self.t0 = time.monotonic()
        self.t_first: float | None = None
        self.t_last: float | None = None

    def echo(self, p: int) -> str:
        return self.job.echo_texts[p] if self.job.echo_texts is not None else ""

    def add(self, p: int, step: StepOutput) -> None:
        now = time.monotonic()
        for d in step.deltas:
            key = p * self.job.opts.n + d.index
            c = self.choices.get(key)
            if c is None:
                c = self.choices[key] = Choice(offset=len(self.echo(p)))
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
        """(time to first token, end to end, time per output token after the first), seconds."""
        end = self.t_last or time.monotonic()
        ttft = None if self.t_first is None else self.t_first - self.t0
        most = max((c.tokens for c in self.choices.values()), default=0)
        tpot = None
        if self.t_first is not None and most > 1:
            tpot = (end - self.t_first) / (most - 1)
        return ttft, end - self.t0, tpot

    # -- JSON
    def response(self) -> dict:
        job = self.job
        return {
            "id": job.id,
            "object": self.object,
            "created": job.created,
            "model": job.model,
            "choices": [self.choice(key, c) for key, c in sorted(self.choices.items())],
            "usage": self.usage(),
            "system_fingerprint": f"kivi-serve-{__version__}",
        }

    def chunk(self, choices: list[dict]) -> dict:
        job = self.job
        out = {"id": job.id, "object": self.chunk_object, "created": job.created, "model": job.model}
        out["choices"] = choices
        if job.include_usage:
            out["usage"] = None
        return out

    def stream_chunks(self, p: int, step: StepOutput) -> list[dict]:
        """Fold ``step`` (of prompt ``p``) and return the stream chunks it makes."""
        self.add(p, step)
        out = []
        for d in step.deltas:
            key = p * self.job.opts.n + d.index
            out += [self.chunk([choice]) for choice in self.delta(p, key, self.choices[key], d)]
        return out

    def usage_chunk(self) -> dict:
        out = self.chunk([])
        out["usage"] = self.usage()
        return out

    def choice(self, key: int, c: Choice) -> dict:
        """One choice of the whole response."""
        raise NotImplementedError

    def delta(self, p: int, key: int, c: Choice, d: CompletionDelta) -> list[dict]:
        """The stream choices that delta ``d`` of choice ``key`` makes (one chunk each)."""
        raise NotImplementedError


class CompletionRenderer(Renderer):
    object = chunk_object = "text_completion"

    def logprobs(self, c: Choice, items: list[TokenLogprob]) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in items:
            out["tokens"].append(lp.token)
            out["token_logprobs"].append(_lp(lp.logprob))
            out["top_logprobs"].append({tok: _lp(v) for _, tok, v in lp.top} if self.job.logprobs else None)
            out["text_offset"].append(c.offset)
            c.offset += len(lp.token)
        return out

    def choice(self, key: int, c: Choice) -> dict:
        echo = self.echo(key // self.job.opts.n)
        lps = None
        if self.job.logprobs is not None:
            c.offset = len(echo)
            lps = self.logprobs(c, c.logprobs)
        text = echo + "".join(c.text)
        return {"index": key, "text": text, "logprobs": lps, "finish_reason": c.finish_reason}

    def delta(self, p: int, key: int, c: Choice, d: CompletionDelta) -> list[dict]:
        text = d.text
        if not c.started:
            c.started = True
            text = self.echo(p) + text
        if not (text or d.finish_reason or d.logprobs):
            return []
        lps = self.logprobs(c, d.logprobs) if self.job.logprobs is not None and d.logprobs else None
        return [{"index": key, "text": text, "logprobs": lps, "finish_reason": d.finish_reason}]


class ChatRenderer(Renderer):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    @staticmethod
    def logprobs(items: list[TokenLogprob]) -> dict:
        def top(tok: str, v: float) -> dict:
            return {"token": tok, "logprob": _lp(v), "bytes": list(tok.encode("utf-8"))}

        return {
            "content": [
                {**top(lp.token, lp.logprob), "top_logprobs": [top(tok, v) for _, tok, v in lp.top]}
                for lp in items
            ]
        }

    def choice(self, key: int, c: Choice) -> dict:
        return {
            "index": key,
            "message": {"role": "assistant", "content": "".join(c.text)},
            "logprobs": self.logprobs(c.logprobs) if self.job.logprobs is not None else None,
            "finish_reason": c.finish_reason,
        }

    def delta(self, p: int, key: int, c: Choice, d: CompletionDelta) -> list[dict]:
        out = []
        if not c.started:
            c.started = True
            role = {"role": "assistant", "content": ""}
            out.append({"index": key, "delta": role, "logprobs": None, "finish_reason": None})
        if d.text or d.logprobs or d.finish_reason:
            lps = self.logprobs(d.logprobs) if self.job.logprobs is not None and d.logprobs else None
            content = {"content": d.text} if d.text else {}
            out.append({"index": key, "delta": content, "logprobs": lps, "finish_reason": d.finish_reason})
        return out
