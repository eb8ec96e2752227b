"""The spec: every kivi-serve kernel, in plain PyTorch. The CUDA kernels must match it.

Shapes (per layer): ``Hq`` query heads, ``Hkv`` KV heads (``Hq % Hkv == 0``, GQA group
``G = Hq // Hkv``), ``D`` head_dim, ``P`` page size, ``NB`` vLLM blocks, ``S`` staging slots.

- ``kv_pages``: uint8 ``[NB, Hkv, P * C]`` (a ``[NB, Hkv, P, C]`` view is accepted): one page per
  (block, KV head), written and read by a page codec (:mod:`kivi_serve.quant.codec`: the 2-bit
  :class:`~kivi_serve.quant.layout.PageLayout` format, whose encoder and decoder are
  :mod:`kivi_serve.quant.page`, or full-precision debug pages). Every function takes the codec, or
  a bare ``PageLayout`` for the 2-bit codec with fitted codebooks.
- ``staging``: ``[S, 2, Hkv, P, W]``: the open (still filling) page of a sequence; ``[:, 0]`` keys,
  ``[:, 1]`` values. Its format (:mod:`kivi_serve.quant.staging`) follows from its dtype: the model
  dtype (``W = D``), or uint8 int8 rows with a per-(token, head) fp32 scale (``W = D + 4``, the
  default). Staged values are written with :func:`~kivi_serve.quant.staging.store` and read with
  :func:`~kivi_serve.quant.staging.load`; pages are quantized from what staging holds.

**Semantics of attention** (what the engine computes, what the accuracy harness simulates):
a query at position ``t`` in a chunk of new tokens ``[c, c + T)`` sees every token of its own
chunk up to ``t`` exactly (from the layer's input ``key``/``value``), and every earlier token
``s < c`` as the cache holds it *after* this step's append: dequantized if ``s``'s page has been
finalised (it became full, or was finalised early), else from the staging slot (exact with
model-dtype staging, int8-rounded with compact staging).
Decode is the case ``T = 1``. A layer's :class:`~kivi_serve.kernels.semantics.LayerAttention`
narrows what a query sees (sliding window) and changes the softmax (soft-cap, sink logits); the
pages wholly before the window of the chunk's first query are never read (vLLM frees them).

**Page lifecycle.** Tokens of a page that is still filling live in a staging slot; when a page
fills (or must be finalised early because the staging pool ran out) it is quantized from the
tokens present into its block. A page's *fill* is the number of valid tokens it was finalised with.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from kivi_serve.kernels import semantics
from kivi_serve.kernels.semantics import LayerAttention
from kivi_serve.quant import staging as staging_format
from kivi_serve.quant.codec import PageCodec, as_codec
from kivi_serve.quant.layout import PageLayout
from kivi_serve.quant.page import check_float


def pages_view(kv_pages: torch.Tensor, fmt: PageCodec | PageLayout, name: str = "kv_pages") -> torch.Tensor:
    """vLLM's uint8 ``[NB, Hkv, P, C]`` layer cache (or ``[NB, Hkv, P * C]``) as ``[NB, Hkv, page_bytes]``.

    ``fmt``: anything with the page's ``page_size``, ``slot_bytes`` and ``page_bytes`` (a codec or a
    layout); ``name`` names the argument in the ValueError."""
    if kv_pages.dtype != torch.uint8:
        raise ValueError(f"{name} must be uint8, got {kv_pages.dtype}")
    if kv_pages.dim() == 4:
        if tuple(kv_pages.shape[2:]) != (fmt.page_size, fmt.slot_bytes):
            raise ValueError(
                f"{name} must be [blocks, kv_heads, {fmt.page_size}, {fmt.slot_bytes}], "
                f"got {tuple(kv_pages.shape)}"
            )
        kv_pages = kv_pages.reshape(kv_pages.shape[0], kv_pages.shape[1], fmt.page_bytes)
    if kv_pages.dim() != 3 or kv_pages.shape[2] != fmt.page_bytes:
        raise ValueError(f"{name} must be [blocks, kv_heads, {fmt.page_bytes}], got {tuple(kv_pages.shape)}")
    return kv_pages


# --------------------------------------------------------------------------- staging + append
def write_staging(
    staging: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor
) -> None:
    """Store new tokens into their staging slots (in the staging format).

    staging : (S, 2, Hkv, P, W) · key, value : (T, Hkv, D) · slots, offsets : (T,) int
    (``slots[i] < 0``: token ``i`` is not staged — padding, or its page is finalised directly).
    """
    keep = slots >= 0
    if keep.any():
        s, o = slots[keep].long(), offsets[keep].long()
        staging_format.store(staging, (s, 0, slice(None), o), key[keep])
        staging_format.store(staging, (s, 1, slice(None), o), value[keep])


def finalize_pages(
    kv_pages: torch.Tensor,
    codec: PageCodec | PageLayout,
    blocks: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fills: torch.Tensor,
    sinks: torch.Tensor,
) -> torch.Tensor:
    """Encode pages of all KV heads into their blocks.

    kv_pages : (NB, Hkv, page_bytes) uint8 · blocks : (F,) · k, v : (F, Hkv, P, D) ·
    fills : (F,) tokens present (``P`` normally, fewer for early finalisation) · sinks : (F,) bool.
    Returns the written pages, (F, Hkv, page_bytes) uint8.
    """
    codec = as_codec(codec)
    pages = pages_view(kv_pages, codec)
    F, H = k.shape[0], k.shape[1]
    if blocks.numel() == 0:
        return pages.new_empty(0, H, codec.page_bytes)
    P, D = codec.page_size, codec.head_dim
    q = codec.encode(
        k.reshape(F * H, P, D), v.reshape(F * H, P, D), fills.repeat_interleave(H), sinks.repeat_interleave(H)
    ).reshape(F, H, codec.page_bytes)
    pages[blocks.long()] = q
    return q


def reopen_pages(
    kv_pages: torch.Tensor,
    staging: torch.Tensor,
    codec: PageCodec | PageLayout,
    blocks: torch.Tensor,
    slots: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> None:
    """Decode early-finalised pages back into staging slots so appends can continue.

    The tokens come back with their quantization error (this is why early finalisation is counted):
    decoded, rounded to the model ``dtype`` (default: the staging dtype, for model-dtype staging),
    then stored in the staging format.
    """
    if blocks.numel() == 0:
        return
    codec = as_codec(codec)
    dtype = staging.dtype if dtype is None else dtype
    pages = pages_view(kv_pages, codec)[blocks.long()]  # (F, H, bytes)
    F, H = pages.shape[:2]
    k, v = codec.decode(pages.reshape(F * H, -1))
    P, D = codec.page_size, codec.head_dim
    staging_format.store(staging, (slots.long(), 0), k.reshape(F, H, P, D).to(dtype))
    staging_format.store(staging, (slots.long(), 1), v.reshape(F, H, P, D).to(dtype))


def live_ops(ops):
    """The entries of a page-op list that are ops (``blocks >= 0``), in order; padding entries dropped."""
    keep = ops.blocks >= 0
    return SimpleNamespace(**{f: getattr(ops, f)[keep] for f in OP_FIELDS})


#: Fields of a page-op list (:class:`kivi_serve.backend.staging.PageOps`).
OP_FIELDS = ("blocks", "slots", "fills", "sinks", "starts", "prefix")


def append_kv(
    plan, key: Tensor, value: Tensor, kv_pages: Tensor, staging: Tensor, codec: PageCodec | PageLayout
) -> None:
    """Execute one step's :class:`~kivi_serve.backend.staging.AppendPlan` (the fused kernels' spec).

    Phases, in order (see AppendPlan): (1) evict: encode pages whose slot is taken back;
    (2) finalize: pages that became full, from slot/block prefix + this step's input;
    (3) reopen: decode early-finalised pages that stay open into their new slot;
    (4) write this step's tokens of open pages to staging.

    The op lists may be padded: an entry whose ``blocks`` is negative is no op (a planner on the
    device emits one entry per page so that the shapes do not depend on device data), and a token
    whose ``token_slots`` is negative is not staged.

    key, value : (T, Hkv, D) · kv_pages : (NB, Hkv, page_bytes) uint8 · staging : (S, 2, Hkv, P, W).
    Pages are quantized from the staged values as :func:`~kivi_serve.quant.staging.load` reads them
    and this step's tokens as given; an early-finalised prefix is decoded and rounded to ``key``'s dtype.
    """
    codec = as_codec(codec)
    P, D = codec.page_size, codec.head_dim
    pages = pages_view(kv_pages, codec)
    ev = live_ops(plan.evict)
    if len(ev.blocks):
        src = staging_format.load(staging[ev.slots.long()], key.dtype)
        finalize_pages(pages, codec, ev.blocks, src[:, 0], src[:, 1], ev.fills, ev.sinks)
    fin = live_ops(plan.finalize)
    if len(fin.blocks):
        F, H = len(fin.blocks), key.shape[1]
        k = torch.empty(F, P, H, D, dtype=torch.float32, device=key.device)
        v = torch.empty_like(k)
        prefix, slots, starts, blocks = (t.tolist() for t in (fin.prefix, fin.slots, fin.starts, fin.blocks))
        for f in range(F):
            pre, slot, first = prefix[f], slots[f], starts[f]
            if pre and slot >= 0:
                k[f, :pre] = staging_format.load(staging[slot, 0, :, :pre], key.dtype).transpose(0, 1)
                v[f, :pre] = staging_format.load(staging[slot, 1, :, :pre], key.dtype).transpose(0, 1)
            elif pre:  # early-finalised page completed in this step: its prefix is in its block
                kh, vh = codec.decode(pages[blocks[f]])  # (H, P, D)
                k[f, :pre] = kh[:, :pre].transpose(0, 1).to(key.dtype).float()
                v[f, :pre] = vh[:, :pre].transpose(0, 1).to(key.dtype).float()
            k[f, pre:] = key[first : first + P - pre].float()
            v[f, pre:] = value[first : first + P - pre].float()
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (F, H, P, D)
        finalize_pages(pages, codec, fin.blocks, k, v, fin.fills, fin.sinks)
    ro = live_ops(plan.reopen)
    reopen_pages(pages, staging, codec, ro.blocks, ro.slots, key.dtype)
    write_staging(staging, key, value, plan.token_slots, plan.token_offsets)


def dequantize_blocks(
    kv_pages: torch.Tensor, blocks: torch.Tensor, codec: PageCodec | PageLayout, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode whole blocks (every KV head) for prefill over cached pages.

    kv_pages : (NB, Hkv, page_bytes) or (NB, Hkv, P, C) uint8 · blocks : (n,) int → (k, v), each
    (n, Hkv, P, D) in ``dtype`` (values rounded from the fp32 decode). Entries with ``blocks < 0`` are
    skipped: their output is unspecified (zeros here; the CUDA kernel leaves it unwritten).
    """
    codec = as_codec(codec)
    pages = pages_view(kv_pages, codec)
    n, H = blocks.shape[0], pages.shape[1]
    P, D = codec.page_size, codec.head_dim
    k = torch.zeros(n, H, P, D, dtype=dtype, device=pages.device)
    v = torch.zeros_like(k)
    keep = blocks >= 0
    if bool(keep.any()):
        kd, vd = codec.decode(pages[blocks[keep].long()].reshape(-1, codec.page_bytes))
        k[keep] = kd.reshape(-1, H, P, D).to(dtype)
        v[keep] = vd.reshape(-1, H, P, D).to(dtype)
    return k, v


