"""The page format's encoder and decoder: what the bytes of a page mean, in plain PyTorch.

:class:`~kivi_serve.quant.layout.PageLayout` says where every byte of a page lives; this module
says what goes there: :func:`quantize_pages` (the encoder, which the fused CUDA and CPU append
kernels reproduce bit for bit), :func:`read_pages` (the fields, decoded) and
:func:`dequantize_pages` (the values a query sees). The helpers are public because the accuracy
study and the kernels' tests build on them.

Shapes: ``n`` pages, ``P`` tokens per page, ``D`` head_dim; pages are uint8 ``(n, page_bytes)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kivi_serve.quant.codebook import assign, fit_codebooks, scale_weights
from kivi_serve.quant.layout import PLANES, PageLayout
from kivi_serve.quant.packing import pack_bits, pack_codes, unpack_bits, unpack_codes

FP16_MAX = 65504.0


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 (saturating, never inf) and return as fp32."""
    return x.float().clamp(-FP16_MAX, FP16_MAX).to(torch.float16).float()


def check_float(name: str, x: torch.Tensor, dims: int) -> None:
    """Raise ``ValueError`` unless ``x`` is a floating tensor with ``dims`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {x.dtype}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(x.shape)}")


# --------------------------------------------------------------------------- value rotation
def value_signs(head_dim: int) -> torch.Tensor:
    """The fixed ±1 signs of :func:`rotate_values`: ``-1`` where bit 31 of ``d * 0x9E3779B1 mod 2**32``
    (a Fibonacci hash of the channel index) is set. (D,) fp32."""
    d = torch.arange(head_dim, dtype=torch.int64)
    return torch.where(((d * 0x9E3779B1) >> 31) & 1 == 1, -1.0, 1.0)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` for the Sylvester-Hadamard matrix ``H`` (entries ±1, ``H[i, j] = (-1)**popcount(i & j)``)
    along the last dim (a power of two), as the butterfly computes it: ``log2(D)`` stages of
    ``(a + b, a - b)`` on pairs ``h`` apart, ``h = 1, 2, 4, ...`` (a fixed order of fp32 additions, so a
    kernel can reproduce it bit for bit). x : (..., D) → (..., D) in x's dtype."""
    D = x.shape[-1]
    if D & (D - 1):
        raise ValueError(f"hadamard needs a power-of-two last dim, got {D}")
    lead = x.shape[:-1]
    h = 1
    while h < D:
        y = x.reshape(*lead, D // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, D)
        h *= 2
    return x


def rotate_values(v: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``v @ R`` (``inverse``: ``v @ R.T``) for the orthonormal ``R = diag(s) H / sqrt(D)`` of a layout
    with ``v_rotate`` (``s`` = :func:`value_signs`, ``H`` = :func:`hadamard`'s matrix). Spreads a
    token's few large channels over all of them, so its per-token range (what 2-bit codes divide)
    shrinks. fp32: ``hadamard(v * s) * c`` forward, ``hadamard(v) * c * s`` back, ``c = fp32(1 / sqrt(D))``.
    v : (..., D) → (..., D) fp32."""
    D = v.shape[-1]
    s = value_signs(D).to(v.device)
    c = torch.tensor(1.0 / D**0.5, dtype=torch.float32)
    v = v.float()
    return hadamard(v) * c * s if inverse else hadamard(v * s) * c


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


def choose_k_outliers(k: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def pick_wide_channels(k_scale: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` K channels of each page with the largest scale, ascending.

    Ranking is by the stored fp16 ``k_scale``; equal scales rank the lower channel first (a
    stable descending sort), so the CUDA kernel can rank by counting:
    ``rank[d] = #{e : s[e] > s[d] or (s[e] == s[d] and e < d)}``, wide iff ``rank[d] < count``.
    k_scale : (n, D) → (n, count) int64.
    """
    order = torch.sort(k_scale, dim=1, descending=True, stable=True).indices[:, :count]
    return order.sort(dim=1).values


def range_params(x: torch.Tensor, kept: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16-rounded ``lo`` and ``scale`` of ``x`` over ``kept`` along ``dim`` (0 where nothing is kept)."""
    any_kept = kept.any(dim)
    hi = torch.where(kept, x, -torch.inf).amax(dim)
    lo = torch.where(kept, x, torch.inf).amin(dim)
    lo16 = fp16_round(torch.where(any_kept, lo, 0.0))
    scale16 = fp16_round(torch.where(any_kept, hi - lo16, 0.0)).clamp_min(0.0)
    return lo16, scale16


def normalise(x: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    safe = torch.where(scale > 0, scale, 1.0)
    return torch.where(scale > 0, (x - lo) / safe, 0.0).clamp(0.0, 1.0)


@dataclass
class QuantizedPages:
    """Decoded view of quantized pages (what the bytes say), fp32 unless noted; ``n`` pages.

    k_codes, v_codes : (n, P, D) int64 · k_lo, k_scale : (n, D) · v_lo, v_scale : (n, P) ·
    k_cb, v_cb : (n, L) · exact_k, exact_v : (n, D) or None · exact_idx : (n,) int64 or None ·
    kout_val : (n, D) or None · kout_idx : (n, D) int64 or None · wide_idx : (n, H) int64 or None ·
    wide_cb : (n, 2 * L) or None. ``k_codes`` are full codes: wide channels' carry their top bit.
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
    wide_idx: torch.Tensor | None = None
    wide_cb: torch.Tensor | None = None


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
    check_float("k", k, 3)
    check_float("v", v, 3)
    n, P, D = k.shape
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if P != layout.page_size:
        raise ValueError(f"page size mismatch: k has {P} tokens per page, the layout {layout.page_size}")
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
        kout_idx, drop = choose_k_outliers(kf, k_kept)
        hit = (tok.view(1, P, 1) == kout_idx.unsqueeze(1)) & drop.unsqueeze(1)
        k_kept &= ~hit

    # 3. normalisation: K per channel over kept elements, V per token over its channels (of the
    # rotated value with ``v_rotate``).
    k_lo, k_scale = range_params(kf, k_kept, dim=1)  # (n, D)
    uk = torch.where(valid.unsqueeze(-1), normalise(kf, k_lo.unsqueeze(1), k_scale.unsqueeze(1)), 0.0)
    vc = rotate_values(vf) if layout.v_rotate else vf  # what the V codes describe
    v_lo, v_scale = range_params(vc, valid.unsqueeze(-1).expand(n, P, D), dim=2)  # (n, P)
    uv = normalise(vc, v_lo.unsqueeze(-1), v_scale.unsqueeze(-1))
    v_kept = kept_tok.unsqueeze(-1).expand(n, P, D)

    # 4. the wide K channels (largest fp16 scale, ties to the lower channel) get one more bit.
    H = layout.wide_channels
    hi_idx = pick_wide_channels(k_scale, H)  # (n, H) ascending
    hi = torch.zeros(n, D, dtype=torch.bool, device=dev)
    hi.scatter_(1, hi_idx, True)
    hi3 = hi.unsqueeze(1).expand(n, P, D)

    # 5. codebooks fitted on kept elements, then codes (rows past ``fill`` normalise to 0 → code 0).
    # K levels are fitted for the error of k itself (weights ∝ k_scale²); V's per-token scales vary
    # less and weighting them did not help (docs/accuracy.md).
    wk = scale_weights(k_scale).unsqueeze(1).expand(n, P, D).reshape(n, -1)
    k_cb = fit_codebooks(uk.reshape(n, -1), (k_kept & ~hi3).reshape(n, -1), layout.k_bits, codebook, wk)
    v_cb = fit_codebooks(uv.reshape(n, -1), v_kept.reshape(n, -1), layout.v_bits, codebook,
                         pin_ends=layout.v_pin_ends)
    k_codes = assign(uk.reshape(n, -1), k_cb).reshape(n, P, D)
    v_codes = assign(uv.reshape(n, -1), v_cb).reshape(n, P, D)
    if H:
        hi_kept = (k_kept & hi3).reshape(n, -1)
        wide_cb = fit_codebooks(uk.reshape(n, -1), hi_kept, layout.k_bits + 1, codebook, wk)
        k_codes = torch.where(hi3, assign(uk.reshape(n, -1), wide_cb).reshape(n, P, D), k_codes)

    pages = torch.zeros(n, layout.page_bytes, dtype=torch.uint8, device=dev)
    low = (1 << layout.k_bits) - 1
    for i, plane in enumerate(pack_codes(k_codes & low, layout.k_bits)):
        layout.write_bytes(pages, f"k_plane{i}", plane)
    if H:
        top = k_codes.gather(2, hi_idx.unsqueeze(1).expand(n, P, H)) >> layout.k_bits
        top = top.transpose(1, 2)  # (n, H, P)
        layout.write_bytes(pages, "wide_plane", pack_bits(top).reshape(n, -1))
        layout.write(pages, "wide_cb", wide_cb)
        layout.write(pages, "wide_idx", hi_idx)
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
        layout.write(pages, "exact_k", fp16_round(kf[rows, exact_idx]))
        layout.write(pages, "exact_v", fp16_round(vf[rows, exact_idx]))
        layout.write(pages, "exact_idx", exact_idx.unsqueeze(1))
    if kout_idx is not None:
        layout.write(pages, "kout_val", fp16_round(kf.gather(1, kout_idx.unsqueeze(1)).squeeze(1)))
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
    if layout.wide_channels:
        H = layout.wide_channels
        q.wide_idx = layout.view(pages, "wide_idx").long()
        q.wide_cb = f("wide_cb")
        top = unpack_bits(layout.raw(pages, "wide_plane").reshape(n, H, P // 8), P)
        top = top.transpose(1, 2)  # (n, P, H)
        idx = q.wide_idx.unsqueeze(1).expand(n, P, H)
        q.k_codes.scatter_(2, idx, q.k_codes.gather(2, idx) | (top << layout.k_bits))
    return q


def dequantize_pages(pages: torch.Tensor, layout: PageLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages → ``(k, v)``, each (n, P, D) fp32: ``lo + scale * cb[code]`` (values rotated back with
    ``v_rotate``), then the exact K outliers, then the exact token (which wins where both apply).
    """
    if pages.dim() != 2:
        raise ValueError(f"pages must be (n, page_bytes), got shape {tuple(pages.shape)}")
    q = read_pages(pages, layout)
    P, D = layout.page_size, layout.head_dim
    if q.wide_idx is None:
        k_level = torch.gather(q.k_cb.unsqueeze(1).expand(-1, P, -1), 2, q.k_codes)
    else:  # wide channels read their own codebook with the full code
        hi = torch.zeros(q.k_codes.shape[0], D, dtype=torch.bool, device=pages.device)
        hi.scatter_(1, q.wide_idx, True)
        low = (1 << layout.k_bits) - 1
        k_level = torch.where(
            hi.unsqueeze(1),
            torch.gather(q.wide_cb.unsqueeze(1).expand(-1, P, -1), 2, q.k_codes),
            torch.gather(q.k_cb.unsqueeze(1).expand(-1, P, -1), 2, q.k_codes & low),
        )
    k = q.k_lo.unsqueeze(1) + q.k_scale.unsqueeze(1) * k_level
    v = q.v_lo.unsqueeze(-1) + q.v_scale.unsqueeze(-1) * torch.gather(
        q.v_cb.unsqueeze(1).expand(-1, layout.page_size, -1), 2, q.v_codes
    )
    if layout.v_rotate:
        v = rotate_values(v, inverse=True)
    if q.kout_idx is not None:
        k.scatter_(1, q.kout_idx.unsqueeze(1), q.kout_val.unsqueeze(1))
    if q.exact_idx is not None:
        rows = torch.arange(pages.shape[0], device=pages.device)
        k[rows, q.exact_idx] = q.exact_k
        v[rows, q.exact_idx] = q.exact_v
    return k, v
