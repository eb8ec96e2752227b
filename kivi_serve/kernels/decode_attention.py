"""CUDA decode attention: :func:`paged_attention` for batches of one new token per sequence.

Same signature and semantics as :func:`kivi_serve.kernels.reference.paged_attention`, restricted
to decode: ``query`` has exactly one row per sequence (``T == B``; sequence ``b``'s row is
``query_start_loc[b]``). Supported: float16/bfloat16 (query, key, value and staging in one
dtype), head_dim 64/128/256, page size 64/128/256 (256 at head_dim 256: sm_90 only), 2-bit K and V
codes, with or without the exact token, K outliers and wide K channels (3-bit keys on
``layout.wide_channels`` channels), rotated values (``layout.v_rotate``: P.V in the rotated space, in
fp16, each split's rows rotated back once), any GQA group
(up to 16 query heads per KV head share one pass over the pages; more take several), and the
layer semantics of :class:`~kivi_serve.kernels.semantics.LayerAttention` except the soft-cap: a
sliding window (pages wholly before it are never read; the first page it reaches and the staging
tail are masked per token) and sink logits (one per query head, in the combine's denominator). Prefill
batches go through :func:`kivi_serve.kernels.quantize_append.dequantize_blocks` and a dense
attention (or the reference).

Two launches on ``torch.cuda.current_stream()`` — the split-KV kernel and the log-sum-exp combine
— with no host sync: the grid depends only on shapes and host integers (``num_splits`` from the batch
size, the KV heads, the block table's width or ``max_seq_len``, and the SM count), so a call can be
captured in a CUDA graph; each sequence's share of the splits is decided on the device from its
length (``min_split_pages``).
Pass ``out`` and ``workspace`` (:func:`make_workspace`) to keep the captured graph allocation-free;
without them the call allocates from torch's caching allocator (also capture-safe in torch).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from kivi_serve.kernels import _checks, loader
from kivi_serve.kernels.semantics import LayerAttention

#: Upper bound of the page splits per sequence (partial buffers grow with it).
MAX_SPLITS = 128
LOG2E = 1.4426950408889634


def rows_per_tile(group: int) -> int:
    """Query heads per MMA tile: 8, or 16 for GQA groups above 8."""
    return 16 if group > 8 else 8


#: A CTA's fixed cost (loading q, the warps' merge, writing its partial), in pages of one warp's work,
#: in :func:`choose_num_splits`'s model. On an H200 (docs/performance.md, ninth session) a warp's page
#: took ~9 us and a one-page kernel ~21 us. With 2 the model picks 4 splits at page 128, batch 8: the
#: fastest count of the sweep at 32K, within 2 % of the fastest at 128K.
SPLIT_OVERHEAD_PAGES = 2


@functools.lru_cache(maxsize=4096)
def choose_num_splits(
    batch: int, num_kv_heads: int, group: int, max_pages: int, sm_count: int,
    ctas_per_sm: int = loader.ASSUMED_CTAS_PER_SM, min_split_pages: int = 1,
) -> int:  # fmt: skip
    """Page splits per (sequence, KV head, tile): the split count whose grid runs in the fewest, fullest
    waves of resident CTAs.

    Model: ``units = batch x KV heads x tiles`` CTAs per split, ``slots = sm_count x ctas_per_sm``
    resident at once; a CTA's time is its share of the pages plus :data:`SPLIT_OVERHEAD_PAGES`, the
    kernel's ``waves x`` that: ``cost(s) = ceil(units s / slots) x (ceil(max_pages / s) + overhead)``,
    the cheapest ``s`` (the smallest on a tie) in ``1 .. max_pages // min_split_pages`` (the kernel gives
    a split at least that many pages) and :data:`MAX_SPLITS`. On an H200 the previous rule (about two
    CTAs per SM, rounded up: 5 splits at batch 8) ran 1.21 waves, 13-18 % slower than 4 splits.
    """
    m_tiles = -(-group // rows_per_tile(group))
    units = max(1, batch * num_kv_heads * m_tiles)
    slots = max(1, sm_count * ctas_per_sm)
    cap = max(1, min(MAX_SPLITS, max_pages // max(1, min_split_pages)))

    def cost(s: int) -> tuple[int, int]:
        return -(-units * s // slots) * (-(-max_pages // s) + SPLIT_OVERHEAD_PAGES), s

    return min(range(1, cap + 1), key=cost)


def make_workspace(
    batch: int, num_q_heads: int, head_dim: int, num_splits: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial-result buffers for ``num_splits`` page splits: (part_o, part_lse), float32."""
    ns = num_splits + 1
    return (
        torch.empty(batch * num_q_heads * ns * head_dim, dtype=torch.float32, device=device),
        torch.empty(batch * num_q_heads * ns, dtype=torch.float32, device=device),
    )