# --------------------------------------------------------------------------- attention
def paged_attention(
    query: Tensor, key: Tensor, value: Tensor, kv_pages: Tensor, staging: Tensor,
    block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor, tail_slots: Tensor,
    codec: PageCodec | PageLayout, scale: float | None = None, attn: LayerAttention | None = None,
) -> Tensor:  # fmt: skip
    """Attention of a batch of new-token chunks over the paged cache (decode and prefill alike).

    Parameters
    ----------
    query : torch.Tensor, shape (T, Hq, D)
        All new tokens of the batch, sequence after sequence.
    key, value : torch.Tensor, shape (T, Hkv, D)
        The same tokens' keys and values (already appended to the cache); they are attended exactly.
    kv_pages : torch.Tensor, shape (NB, Hkv, page_bytes) or (NB, Hkv, P, C), uint8
    staging : torch.Tensor, shape (S, 2, Hkv, P, W) — model dtype (``W = D``) or compact uint8
    block_tables : torch.Tensor, shape (B, max_pages), int — physical block of each logical page.
    seq_lens : torch.Tensor, shape (B,), int — tokens per sequence *including* this step's.
    query_start_loc : torch.Tensor, shape (B + 1,), int — offsets of each chunk in ``query``.
    tail_slots : torch.Tensor, shape (B,), int — staging slot of the last, partial page;
        ``-1`` if it has no partial page or the page was finalised early (read it from its block).
    codec : PageCodec or PageLayout
    scale : float, optional — softmax scale, default ``D ** -0.5``.
    attn : LayerAttention, optional — sliding window, soft-cap, sink logits (default: none). With a
        window, pages wholly before the first query's window are not read (their block ids may be
        vLLM's null block).

    Returns
    -------
    torch.Tensor, shape (T, Hq, D), dtype of ``query``. Math in fp32.
    """
    codec = as_codec(codec)
    check_float("query", query, 3)
    check_float("key", key, 3)
    check_float("value", value, 3)
    pages = pages_view(kv_pages, codec)
    T, Hq, D = query.shape
    Hkv = key.shape[1]
    if D != codec.head_dim:
        raise ValueError(f"head_dim mismatch: query has {D}, the codec's head_dim is {codec.head_dim}")
    if key.shape != (T, Hkv, D) or value.shape != key.shape:
        got = f"{tuple(key.shape)}, {tuple(value.shape)}"
        raise ValueError(f"key and value must be ({T}, Hkv, {D}); got {got}")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if pages.shape[1] != Hkv:
        raise ValueError(f"kv_pages has {pages.shape[1]} KV heads, key has {Hkv}")
    P = codec.page_size
    if (
        staging.dim() != 5
        or tuple(staging.shape[1:4]) != (2, Hkv, P)
        or staging_format.staged_head_dim(staging) != D
    ):
        got = tuple(staging.shape)
        raise ValueError(f"staging must be (slots, 2, {Hkv}, {P}, W) for head_dim {D}, got {got}")
    B = seq_lens.shape[0]
    if query_start_loc.shape != (B + 1,) or tail_slots.shape != (B,) or block_tables.shape[0] != B:
        raise ValueError("seq_lens, query_start_loc (B+1), tail_slots and block_tables must agree on B")
    scale = D**-0.5 if scale is None else scale
    out = torch.empty(T, Hq, D, dtype=torch.float32, device=query.device)
    for b in range(B):
        q0, q1 = int(query_start_loc[b]), int(query_start_loc[b + 1])
        n_new, seq_len = q1 - q0, int(seq_lens[b])
        if n_new <= 0:
            continue
        if seq_len < n_new:
            raise ValueError(f"sequence {b}: seq_len {seq_len} is shorter than its {n_new} new tokens")
        ctx, tail = seq_len - n_new, int(tail_slots[b])
        first = semantics.first_visible(attn, ctx) // P
        ck, cv = gather_context(
            pages, staging, block_tables[b], ctx, seq_len, tail, codec, first_page=first, dtype=query.dtype
        )
        out[q0:q1] = attend_chunk(
            query[q0:q1], key[q0:q1], value[q0:q1], ck, cv, scale, attn=attn, ctx_start=first * P
        )
    return out.to(query.dtype)


