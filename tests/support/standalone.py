"""The correctness oracle: the same model, run by transformers, attention through the reference.

:class:`StandaloneRunner` generates greedily for one sequence at a time. Every attention layer is
replaced (transformers ``AttentionInterface``, name ``"kivi_reference"``) by a function that keeps
a real paged cache — uint8 pages laid out by :class:`~kivi_serve.quant.layout.PageLayout`, a
staging pool planned by :class:`~kivi_serve.backend.staging.StagingPool` — and calls
:func:`kivi_serve.kernels.reference.append_kv` and
:func:`~kivi_serve.kernels.reference.paged_attention`, exactly the spec the vLLM backend
implements. Prefill runs in chunks (``chunk_size``, default: the whole prompt in one step), then one
token per step, as vLLM schedules a lone request (see :meth:`StandaloneRunner.generate` for
chunked prefill and prefix-cache hits). No vLLM import.

The vLLM engine's greedy output must equal this runner's token for token
(``tests/test_backend_engine.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kivi_serve.backend.staging import AppendPlan, StagingPool
from kivi_serve.kernels import reference
from kivi_serve.quant import staging as staging_format
from kivi_serve.quant.layout import DEFAULT_PAGE_SIZE, PageLayout
from kivi_serve.quant.schemes import get_scheme

ATTN_IMPLEMENTATION = "kivi_reference"


@dataclass
class _Step:
    plan: AppendPlan
    block_table: torch.Tensor  # (1, pages)
    seq_len: int
    num_new: int


_ACTIVE: list = [None]  # the runner whose step is executing (transformers calls a plain function)


def _kivi_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query (1, Hq, T, D), key/value (1, Hkv, T, D), post-RoPE."""
    runner: StandaloneRunner = _ACTIVE[0]
    if runner is None or runner._step is None:
        raise RuntimeError("kivi_reference attention called outside StandaloneRunner.generate")
    if query.shape[0] != 1:
        raise ValueError("StandaloneRunner runs one sequence at a time")
    st = runner._step
    layer = module.layer_idx
    q = query[0].transpose(0, 1).contiguous()  # (T, Hq, D)
    k = key[0].transpose(0, 1).contiguous()
    v = value[0].transpose(0, 1).contiguous()
    pages, staging = runner.pages[layer], runner.staging[layer]
    reference.append_kv(st.plan, k, v, pages, staging, runner.layout)
    out = reference.paged_attention(
        q,
        k,
        v,
        pages,
        staging,
        st.block_table,
        torch.tensor([st.seq_len], dtype=torch.int32),
        torch.tensor([0, st.num_new], dtype=torch.int32),
        st.plan.tail_slots,
        runner.layout,
        scale=scaling,
    )
    return out.unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _kivi_reference_attention)


