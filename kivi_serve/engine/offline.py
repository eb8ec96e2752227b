"""An in-process vLLM engine for evaluations: token ids in, greedy tokens and log-probabilities out.

    with OfflineEngine("smollm2", "kivi-serve-2bit", max_model_len=8192) as eng:
        eng.prefill(docs)                      # fills the prefix cache with each document's pages
        answers = eng.greedy(prompts, 8)       # list of generated token-id lists
        scored = eng.score(prompts_with_answers, starts)  # (logprob, rank) of each token from start

``scheme="fp16"`` is vLLM's own attention backend (the unquantized reference); every quantized scheme
of :mod:`kivi_serve.quant.schemes` is kivi-serve's backend storing pages in that format
(:func:`kivi_serve.backend.engine_overrides`). Both run at the same block size, so their schedules
and prefix-cache hits are identical.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, executor ``uni``): one engine
at a time, :meth:`close` frees its KV cache before the next one starts.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kivi_serve.backend import engine_overrides
from kivi_serve.quant.schemes import SCHEMES

#: The scheme name that means vLLM's own attention backend.
DEFAULT_BACKEND_SCHEME = "fp16"
#: KV cache budget on CPU when ``VLLM_CPU_KVCACHE_SPACE`` is not set (GiB).
DEFAULT_CPU_KV_GIB = 2.0

log = logging.getLogger("kivi_serve.engine.offline")


@dataclass(frozen=True)
class Completion:
    """Greedy output of one prompt; ``cached_tokens``: prompt tokens served from the prefix cache."""

    token_ids: list[int]
    cached_tokens: int


@dataclass(frozen=True)
class Scored:
    """Teacher-forced log-probabilities and ranks (1 = most likely) of a prompt's last tokens."""

    logprobs: list[float]
    ranks: list[int]
    cached_tokens: int


def resolve_dtype(dtype: str) -> str:
    """``auto`` → ``float32`` on the CPU platform (faster there than bf16 on most CPUs, and the
    accuracy harness's dtype), else the model's own dtype (vLLM's ``auto``)."""
    if dtype != "auto":
        return dtype
    from vllm.platforms import current_platform

    return "float32" if current_platform.is_cpu() else "auto"


def step_groups(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` in consecutive groups whose sums fit ``budget`` (one engine step each);
    an item longer than the budget is a group of its own (vLLM prefills it in ``budget``-token chunks).
    """
    groups: list[list[int]] = []
    used = budget + 1
    for i, n in enumerate(lengths):
        if used + n > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


class OfflineEngine:
    """``vllm.LLM`` on one KV scheme, greedy, with the prefix cache on.

    Parameters
    ----------
    model : str or Path
        ``smollm2`` or a local model folder.
    scheme : str
        ``fp16`` (vLLM's default backend) or a quantized scheme name (kivi-serve's backend).
    max_model_len : int
        Longest prompt + answer, in tokens.
    dtype : str
        Model dtype (``auto``: see :func:`resolve_dtype`).
    page_size : int
        Tokens per page == vLLM block size, for both backends.
    max_num_batched_tokens : int or None
        Tokens per engine step: longer prompts are prefilled in chunks of this many tokens, each
        reading the earlier chunks' pages from the cache (default ``max_model_len``: one chunk).
    """

    def __init__(
        self,
        model: str | Path,
        scheme: str,
        *,
        max_model_len: int,
        dtype: str = "auto",
        page_size: int = 128,
        max_num_batched_tokens: int | None = None,
        max_num_seqs: int = 16,
        seed: int = 0,
    ) -> None:
        if scheme != DEFAULT_BACKEND_SCHEME and scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # read when vLLM is first imported
        from vllm import LLM
        from vllm.platforms import current_platform

        from kivi_serve.model.prepare import resolve_model

        path = resolve_model(str(model))
        self.scheme = scheme
        self.budget = int(max_num_batched_tokens or max_model_len)
        args: dict[str, Any] = dict(
            model=str(path),
            tokenizer=str(path),
            dtype=resolve_dtype(dtype),
            max_model_len=int(max_model_len),
            max_num_batched_tokens=self.budget,
            max_num_seqs=int(max_num_seqs),
            enable_prefix_caching=True,
            enforce_eager=True,
            distributed_executor_backend="uni",
            block_size=int(page_size),
            seed=int(seed),
        )
        if current_platform.is_cpu():
            gib = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or DEFAULT_CPU_KV_GIB)
            args["kv_cache_memory_bytes"] = int(gib * (1 << 30))
        if scheme != DEFAULT_BACKEND_SCHEME:
            args.update(engine_overrides(page_size, scheme=scheme))
        self.llm = LLM(**args)

    # ------------------------------------------------------------------ requests
    def _run(self, prompts: Sequence[Sequence[int]], params) -> list:
        from vllm.inputs import TokensPrompt

        return self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
        )

    def prefill(self, prompts: Sequence[Sequence[int]]) -> None:
        """Run each prompt (one generated token, discarded) so that its full pages enter the prefix
        cache. Each prompt is computed from its first token (it does not read pages other prompts
        left in the cache), in chunks of the step budget: prompts that fit are sent in groups that
        fill one step, so that none is split; a longer one goes alone, in budget-sized chunks."""
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=1, temperature=0.0, detokenize=False, skip_reading_prefix_cache=True
        )
        for group in step_groups([len(p) for p in prompts], self.budget):
            self._run([prompts[i] for i in group], params)

    def greedy(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[Completion]:
        """Greedy continuation of each prompt (``max_tokens`` tokens, or fewer at EOS)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=int(max_tokens), temperature=0.0, detokenize=False)
        return [
            Completion(list(o.outputs[0].token_ids), int(o.num_cached_tokens or 0))
            for o in self._run(prompts, params)
        ]

    def score(self, prompts: Sequence[Sequence[int]], starts: Sequence[int]) -> list[Scored]:
        """Teacher-forced log-probability and rank of the tokens ``prompt[start:]`` of each prompt.

        The prefix cache is read (vLLM's default for
        prompt log-probabilities is to recompute the whole prompt): positions served from the cache
        get no log-probability, so ``start`` must lie past the prompt's last full cached page —
        :meth:`prefill` with a strict prefix of the prompt guarantees it.
        """
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=0,
            skip_reading_prefix_cache=False,
            detokenize=False,
        )
        for p, start in zip(prompts, starts):
            if not 0 < start < len(p):
                raise ValueError(f"start must be in [1, {len(p) - 1}], got {start}")
        out = []
        for o, p, start in zip(self._run(prompts, params), prompts, starts):
            cached = int(o.num_cached_tokens or 0)
            if start <= cached:  # positions served from the cache carry no log-probability
                raise ValueError(f"token {start} was served from the prefix cache (hit of {cached} tokens)")
            got = [o.prompt_logprobs[pos][p[pos]] for pos in range(start, len(p))]
            out.append(Scored([float(g.logprob) for g in got], [int(g.rank) for g in got], cached))
        return out

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop the engine and free its KV cache (so that the next one can start)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as exc:  # noqa: BLE001 — best effort: the process goes on
            log.debug("engine shutdown: %s", exc)
        del llm
        gc.collect()
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception as exc:  # noqa: BLE001
            log.debug("cleanup: %s", exc)

    def __enter__(self) -> OfflineEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