def decode_rows(
    query: Tensor, key: Tensor, value: Tensor, kv_pages: Tensor, staging: Tensor,
    block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor, tail_slots: Tensor,
    codec: PageCodec | PageLayout, scale: float | None, out: Tensor, attn: LayerAttention | None = None,
) -> None:  # fmt: skip
    """What the decode kernels do, by :func:`paged_attention`: attention of the decode rows (sequences
    with exactly one new token) written into ``out`` (T, Hq, D); the other rows are left untouched.
    Arguments as :func:`paged_attention`; only the decode sequences are computed."""
    qsl = query_start_loc.long()
    seqs = torch.nonzero(qsl.diff() == 1).flatten()
    if not seqs.numel():
        return
    rows = qsl[seqs]
    one_each = torch.arange(len(seqs) + 1, dtype=query_start_loc.dtype, device=query_start_loc.device)
    res = paged_attention(
        query[rows], key[rows], value[rows], kv_pages, staging, block_tables[seqs], seq_lens[seqs],
        one_each, tail_slots[seqs], codec, scale, attn,
    )  # fmt: skip
    out[rows] = res.to(out.dtype)


def attend_chunk(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    ctx_k: torch.Tensor,
    ctx_v: torch.Tensor,
    scale: float,
    *,
    attn: LayerAttention | None = None,
    ctx_start: int = 0,
) -> torch.Tensor:
    """Causal attention of one sequence's chunk of ``n`` new tokens over its context and itself.

    q : (n, Hq, D) · k_new, v_new : (n, Hkv, D) · ctx_k, ctx_v : (m, Hkv, D) fp32 — the context as the
    cache holds it, positions ``[ctx_start, ctx_start + m)``; the new tokens are at ``ctx_start + m``
    on → (n, Hq, D) fp32. Query ``i`` sees the context and new tokens ``<= i`` that ``attn``'s window
    leaves visible; ``attn`` also soft-caps the scores and adds its sink logits to the softmax.
    """
    n, Hq, D = q.shape
    Hkv = k_new.shape[1]
    G = Hq // Hkv
    ctx = ctx_start + ctx_k.shape[0]
    k = torch.cat([ctx_k, k_new.float()], 0)  # (m + n, Hkv, D)
    v = torch.cat([ctx_v, v_new.float()], 0)
    s = torch.einsum("thgd,shd->hgts", q.float().reshape(n, Hkv, G, D), k) * scale
    s = semantics.cap_scores(attn, s)
    pos_q = ctx + torch.arange(n, device=q.device)
    seen = semantics.visible(attn, pos_q, torch.arange(ctx_start, ctx + n, device=q.device))
    sink = None if attn is None or attn.sinks is None else attn.sinks.float().reshape(Hkv, G, 1)
    p = semantics.softmax(attn, s.masked_fill(~seen, -torch.inf), sink)
    return torch.einsum("hgts,shd->thgd", p, v).reshape(n, Hq, D)


