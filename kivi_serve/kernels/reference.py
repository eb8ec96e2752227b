"""The spec: every kivi-serve kernel, in plain PyTorch. The CUDA kernels must match it.

Shapes (per layer): ``Hq`` query heads, ``Hkv`` KV heads (``Hq % Hkv == 0``, GQA group
``G = Hq // Hkv``), ``D`` head_dim, ``P`` page size, ``NB`` vLLM blocks, ``S`` staging slots.

- ``kv_pages``: uint8 ``[NB, Hkv, P * C]`` (a ``[NB, Hkv, P, C]`` view is accepted): one page per
  (block, KV head), laid out by :class:`~kivi_serve.quant.layout.PageLayout`.
- ``staging``: model dtype ``[S, 2, Hkv, P, D]``: the open (still filling) page of a sequence, at
  full precision; ``[:, 0]`` keys, ``[:, 1]`` values.

**Semantics of attention** (what the engine computes, what the accuracy harness simulates):
a query at position ``t`` in a chunk of new tokens ``[c, c + T)`` sees every token of its own
chunk up to ``t`` exactly (from the layer's input ``key``/``value``), and every earlier token
``s < c`` as the cache holds it *after* this step's append: dequantized if ``s``'s page has been
finalised (it became full, or was finalised early), else exactly from the staging slot.
Decode is the case ``T = 1``.

**Page lifecycle.** Tokens of a page that is still filling live in a staging slot; when a page
fills (or must be finalised early because the staging pool ran out) it is quantized from the
tokens present into its block. A page's *fill* is the number of valid tokens it was finalised with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kivi_serve.quant.codebook import assign, fit_codebooks, scale_weights
from kivi_serve.quant.layout import PLANES, PageLayout
from kivi_serve.quant.packing import pack_bits, pack_codes, unpack_bits, unpack_codes

FP16_MAX = 65504.0


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 (saturating, never inf) and return as fp32."""
    return x.float().clamp(-FP16_MAX, FP16_MAX).to(torch.float16).float()


def _check_float(name: str, x: torch.Tensor, dims: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {x.dtype}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(x.shape)}")


def _pages_flat(kv_pages: torch.Tensor, layout: PageLayout) -> torch.Tensor:
    """Accept ``[NB, Hkv, P*C]`` or ``[NB, Hkv, P, C]`` uint8 and return the 3-d view."""
    if kv_pages.dtype != torch.uint8:
        raise ValueError(f"kv_pages must be uint8, got {kv_pages.dtype}")
    if kv_pages.dim() == 4:
        if tuple(kv_pages.shape[2:]) != (layout.page_size, layout.slot_bytes):
            raise ValueError(
                f"kv_pages must be [blocks, kv_heads, {layout.page_size}, {layout.slot_bytes}], "
                f"got {tuple(kv_pages.shape)}"
            )
        kv_pages = kv_pages.reshape(kv_pages.shape[0], kv_pages.shape[1], layout.page_bytes)
    if kv_pages.dim() != 3 or kv_pages.shape[2] != layout.page_bytes:
        raise ValueError(f"kv_pages must be [blocks, kv_heads, {layout.page_bytes}], got {tuple(kv_pages.shape)}")
    return kv_pages