def paged_attention(
    query: Tensor, key: Tensor, value: Tensor, kv_pages: Tensor, staging: Tensor,
    block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor, tail_slots: Tensor,
    layout, scale: float | None = None, attn: LayerAttention | None = None, *,
    out: Tensor | None = None, workspace: tuple[Tensor, Tensor] | None = None,
    num_splits: int | None = None, min_split_pages: int | None = None, max_seq_len: int | None = None,
) -> Tensor:  # fmt: skip
    """Decode attention over the paged 2-bit cache + the staging tail + each sequence's new token.

    Arguments and result as :func:`kivi_serve.kernels.reference.paged_attention` (``layout``: a
    PageLayout), on one CUDA device: float16 or bfloat16 ``query`` (B, Hq, D) with ``key``, ``value``,
    ``out`` and model-dtype staging in its dtype, int32 index tensors, one row per sequence. Also:

    attn : LayerAttention, optional — sliding window and sink logits (shape (Hq,), any float dtype,
        on the query's device; converted to fp32 per call: pass fp32 to skip a copy). A soft-cap is
        refused (ValueError): the kernel does not apply one.
    out : torch.Tensor, shape (B, Hq, D), dtype of ``query``, optional
    workspace : (part_o, part_lse), optional — float32, at least ``B*Hq*(num_splits+1)*D`` and
        ``B*Hq*(num_splits+1)`` elements (see :func:`make_workspace`).
    num_splits : int, optional — the grid's page splits per sequence (default:
        :func:`choose_num_splits`). A sequence uses fewer when it is short: see ``min_split_pages``.
    min_split_pages : int, optional — the kernel gives a sequence at most ``pages // min_split_pages``
        splits (at least one), decided on the device from its length, so a captured graph adapts too.
        Default: warps per CTA x cp.async stages, so every warp's pipeline has pages to overlap.
    max_seq_len : int, optional — a host-side upper bound of ``seq_lens`` (vLLM gives the metadata
        builder one); bounds the default ``num_splits`` by the pages a sequence can have instead of
        the block table's width. Never read from the device.
    """
    named = _checks.decode_arguments(
        query, key, value, kv_pages, staging, block_tables, seq_lens, query_start_loc, tail_slots, out,
        layout, _checks.MODEL_DTYPES,
    )  # fmt: skip
    B, Hq, D = query.shape
    H, P = key.shape[1], layout.page_size
    pages = kv_pages.view(kv_pages.shape[0], H, layout.page_bytes)
    if block_tables.shape[0] != B:
        raise ValueError(
            f"block_tables must have one row per sequence ({B}), got {tuple(block_tables.shape)}"
        )
    spec = loader.spec_for(
        "decode_attention", layout, query.dtype, rows16=query.shape[1] // H > 8,
        staging=int(staging.dtype == torch.uint8),
    )
    scale = _checks.softmax_scale(scale, D)
    device = _checks.devices(**named)
    window, sinks_log2 = _semantics(attn, query)
    G = Hq // H
    m_tiles = -(-G // rows_per_tile(G))
    max_pages = max(1, block_tables.shape[1])
    if max_seq_len is not None:
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 0:
            raise ValueError(f"max_seq_len must be a non-negative int, got {max_seq_len!r}")
        max_pages = max(1, min(max_pages, -(-(max_seq_len - 1) // P)))
    if num_splits is not None and not (isinstance(num_splits, int) and 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be an int in [1, {MAX_SPLITS}], got {num_splits!r}")
    if min_split_pages is not None and (
        isinstance(min_split_pages, bool) or not isinstance(min_split_pages, int) or min_split_pages < 1
    ):
        raise ValueError(f"min_split_pages must be a positive int, got {min_split_pages!r}")
    mod = loader.module_for(spec, device)
    if min_split_pages is None:
        min_split_pages = mod.threads // 32 * spec.stages
    if num_splits is None:
        num_splits = choose_num_splits(
            B, H, G, max_pages, loader.sm_count(device), mod.ctas_per_sm, min_split_pages
        )
    ns = num_splits + 1
    if workspace is None:
        workspace = make_workspace(B, Hq, D, num_splits, device)
    part_o, part_lse = workspace
    _checks.tensor("workspace[0]", part_o, dtype=torch.float32, dims=1)
    _checks.tensor("workspace[1]", part_lse, dtype=torch.float32, dims=1)
    _checks.devices(query=query, **{"workspace[0]": part_o, "workspace[1]": part_lse})
    if part_o.numel() < B * Hq * ns * D or part_lse.numel() < B * Hq * ns:
        raise ValueError(
            f"workspace too small for {num_splits} splits: need {B * Hq * ns * D} and {B * Hq * ns} floats"
        )
    if out is None:
        out = torch.empty(B, Hq, D, dtype=query.dtype, device=device)
    if B == 0:
        return out

    i32 = np.int32
    args = (
        loader.ptr(query),
        loader.ptr(key),
        loader.ptr(value),
        loader.ptr(pages),
        loader.ptr(staging),
        loader.ptr(block_tables),
        i32(block_tables.shape[1]),
        loader.ptr(seq_lens),
        loader.ptr(query_start_loc),
        loader.ptr(tail_slots),
        loader.ptr(part_o),
        loader.ptr(part_lse),
        i32(num_splits),
        i32(min_split_pages),
        i32(H),
        i32(G),
        i32(m_tiles),
        np.float32(scale * LOG2E),
        i32(window),
    )
    # num_splits CTAs per (sequence, KV head, tile): the staging tail's partial (index num_splits)
    # comes from one of them, not from a CTA of its own with the pages' shared memory
    grid = (num_splits, H * m_tiles, B)
    loader.launch(mod["kivi_decode"], grid, (mod.threads,), args, mod.smem_bytes, device)
    args = (
        loader.ptr(part_o),
        loader.ptr(part_lse),
        loader.ptr(out),
        loader.ptr(query_start_loc),
        i32(Hq),
        i32(ns),
        loader.ptr(sinks_log2),
    )
    loader.launch(mod["kivi_decode_combine"], (Hq, B), (D,), args, 0, device)
    return out


def _semantics(attn: LayerAttention | None, query: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """The kernel's view of a layer's semantics: (window, 0 for none; sinks x log2(e) as fp32 (Hq,) or None).
    Raises ValueError for what the kernel does not do (a soft-cap) and for malformed sinks."""
    if attn is None:
        return 0, None
    if not isinstance(attn, LayerAttention):
        raise TypeError(f"attn must be a LayerAttention, got {type(attn).__name__}")
    if attn.softcap is not None:
        raise ValueError(
            f"the CUDA decode kernel does not apply a logit soft-cap (this layer has {attn.describe()})"
        )
    window = int(attn.window or 0)
    if window > np.iinfo(np.int32).max:
        window = 0  # wider than any sequence the kernel indexes: no window
    sinks, num_q_heads = attn.sinks, query.shape[1]
    if sinks is None:
        return window, None
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point() or sinks.shape != (num_q_heads,):
        got = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise ValueError(f"attn.sinks must be a float tensor of shape ({num_q_heads},), got {got}")
    _checks.devices(query=query, sinks=sinks)
    return window, (sinks.detach().float() * LOG2E).contiguous()