def gather_context(
    pages: torch.Tensor,
    staging: torch.Tensor,
    block_table,
    ctx: int,
    seq_len: int,
    tail_slot: int,
    codec: PageCodec | PageLayout,
    first_page: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[first_page * P, ctx)`` of one sequence as the cache holds them after this step's append.

    Full pages (``(i + 1) * P <= seq_len``) are decoded; the last, partial page comes from
    its staging slot, or from its block when it was finalised early (``tail_slot < 0``).
    ``block_table`` is a tensor or list of block ids; entries before ``first_page`` are not read
    (a sliding window's freed pages). ``dtype``: the model dtype int8 staging rows are read in
    (:func:`~kivi_serve.quant.staging.load`; None: fp32).
    Returns ``(k, v)``, each (ctx - first_page * P, Hkv, D) fp32.
    """
    codec = as_codec(codec)
    pages = pages_view(pages, codec)
    P, D = codec.page_size, codec.head_dim
    Hkv = pages.shape[1]
    n_pages = -(-ctx // P)
    if n_pages <= first_page:
        empty = torch.zeros(0, Hkv, D, device=pages.device)
        return empty, empty
    if len(block_table) < n_pages:
        raise ValueError(f"block table has {len(block_table)} pages, context of {ctx} tokens needs {n_pages}")
    staged_tail = n_pages * P > seq_len and tail_slot >= 0
    n_quant = (n_pages - 1 if staged_tail else n_pages) - first_page
    ks, vs = [], []
    if n_quant > 0:
        blocks = [int(b) for b in block_table[first_page : first_page + n_quant]]
        raw = pages[torch.tensor(blocks, dtype=torch.long, device=pages.device)]
        k, v = codec.decode(raw.reshape(n_quant * Hkv, -1))
        k, v = k.reshape(n_quant, Hkv, P, D), v.reshape(n_quant, Hkv, P, D)
        ks.append(k.transpose(1, 2).reshape(n_quant * P, Hkv, D))
        vs.append(v.transpose(1, 2).reshape(n_quant * P, Hkv, D))
    if staged_tail:
        ks.append(staging_format.load(staging[tail_slot, 0], dtype).transpose(0, 1))
        vs.append(staging_format.load(staging[tail_slot, 1], dtype).transpose(0, 1))
    m = ctx - first_page * P
    return torch.cat(ks, 0)[:m], torch.cat(vs, 0)[:m]