# --------------------------------------------------------------------------- quantize
def outlier_token_score(k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """How far each token's key lies from the page's per-channel mid-range, in half-ranges.

    ``score[t] = sum_d ((k[t,d] - mid[d]) / half[d])**2`` over valid tokens (fp64; channels with
    zero range add 0). The exact-token slot of a non-first page keeps the argmax.
    k : (n, P, D) fp32; valid : (n, P) bool → (n, P) fp64, ``-inf`` for invalid tokens.
    """
    kd = k.double()
    big = torch.finfo(torch.float64).max
    v3 = valid.unsqueeze(-1)
    hi = torch.where(v3, kd, -big).amax(1, keepdim=True)
    lo = torch.where(v3, kd, big).amin(1, keepdim=True)
    mid, half = (hi + lo) * 0.5, (hi - lo) * 0.5
    z = torch.where(half > 0, (kd - mid) / torch.where(half > 0, half, 1.0), 0.0)
    score = (z * z).sum(-1)
    return torch.where(valid, score, -torch.inf)


def _choose_k_outliers(k: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the element dropped from the range and kept exactly.

    Among the channel's kept elements (``kept``), drop whichever extreme (max or min) shrinks
    the range more (ties drop the max); with fewer than 3 kept elements nothing is dropped and the
    minimum is stored (still exact). With none kept, token 0 is stored.
    k : (n, P, D) fp32; kept : (n, P, D) bool → (idx (n, D) int64, drop (n, D) bool).
    """
    inf = torch.inf
    hi_vals = torch.where(kept, k, -inf)
    lo_vals = torch.where(kept, k, inf)
    i_max = hi_vals.argmax(1)  # first index of the max
    i_min = lo_vals.argmin(1)
    max1 = hi_vals.gather(1, i_max.unsqueeze(1)).squeeze(1)
    min1 = lo_vals.gather(1, i_min.unsqueeze(1)).squeeze(1)
    max2 = hi_vals.scatter(1, i_max.unsqueeze(1), -inf).amax(1)
    min2 = lo_vals.scatter(1, i_min.unsqueeze(1), inf).amin(1)
    drop_hi = (max1 - max2) >= (min2 - min1)
    count = kept.sum(1)  # (n, D)
    drop = count >= 3
    idx = torch.where(drop & drop_hi, i_max, i_min)
    idx = torch.where(count == 0, torch.zeros_like(idx), idx)
    return idx, drop


def wide_channels(k_scale: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` K channels of each page with the largest scale, ascending.

    Ranking is by the stored fp16 ``k_scale``; equal scales rank the lower channel first (a
    stable descending sort), so the CUDA kernel can rank by counting:
    ``rank[d] = #{e : s[e] > s[d] or (s[e] == s[d] and e < d)}``, wide iff ``rank[d] < count``.
    k_scale : (n, D) → (n, count) int64.
    """
    order = torch.sort(k_scale, dim=1, descending=True, stable=True).indices[:, :count]
    return order.sort(dim=1).values


def _range_params(x: torch.Tensor, kept: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16-rounded ``lo`` and ``scale`` of ``x`` over ``kept`` along ``dim`` (0 where nothing is kept)."""
    any_kept = kept.any(dim)
    hi = torch.where(kept, x, -torch.inf).amax(dim)
    lo = torch.where(kept, x, torch.inf).amin(dim)
    lo16 = _fp16(torch.where(any_kept, lo, 0.0))
    scale16 = _fp16(torch.where(any_kept, hi - lo16, 0.0)).clamp_min(0.0)
    return lo16, scale16


def _normalise(x: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    safe = torch.where(scale > 0, scale, 1.0)
    return torch.where(scale > 0, (x - lo) / safe, 0.0).clamp(0.0, 1.0)


@dataclass
class QuantizedPages:
    """Decoded view of quantized pages (what the bytes say), fp32 unless noted; ``n`` pages.

    k_codes, v_codes : (n, P, D) int64 · k_lo, k_scale : (n, D) · v_lo, v_scale : (n, P) ·
    k_cb, v_cb : (n, L) · exact_k, exact_v : (n, D) or None · exact_idx : (n,) int64 or None ·
    kout_val : (n, D) or None · kout_idx : (n, D) int64 or None · khi_idx : (n, H) int64 or None ·
    khi_cb : (n, 2 * L) or None. ``k_codes`` are full codes: wide channels' carry their top bit.
    """

    k_codes: torch.Tensor
    v_codes: torch.Tensor
    k_lo: torch.Tensor
    k_scale: torch.Tensor
    v_lo: torch.Tensor
    v_scale: torch.Tensor
    k_cb: torch.Tensor
    v_cb: torch.Tensor
    exact_k: torch.Tensor | None = None
    exact_v: torch.Tensor | None = None
    exact_idx: torch.Tensor | None = None
    kout_val: torch.Tensor | None = None
    kout_idx: torch.Tensor | None = None
    khi_idx: torch.Tensor | None = None
    khi_cb: torch.Tensor | None = None


def quantize_pages(
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PageLayout,
    fill: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
    codebook: str = "fitted",
    exact_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize ``n`` pages into their bytes.

    Parameters
    ----------
    k, v : torch.Tensor, shape (n, P, D), floating
        Keys and values of each page's tokens (rows ``>= fill`` are ignored).
    layout : PageLayout
    fill : torch.Tensor, shape (n,), int, optional
        Valid tokens per page, ``1..P`` (default ``P``: full pages). ``< P`` is early finalisation.
    sink : torch.Tensor, shape (n,), bool, optional
        True for a sequence's first page: its exact-token slot keeps token 0 (the attention sink).
    codebook : {"fitted", "uniform"}
        ``uniform`` gives KIVI's levels (the baseline) with the same bytes.
    exact_idx : torch.Tensor, shape (n,), int, optional
        The token each page keeps exactly, chosen by the caller (e.g. from the queries that see
        the page first); overrides the sink / outlier-score rule. Must be ``< fill``.

    Returns
    -------
    torch.Tensor, shape (n, page_bytes), uint8
    """
    _check_float("k", k, 3)
    _check_float("v", v, 3)
    n, P, D = k.shape
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if P != layout.page_size:
        raise ValueError(f"page size mismatch: k has {P} tokens per page, layout.page_size={layout.page_size}")
    if D != layout.head_dim:
        raise ValueError(f"head_dim mismatch: k has head_dim {D}, layout.head_dim={layout.head_dim}")
    dev = k.device
    fill = torch.full((n,), P, dtype=torch.long, device=dev) if fill is None else fill.to(dev).long()
    sink = torch.zeros(n, dtype=torch.bool, device=dev) if sink is None else sink.to(dev).bool()
    if fill.shape != (n,) or sink.shape != (n,):
        raise ValueError(f"fill and sink must have shape ({n},)")
    if n and (fill.min() < 1 or fill.max() > P):
        raise ValueError(f"fill must be in [1, {P}]")
    kf, vf = k.float(), v.float()
    tok = torch.arange(P, device=dev)
    valid = tok.unsqueeze(0) < fill.unsqueeze(1)  # (n, P)

    # 1. the exact token: the sink on first pages, else the strongest outlier token.
    kept_tok = valid.clone()
    if exact_idx is not None:
        exact_idx = exact_idx.to(dev).long()
        if exact_idx.shape != (n,) or (n and ((exact_idx < 0).any() or (exact_idx >= fill).any())):
            raise ValueError(f"exact_idx must have shape ({n},) with 0 <= exact_idx < fill")
    if not layout.exact_tokens:
        exact_idx = None
    elif exact_idx is None:
        exact_idx = torch.where(sink, 0, outlier_token_score(kf, valid).argmax(1))
    if exact_idx is not None:
        kept_tok &= tok.unsqueeze(0) != exact_idx.unsqueeze(1)
    k_kept = kept_tok.unsqueeze(-1).expand(n, P, D).clone()

    # 2. per-channel K outliers, dropped from the channel range.
    kout_idx = None
    if layout.k_outliers:
        kout_idx, drop = _choose_k_outliers(kf, k_kept)
        hit = (tok.view(1, P, 1) == kout_idx.unsqueeze(1)) & drop.unsqueeze(1)
        k_kept &= ~hit

    # 3. normalisation: K per channel over kept elements, V per token over its channels.
    k_lo, k_scale = _range_params(kf, k_kept, dim=1)  # (n, D)
    uk = torch.where(valid.unsqueeze(-1), _normalise(kf, k_lo.unsqueeze(1), k_scale.unsqueeze(1)), 0.0)
    v_lo, v_scale = _range_params(vf, valid.unsqueeze(-1).expand(n, P, D), dim=2)  # (n, P)
    uv = _normalise(vf, v_lo.unsqueeze(-1), v_scale.unsqueeze(-1))
    v_kept = kept_tok.unsqueeze(-1).expand(n, P, D)

    # 4. the wide K channels (largest fp16 scale, ties to the lower channel) get one more bit.
    H = layout.k_hi_channels
    hi_idx = wide_channels(k_scale, H)  # (n, H) ascending
    hi = torch.zeros(n, D, dtype=torch.bool, device=dev)
    hi.scatter_(1, hi_idx, True)
    hi3 = hi.unsqueeze(1).expand(n, P, D)

    # 5. codebooks fitted on kept elements, then codes (rows past ``fill`` normalise to 0 → code 0).
    # K levels are fitted for the error of k itself (weights ∝ k_scale²); V's per-token scales vary
    # less and weighting them did not help (docs/accuracy.md).
    wk = scale_weights(k_scale).unsqueeze(1).expand(n, P, D).reshape(n, -1)
    k_cb = fit_codebooks(uk.reshape(n, -1), (k_kept & ~hi3).reshape(n, -1), layout.k_bits, codebook, wk)
    v_cb = fit_codebooks(uv.reshape(n, -1), v_kept.reshape(n, -1), layout.v_bits, codebook)
    k_codes = assign(uk.reshape(n, -1), k_cb).reshape(n, P, D)
    v_codes = assign(uv.reshape(n, -1), v_cb).reshape(n, P, D)
    if H:
        khi_cb = fit_codebooks(uk.reshape(n, -1), (k_kept & hi3).reshape(n, -1), layout.k_bits + 1, codebook, wk)
        k_codes = torch.where(hi3, assign(uk.reshape(n, -1), khi_cb).reshape(n, P, D), k_codes)

    pages = torch.zeros(n, layout.page_bytes, dtype=torch.uint8, device=dev)
    low = (1 << layout.k_bits) - 1
    for i, plane in enumerate(pack_codes(k_codes & low, layout.k_bits)):
        layout.write_bytes(pages, f"k_plane{i}", plane)
    if H:
        top = (k_codes.gather(2, hi_idx.unsqueeze(1).expand(n, P, H)) >> layout.k_bits).transpose(1, 2)  # (n, H, P)
        layout.write_bytes(pages, "khi_plane", pack_bits(top).reshape(n, -1))
        layout.write(pages, "khi_cb", khi_cb)
        layout.write(pages, "khi_idx", hi_idx)
    for i, plane in enumerate(pack_codes(v_codes.transpose(1, 2), layout.v_bits)):
        layout.write_bytes(pages, f"v_plane{i}", plane)
    layout.write(pages, "k_lo", k_lo)
    layout.write(pages, "k_scale", k_scale)
    layout.write(pages, "v_lo", v_lo)
    layout.write(pages, "v_scale", v_scale)
    layout.write(pages, "k_cb", k_cb)
    layout.write(pages, "v_cb", v_cb)
    if exact_idx is not None:
        rows = torch.arange(n, device=dev)
        layout.write(pages, "exact_k", _fp16(kf[rows, exact_idx]))
        layout.write(pages, "exact_v", _fp16(vf[rows, exact_idx]))
        layout.write(pages, "exact_idx", exact_idx.unsqueeze(1))
    if kout_idx is not None:
        layout.write(pages, "kout_val", _fp16(kf.gather(1, kout_idx.unsqueeze(1)).squeeze(1)))
        layout.write(pages, "kout_idx", kout_idx)
    return pages


def read_pages(pages: torch.Tensor, layout: PageLayout) -> QuantizedPages:
    """Decode the fields of ``pages`` (uint8 ``(n, page_bytes)``) without dequantizing."""
    n, P, D = pages.shape[0], layout.page_size, layout.head_dim
    f = lambda name: layout.view(pages, name).float()  # noqa: E731
    planes = lambda who, bits: [layout.raw(pages, f"{who}_plane{i}") for i in range(len(PLANES[bits]))]  # noqa: E731
    q = QuantizedPages(
        k_codes=unpack_codes(planes("k", layout.k_bits), layout.k_bits, P, D),
        v_codes=unpack_codes(planes("v", layout.v_bits), layout.v_bits, D, P).transpose(1, 2),
        k_lo=f("k_lo"),
        k_scale=f("k_scale"),
        v_lo=f("v_lo"),
        v_scale=f("v_scale"),
        k_cb=f("k_cb"),
        v_cb=f("v_cb"),
    )
    if layout.exact_tokens:
        q.exact_k, q.exact_v = f("exact_k"), f("exact_v")
        q.exact_idx = layout.view(pages, "exact_idx").long().reshape(n)
    if layout.k_outliers:
        q.kout_val = f("kout_val")
        q.kout_idx = layout.view(pages, "kout_idx").long()
    if layout.k_hi_channels:
        H = layout.k_hi_channels
        q.khi_idx = layout.view(pages, "khi_idx").long()
        q.khi_cb = f("khi_cb")
        top = unpack_bits(layout.raw(pages, "khi_plane").reshape(n, H, P // 8), P).transpose(1, 2)  # (n, P, H)
        idx = q.khi_idx.unsqueeze(1).expand(n, P, H)
        q.k_codes.scatter_(2, idx, q.k_codes.gather(2, idx) | (top << layout.k_bits))
    return q


def dequantize_pages(pages: torch.Tensor, layout: PageLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages → ``(k, v)``, each (n, P, D) fp32: ``lo + scale * cb[code]``, then the exact
    K outliers, then the exact token (which wins where both apply).
    """
    if pages.dim() != 2:
        raise ValueError(f"pages must be (n, page_bytes), got shape {tuple(pages.shape)}")
    q = read_pages(pages, layout)
    P, D = layout.page_size, layout.head_dim
    if q.khi_idx is None:
        k_level = torch.gather(q.k_cb.unsqueeze(1).expand(-1, P, -1), 2, q.k_codes)
    else:  # wide channels read their own codebook with the full code
        hi = torch.zeros(q.k_codes.shape[0], D, dtype=torch.bool, device=pages.device)
        hi.scatter_(1, q.khi_idx, True)
        low = (1 << layout.k_bits) - 1
        k_level = torch.where(
            hi.unsqueeze(1),
            torch.gather(q.khi_cb.unsqueeze(1).expand(-1, P, -1), 2, q.k_codes),
            torch.gather(q.k_cb.unsqueeze(1).expand(-1, P, -1), 2, q.k_codes & low),
        )
    k = q.k_lo.unsqueeze(1) + q.k_scale.unsqueeze(1) * k_level
    v = q.v_lo.unsqueeze(-1) + q.v_scale.unsqueeze(-1) * torch.gather(
        q.v_cb.unsqueeze(1).expand(-1, layout.page_size, -1), 2, q.v_codes
    )
    if q.kout_idx is not None:
        k.scatter_(1, q.kout_idx.unsqueeze(1), q.kout_val.unsqueeze(1))
    if q.exact_idx is not None:
        rows = torch.arange(pages.shape[0], device=pages.device)
        k[rows, q.exact_idx] = q.exact_k
        v[rows, q.exact_idx] = q.exact_v
    return k, v


# --------------------------------------------------------------------------- staging + append
def write_staging(
    staging: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor
) -> None:
    """Copy new tokens into their staging slots.

    staging : (S, 2, Hkv, P, D) · key, value : (T, Hkv, D) · slots, offsets : (T,) int
    (``slots[i] < 0``: token ``i`` is not staged — padding, or its page is finalised directly).
    """
    keep = slots >= 0
    if keep.any():
        s, o = slots[keep].long(), offsets[keep].long()
        staging[s, 0, :, o] = key[keep].to(staging.dtype)
        staging[s, 1, :, o] = value[keep].to(staging.dtype)


def finalize_pages(
    kv_pages: torch.Tensor,
    layout: PageLayout,
    blocks: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fills: torch.Tensor,
    sinks: torch.Tensor,
    codebook: str = "fitted",
) -> None:
    """Quantize pages of all KV heads into their blocks.

    kv_pages : (NB, Hkv, page_bytes) uint8 · blocks : (F,) · k, v : (F, Hkv, P, D) ·
    fills : (F,) tokens present (``P`` normally, fewer for early finalisation) · sinks : (F,) bool.
    """
    pages = _pages_flat(kv_pages, layout)
    if blocks.numel() == 0:
        return
    F, H = k.shape[0], k.shape[1]
    q = quantize_pages(
        k.reshape(F * H, layout.page_size, layout.head_dim),
        v.reshape(F * H, layout.page_size, layout.head_dim),
        layout,
        fill=fills.repeat_interleave(H),
        sink=sinks.repeat_interleave(H),
        codebook=codebook,
    )
    pages[blocks.long()] = q.reshape(F, H, layout.page_bytes)


def reopen_pages(
    kv_pages: torch.Tensor, staging: torch.Tensor, layout: PageLayout, blocks: torch.Tensor, slots: torch.Tensor
) -> None:
    """Dequantize early-finalised pages back into staging slots so appends can continue.

    The tokens come back with their quantization error (this is why early finalisation is counted).
    """
    if blocks.numel() == 0:
        return
    pages = _pages_flat(kv_pages, layout)[blocks.long()]  # (F, H, bytes)
    F, H = pages.shape[:2]
    k, v = dequantize_pages(pages.reshape(F * H, -1), layout)
    P, D = layout.page_size, layout.head_dim
    staging[slots.long(), 0] = k.reshape(F, H, P, D).to(staging.dtype)
    staging[slots.long(), 1] = v.reshape(F, H, P, D).to(staging.dtype)


def append_kv(
    plan,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_pages: torch.Tensor,
    staging: torch.Tensor,
    layout: PageLayout,
    codebook: str = "fitted",
) -> None:
    """Execute one step's :class:`~kivi_serve.cache.staging.AppendPlan` (the fused kernel's spec).

    Phases, in order (see AppendPlan): (1) evict: quantize pages whose slot is taken back;
    (2) finalize: pages that became full, from slot/block prefix + this step's input;
    (3) reopen: dequantize early-finalised pages that stay open into their new slot;
    (4) write this step's tokens of open pages to staging.

    key, value : (T, Hkv, D) · kv_pages : (NB, Hkv, page_bytes) uint8 · staging : (S, 2, Hkv, P, D)
    """
    P = layout.page_size
    pages = _pages_flat(kv_pages, layout)
    ev = plan.evict
    if len(ev):
        src = staging[ev.slots.long()]
        finalize_pages(pages, layout, ev.blocks, src[:, 0], src[:, 1], ev.fills, ev.sinks, codebook)
    fin = plan.finalize
    if len(fin):
        F, H = len(fin), key.shape[1]
        k = torch.empty(F, P, H, layout.head_dim, dtype=torch.float32, device=key.device)
        v = torch.empty_like(k)
        for f in range(F):
            pre, slot, first = int(fin.prefix[f]), int(fin.slots[f]), int(fin.starts[f])
            if pre and slot >= 0:
                k[f, :pre] = staging[slot, 0, :, :pre].transpose(0, 1).float()
                v[f, :pre] = staging[slot, 1, :, :pre].transpose(0, 1).float()
            elif pre:  # early-finalised page completed in this step: its prefix is in its block
                kh, vh = dequantize_pages(pages[int(fin.blocks[f])], layout)  # (H, P, D)
                k[f, :pre] = kh[:, :pre].transpose(0, 1).to(staging.dtype).float()
                v[f, :pre] = vh[:, :pre].transpose(0, 1).to(staging.dtype).float()
            k[f, pre:] = key[first : first + P - pre].float()
            v[f, pre:] = value[first : first + P - pre].float()
        finalize_pages(pages, layout, fin.blocks, k.transpose(1, 2), v.transpose(1, 2), fin.fills, fin.sinks, codebook)
    reopen_pages(pages, staging, layout, plan.reopen.blocks, plan.reopen.slots)
    write_staging(staging, key, value, plan.token_slots, plan.token_offsets)


# --------------------------------------------------------------------------- attention
def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_pages: torch.Tensor,
    staging: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    tail_slots: torch.Tensor,
    layout: PageLayout,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of a batch of new-token chunks over the paged cache (decode and prefill alike).

    Parameters
    ----------
    query : torch.Tensor, shape (T, Hq, D)
        All new tokens of the batch, sequence after sequence.
    key, value : torch.Tensor, shape (T, Hkv, D)
        The same tokens' keys and values (already appended to the cache); they are attended exactly.
    kv_pages : torch.Tensor, shape (NB, Hkv, page_bytes) or (NB, Hkv, P, C), uint8
    staging : torch.Tensor, shape (S, 2, Hkv, P, D)
    block_tables : torch.Tensor, shape (B, max_pages), int — physical block of each logical page.
    seq_lens : torch.Tensor, shape (B,), int — tokens per sequence *including* this step's.
    query_start_loc : torch.Tensor, shape (B + 1,), int — offsets of each chunk in ``query``.
    tail_slots : torch.Tensor, shape (B,), int — staging slot of the last, partial page;
        ``-1`` if it has no partial page or the page was finalised early (read it quantized).
    layout : PageLayout
    scale : float, optional — softmax scale, default ``D ** -0.5``.

    Returns
    -------
    torch.Tensor, shape (T, Hq, D), dtype of ``query``. Math in fp32.
    """
    _check_float("query", query, 3)
    _check_float("key", key, 3)
    _check_float("value", value, 3)
    pages = _pages_flat(kv_pages, layout)
    T, Hq, D = query.shape
    Hkv = key.shape[1]
    if D != layout.head_dim:
        raise ValueError(f"head_dim mismatch: query has {D}, layout.head_dim={layout.head_dim}")
    if key.shape != (T, Hkv, D) or value.shape != key.shape:
        raise ValueError(f"key and value must be ({T}, Hkv, {D}); got {tuple(key.shape)}, {tuple(value.shape)}")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if pages.shape[1] != Hkv:
        raise ValueError(f"kv_pages has {pages.shape[1]} KV heads, key has {Hkv}")
    P = layout.page_size
    if staging.dim() != 5 or tuple(staging.shape[1:]) != (2, Hkv, P, D):
        raise ValueError(f"staging must be (slots, 2, {Hkv}, {P}, {D}), got {tuple(staging.shape)}")
    B = seq_lens.shape[0]
    if query_start_loc.shape != (B + 1,) or tail_slots.shape != (B,) or block_tables.shape[0] != B:
        raise ValueError("seq_lens, query_start_loc (B+1), tail_slots and block_tables must agree on B")
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    out = torch.empty(T, Hq, D, dtype=torch.float32, device=query.device)
    for b in range(B):
        q0, q1 = int(query_start_loc[b]), int(query_start_loc[b + 1])
        n_new, seq_len = q1 - q0, int(seq_lens[b])
        ctx = seq_len - n_new
        if n_new <= 0:
            continue
        if ctx < 0:
            raise ValueError(f"sequence {b}: seq_len {seq_len} is shorter than its {n_new} new tokens")
        ck, cv = gather_context(pages, staging, block_tables[b], ctx, seq_len, int(tail_slots[b]), layout)
        k = torch.cat([ck, key[q0:q1].float()], 0)  # (ctx + n_new, Hkv, D)
        v = torch.cat([cv, value[q0:q1].float()], 0)
        q = query[q0:q1].float().reshape(n_new, Hkv, G, D)
        s = torch.einsum("thgd,shd->hgts", q, k) * scale  # (Hkv, G, n_new, ctx + n_new)
        pos_q = ctx + torch.arange(n_new, device=query.device)
        causal = torch.arange(ctx + n_new, device=query.device).unsqueeze(0) <= pos_q.unsqueeze(1)
        s = s.masked_fill(~causal, -torch.inf)
        p = torch.softmax(s, dim=-1)
        o = torch.einsum("hgts,shd->thgd", p, v)
        out[q0:q1] = o.reshape(n_new, Hq, D)
    return out.to(query.dtype)


def gather_context(
    pages: torch.Tensor,
    staging: torch.Tensor,
    block_table: torch.Tensor,
    ctx: int,
    seq_len: int,
    tail_slot: int,
    layout: PageLayout,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``ctx`` tokens of one sequence as the cache holds them after this step's append.

    Full pages (``(i + 1) * P <= seq_len``) are dequantized; the last, partial page comes from
    its staging slot, or from its block when it was finalised early (``tail_slot < 0``).
    Returns ``(k, v)``, each (ctx, Hkv, D) fp32.
    """
    P, D = layout.page_size, layout.head_dim
    Hkv = pages.shape[1]
    n_pages = -(-ctx // P)
    if n_pages == 0:
        empty = torch.zeros(0, Hkv, D, device=pages.device)
        return empty, empty
    if block_table.shape[0] < n_pages:
        raise ValueError(f"block table has {block_table.shape[0]} pages, context of {ctx} tokens needs {n_pages}")
    last = n_pages - 1
    staged_tail = (last + 1) * P > seq_len and tail_slot >= 0
    n_quant = n_pages - 1 if staged_tail else n_pages
    ks, vs = [], []
    if n_quant:
        blk = block_table[:n_quant].long()
        k, v = dequantize_pages(pages[blk].reshape(n_quant * Hkv, -1), layout)
        ks.append(k.reshape(n_quant, Hkv, P, D).transpose(1, 2).reshape(n_quant * P, Hkv, D))
        vs.append(v.reshape(n_quant, Hkv, P, D).transpose(1, 2).reshape(n_quant * P, Hkv, D))
    if staged_tail:
        ks.append(staging[tail_slot, 0].float().transpose(0, 1))
        vs.append(staging[tail_slot, 1].float().transpose(0, 1))
    return torch.cat(ks, 0)[:ctx], torch.cat(vs, 0)[:ctx]