class StandaloneRunner:
    """Greedy generation with transformers + the reference paged cache (one sequence at a time).

    Parameters
    ----------
    model_path : str or Path
        A transformers model folder (e.g. ``resolve_model("smollm2")``).
    page_size : int
    num_blocks : int
        Pages per layer in the runner's own cache (block 0 is kept unused, like vLLM's null block).
    staging_slots : int
    dtype : torch.dtype
        Model dtype; the engine must use the same.
    staging_dtype : str
        The staging format (:mod:`kivi_serve.quant.staging`), the backend's default unless given.
    scheme : str or None
        The page format (a fitted-codebook scheme of :mod:`kivi_serve.quant.schemes`); default
        ``kivi-serve-2bit``'s layout.
    """

    def __init__(
        self,
        model_path: str | Path,
        page_size: int = DEFAULT_PAGE_SIZE,
        num_blocks: int = 64,
        staging_slots: int = 4,
        dtype: torch.dtype = torch.bfloat16,
        staging_dtype: str = staging_format.DEFAULT_STAGING_DTYPE,
        scheme: str | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        _register()
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_path), dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION
        )
        self.model.eval()
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        D = int(head_dim)
        self.layout = PageLayout(D, page_size) if scheme is None else get_scheme(scheme).layout(D, page_size)
        hkv = cfg.num_key_value_heads
        self.pages = [
            torch.zeros(num_blocks, hkv, self.layout.page_bytes, dtype=torch.uint8)
            for _ in range(cfg.num_hidden_layers)
        ]
        self.staging = [
            staging_format.new_staging(staging_slots, hkv, page_size, int(head_dim), dtype, staging_dtype)
            for _ in range(cfg.num_hidden_layers)
        ]
        self.pool = StagingPool(staging_slots, page_size)
        self.num_blocks = num_blocks
        self._next_block = 1
        self._step: _Step | None = None

    def _blocks(self, n: int) -> list[int]:
        """Fresh block ids, round-robin over 1..num_blocks-1 (block 0 stays the null block)."""
        out = []
        for _ in range(n):
            out.append(self._next_block)
            self._next_block = self._next_block % (self.num_blocks - 1) + 1
        return out

    def generate(
        self, prompt: list[int], max_new_tokens: int, chunks: int | list[int] | None = None
    ) -> list[int]:
        """Greedy continuation of ``prompt`` (token ids): ``max_new_tokens`` ids (EOS is not special).

        ``chunks`` is the prefill schedule: ``None`` = the whole prompt in one step; an int = steps of
        that many tokens (vLLM's ``max_num_batched_tokens`` for a lone request); a list = explicit
        chunk sizes (e.g. ``[256, rest]`` after a 256-token prefix-cache hit: the cached pages are
        what a first chunk of 256 tokens writes), the last one extended to the end of the prompt.
        """
        return self.run(prompt, max_new_tokens, chunks)[0]

    def score(
        self, prompt: list[int], continuation: list[int], chunks: int | list[int] | None = None
    ) -> torch.Tensor:
        """Teacher-forced: the log-probabilities the runner gives each next token while it is fed
        ``continuation`` (e.g. what an engine generated) on the same schedule as :meth:`generate`.

        Returns (len(continuation), vocab) float64: row ``i`` is the distribution of the token at
        position ``len(prompt) + i``.
        """
        return self.run(prompt, len(continuation), chunks, forced=continuation)[1]

    @torch.no_grad()
    def run(
        self,
        prompt: list[int],
        max_new_tokens: int,
        chunks: int | list[int] | None = None,
        forced: list[int] | None = None,
    ) -> tuple[list[int], torch.Tensor]:
        """Generate (greedy, or the ``forced`` tokens) and return ``(tokens, log-probs (n, vocab))``."""
        P = self.layout.page_size
        total = len(prompt) + max_new_tokens
        n_pages = -(-total // P)
        if n_pages >= self.num_blocks:
            raise ValueError(
                f"sequence of {total} tokens needs {n_pages} pages; runner has {self.num_blocks - 1}"
            )
        if chunks is None:
            sizes = [len(prompt)]
        elif isinstance(chunks, int):
            sizes = [chunks] * (-(-len(prompt) // chunks))
        else:
            sizes = list(chunks)
        bounds, pos = [], 0
        for i, n in enumerate(sizes):
            end = len(prompt) if i == len(sizes) - 1 else min(len(prompt), pos + n)
            if end > pos:
                bounds.append((pos, end))
            pos = end
        table = self._blocks(n_pages)
        bt = torch.tensor([table], dtype=torch.int32)
        tokens = list(prompt)
        out: list[int] = []
        logprobs: list[torch.Tensor] = []
        _ACTIVE[0] = self
        try:
            steps = bounds + [None] * (max_new_tokens - 1)
            for bound in steps:
                lo, hi = bound if bound is not None else (len(tokens) - 1, len(tokens))
                plan = self.pool.plan([table], [hi], [hi - lo])
                self._step = _Step(plan, bt, hi, hi - lo)
                ids = torch.tensor([tokens[lo:hi]], dtype=torch.long)
                pos_ids = torch.arange(lo, hi, dtype=torch.long).unsqueeze(0)
                logits = self.model(input_ids=ids, position_ids=pos_ids, use_cache=False).logits
                if hi >= len(prompt):
                    last = logits[0, -1].double()
                    logprobs.append(torch.log_softmax(last, -1))
                    nxt = int(last.argmax()) if forced is None else int(forced[len(out)])
                    out.append(nxt)
                    tokens.append(nxt)
        finally:
            self._step = None
            _ACTIVE[0] = None
        return out, torch.stack(logprobs)
