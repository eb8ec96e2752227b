"""Prefill attention on the CPU: vLLM's own CPU attention op over a scratch of the dequantized context.

A prefill row attends its cached context (2-bit pages) and its own new tokens, causally. The C++
kernels dequantize the row's context pages to a scratch of ``(pages, Hkv, P, D)`` in the model's
dtype (:meth:`KiviAttentionImpl._context_pages`); this module adds the pages the row's own tokens
open (*spare* pages, after all context pages), writes the own tokens exactly (as the model computed
them, not quantized) at their positions, and hands the scratch to vLLM's
``cpu_attention_with_kv_cache`` — the op of vLLM's ``CPU_ATTN`` backend, the same kernel the default
backend runs its prefill with — with a block table into the scratch. Why this op and not torch SDPA
(measured: ~1.8x faster on the same chunk) is in docs/design.md ("Prefill attention on the CPU").

Sliding windows, logit soft-caps and sink logits are the op's own arguments, with the semantics of
:mod:`kivi_serve.kernels.semantics` (tested against fp64 attention). Everything here but the op call
is per step: :func:`plan_paged_prefill` runs once in the metadata builder, on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kivi_serve.backend import paged_bf16_decode_cpu
from kivi_serve.kernels.semantics import LayerAttention


@dataclass
class PagedPrefill:
    """Where a step's prefill rows sit in the scratch cache (shared by every layer of the step).

    block_table : (R, max_pages) int32 — scratch page of each logical page of each row: the row's
        context pages are entries ``page0 ...`` of the dequantized context (``PrefillMetadata.blocks``
        order), the pages its own tokens open are spare pages numbered after all context pages.
    seq_lens : (R,) int32 — tokens each row attends (``ctx - start + n``).
    query_start_loc : (R + 1,) int32 — the rows' query offsets, relative to the first prefill token.
    token_pages, token_offsets : (N,) int64 — scratch page and in-page offset of each prefill token
        (``N`` = the step's prefill tokens, in batch order).
    pad_pages, pad_offsets : (M,) int64 — the slots after each row's last token in its last page: vLLM's
        kernel multiplies them by a zero weight, so they are zeroed (stale bytes there could be inf/NaN).
    num_spare : int — spare pages after the context pages.
    """

    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    token_pages: torch.Tensor
    token_offsets: torch.Tensor
    pad_pages: torch.Tensor
    pad_offsets: torch.Tensor
    num_spare: int
    #: vLLM's scheduler metadata per (query heads, head_dim, dtype, threads): made by the first layer
    #: that needs it, reused by the others (it depends on the step's lengths, not on the layer).
    scheduler: dict = field(default_factory=dict, repr=False)


def plan_paged_prefill(rows: list[tuple[int, ...]], num_ctx_pages: int, P: int) -> PagedPrefill:
    """The scratch layout of a step's prefill rows (host work, once per step).

    rows : ``(q0, q1, ctx, page0, start)`` per row, as ``PrefillMetadata.rows`` · num_ctx_pages : the
    number of context pages (``PrefillMetadata.blocks``) · P : page size.
    """
    lo = rows[0][0]
    lens = [ctx - start + q1 - q0 for q0, q1, ctx, _, start in rows]
    width = max(-(-L // P) for L in lens)
    table = np.zeros((len(rows), width), dtype=np.int32)
    tok_pages, tok_offs, pad_pages, pad_offs = [], [], [], []
    spare = num_ctx_pages
    for r, ((_, _, ctx, page0, start), L) in enumerate(zip(rows, lens)):
        n_ctx = -(-(ctx - start) // P)
        n_all = -(-L // P)
        table[r, :n_ctx] = np.arange(page0, page0 + n_ctx)
        table[r, n_ctx:n_all] = np.arange(spare, spare + n_all - n_ctx)
        spare += n_all - n_ctx
        pos = np.arange(ctx - start, L)  # the row's own tokens, after its context
        tok_pages.append(table[r, pos // P].astype(np.int64))
        tok_offs.append(pos % P)
        pad = np.arange(L, n_all * P)
        pad_pages.append(table[r, pad // P].astype(np.int64))
        pad_offs.append(pad % P)
    cu = np.cumsum([0] + [q1 - q0 for q0, q1, *_ in rows]).astype(np.int32)
    assert int(cu[-1]) == rows[-1][1] - lo, "prefill rows must be contiguous in the batch"
    return PagedPrefill(
        block_table=torch.from_numpy(table),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        query_start_loc=torch.from_numpy(cu),
        token_pages=torch.from_numpy(np.concatenate(tok_pages)),
        token_offsets=torch.from_numpy(np.concatenate(tok_offs).astype(np.int64)),
        pad_pages=torch.from_numpy(np.concatenate(pad_pages)),
        pad_offsets=torch.from_numpy(np.concatenate(pad_offs).astype(np.int64)),
        num_spare=spare - num_ctx_pages,
    )


def available(dtype: torch.dtype) -> bool:
    """Whether vLLM's CPU attention op is installed (it runs fp32, fp16 and bf16)."""
    return dtype in (torch.float32, torch.float16, torch.bfloat16) and paged_bf16_decode_cpu() is not None


def attend(
    pp: PagedPrefill,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_scratch: torch.Tensor,
    v_scratch: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    attn: LayerAttention | None = None,
) -> None:
    """Causal attention of the prefill tokens over their context and themselves, into ``out``, with
    ``attn``'s sliding window, logit soft-cap and sink logits (:mod:`kivi_serve.kernels.semantics`;
    vLLM's op implements the same three, tested against fp64 attention).

    query : (N, Hq, D) · key, value : (N, Hkv, D) — the step's prefill tokens, in batch order ·
    k_scratch, v_scratch : (num_ctx_pages + pp.num_spare, Hkv, P, D), contiguous, the model's dtype —
    the rows' context pages (dequantized, open tails read from staging); the own tokens are written
    into them here · out : (N, Hq, D), the model's dtype. A row whose context starts at ``start > 0``
    (a window's freed pages) is attended with positions shifted by ``start``: the window only sees
    distances, so nothing changes.
    """
    window = -1 if attn is None or attn.window is None else int(attn.window)
    softcap = 0.0 if attn is None or attn.softcap is None else float(attn.softcap)
    sinks = None if attn is None or attn.sinks is None else attn.sinks.float()
    op = paged_bf16_decode_cpu()
    dtype = k_scratch.dtype
    N, Hkv, P, D = k_scratch.shape
    Hq = query.shape[1]
    # the own tokens exactly as the model computed them (a row's partial last context page gets them
    # after its context tokens, the rest go to its spare pages)
    k_scratch[pp.token_pages, :, pp.token_offsets] = key.to(dtype)
    v_scratch[pp.token_pages, :, pp.token_offsets] = value.to(dtype)
    k_scratch[pp.pad_pages, :, pp.pad_offsets] = 0
    v_scratch[pp.pad_pages, :, pp.pad_offsets] = 0
    # vLLM's op reads its pages in a layout of its ISA's own (keys packed differently from (P, D) on
    # AVX-512, measured): its own reshape_and_cache writes them, every slot of the scratch
    isa = op.isa(dtype, P, D)
    k_cache, v_cache = torch.empty_like(k_scratch), torch.empty_like(v_scratch)
    op.reshape_and_cache(
        k_scratch.transpose(1, 2).reshape(N * P, Hkv, D),
        v_scratch.transpose(1, 2).reshape(N * P, Hkv, D),
        k_cache, v_cache, torch.arange(N * P), isa,
    )  # fmt: skip
    threads = torch.get_num_threads()
    sched_key = (Hq, D, dtype, threads, window)
    meta = pp.scheduler.get(sched_key)
    if meta is None:
        meta = pp.scheduler[sched_key] = op.scheduler_metadata(
            num_reqs=pp.seq_lens.shape[0], num_heads=Hq, num_kv_heads=Hkv, head_dim=D,
            seq_lens=pp.seq_lens, dtype=dtype, query_start_loc=pp.query_start_loc, causal=True,
            sliding_window_size=window, isa=isa, enable_kv_split=_split_kv(),
        )  # fmt: skip
    dense_out = out.is_contiguous()
    o = out if dense_out else torch.empty(out.shape, dtype=out.dtype)
    op.attention(
        query=query if query.is_contiguous() else query.contiguous(),
        key_cache=k_cache, value_cache=v_cache, output=o, query_start_loc=pp.query_start_loc,
        seq_lens=pp.seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=window,
        block_table=pp.block_table, softcap=softcap, scheduler_metadata=meta, s_aux=sinks,
    )  # fmt: skip
    if not dense_out:
        out.copy_(o)


def _split_kv() -> bool:
    from vllm import envs

    return bool(envs.VLLM_CPU_ATTN_SPLIT_KV)
