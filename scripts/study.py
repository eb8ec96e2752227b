"""The accuracy study behind docs/accuracy.md: ``python scripts/study.py`` (a development tool run
from the repository root, not part of the package).

It loads the model once, makes the unquantized reference run once, and then measures variants of
the page format through the real harness (:mod:`kivi_serve.eval.harness`, same semantics, same
windows). Variants of the quantization *rules* (which token the exact slot keeps, Lloyd weights,
V outliers instead of K outliers, ...) go through :func:`simulate`, a re-implementation of
``quantize_pages`` → ``dequantize_pages`` with knobs; the ``selfcheck`` experiment proves that
with the default knobs it reproduces the reference bit for bit, so a variant differs from the
reference only by its knob.

Experiments (run any subset; default: all, in this order)::

    selfcheck   simulate(default) == reference round trip, bit for bit
    table       the headline table (every scheme) at page 128 and page 64
    ablate      K only / V only quantized; without wide channels / K weights / exact token
    diagnose    per-layer and per-head error (attention TV distance, output error from K and V),
                attention on the sink and on the exact token, which tokens the exact slot keeps
    rules       exact-token rules and Lloyd weights
    hi          wide K channels (more bits for the largest-range channels) on the first format
    kweight     Lloyd weights ∝ scale² for K, every mode
    modes       the 3-bit and 4-bit modes, K only / V only
    layouts     V or K outliers on top, page sizes
    passkey     teacher-forced passkey: where the 2-bit format loses the key (K or V, each part)
    proto       format prototypes within 2.5 bits (rotation, sink outside the pages) on both tasks
    protokey    retrieval only: 2-bit, the sink-outside prototype, K only / V only (long contexts)
    p256        256-token pages with 7D/16 wide K channels (kivi-serve-2bit-p256) on both tasks
    p256ppl     the same, perplexity only (7D/16, and 3D/16, 6D/16, 5D/16 wide channels at page 256)
    p256o       page 256 with K outliers and 6D/16 wide channels (p256's failed trials, perplexity)
    vbits       value-side candidates (issue 16): bits per element at head_dim 128 and 64
    vproxy      their value reconstruction error on the model's own values, early / late layers
    vkey        their teacher-forced passkey on the engine grid's prompts (``--trials``, ``--candidates``)
    vppl        their perplexity (``--no-baselines``: candidates only; ``--named``: named schemes too)
    prkey       teacher-forced passkey of ``--named`` schemes on the engine reports' prompts, paired
    needle      oracle: ``--named`` schemes with only the needle's keys (or keys and values) read back
                exact, on the engine reports' prompts (``--trials``)
    findneedle  could a rule at page finalisation find the needle? The rank of the key's tokens in
                their page by attention received so far and by the quantizer's outlier score
    queryrank   could the question find the needle in a 2-bit cache? The rank of the key's tokens in
                the attention of the query that predicts its first digit, fp16 and ``--named``
    layerbits   per-layer precision: ``--layers`` at 4 bits, the rest p256-vr without wide channels

``--windows/--window-len`` default to the bar's 4 × 1024; ``--screen`` uses 2 × 1024 for
quicker comparisons. Results print as tables and, with ``--out FILE``, append as JSON lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

import torch

from kivi_serve.eval import harness as H
from kivi_serve.quant import page as R
from kivi_serve.quant.codebook import LLOYD_STEPS, assign, fit_codebooks, scale_weights, uniform_levels
from kivi_serve.quant.layout import META_BYTES, PageLayout, align_up
from kivi_serve.quant.schemes import REFERENCE_HEAD_DIM, SCHEMES, Scheme, get_scheme


# --------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """Knobs of the simulated quantizer; the defaults are the reference ``kivi-serve-2bit``."""

    k_bits: int = 2
    v_bits: int = 2
    exact_rule: str = "outlier"  # none | sink | outlier | knorm | kdist | shrink | vnorm | oracle
    sink: bool = True  # first page keeps token 0 (when exact_rule != none)
    k_outliers: bool = False  # one exact element per K channel
    v_outliers: bool = False  # one exact element per V token (layout change)
    codebook: str = "fitted"
    k_weight: str = "scale2"  # none | scale2 (per channel)
    v_weight: str = "none"  # none | scale2 (per token)
    steps: int = LLOYD_STEPS
    wide_16ths: int = 3  # > 0: the D * wide_16ths / 16 K channels with the largest scale get wide_bits codes
    wide_bits: int = 0  # 0: k_bits + 1 (what the page format stores)
    k_rotate: bool = False  # quantize R·k for a fixed orthonormal R per head_dim (randomised Hadamard)
    side_sink: bool = False  # the sink token lives outside the pages (per sequence): no slot per page
    # value-side knobs (issue 16, fifth session; all off: the reference's values)
    v_rotate: bool = False  # quantize v·R_v (another randomised Hadamard); the kernel rotates the output back
    v_pin: bool = True  # V codebook ends pinned at the token's min and max (False: plain Lloyd, ends free)
    v_groups: int = 1  # per-token lo/scale for each of v_groups contiguous channel groups
    v_wide: int = 0  # V channels per page (largest range over the page) taken out of the per-token range,
    #                  coded per channel (own lo/scale) with v_bits + 1 bits
    v_hi: int = 0  # value rows per page (largest 2-bit error) re-coded with v_hi_bits
    v_hi_bits: int = 4
    v_exact: int = 0  # value rows per page (largest 2-bit error) kept exactly (fp16)

    def __post_init__(self) -> None:
        if not self.wide_bits:
            object.__setattr__(self, "wide_bits", self.k_bits + 1)

    def wide(self, head_dim: int) -> int:
        return head_dim * self.wide_16ths // 16

    def value_knobs(self) -> bool:
        """True if any value-side knob is set (values go through :func:`simulate_values`)."""
        return bool(self.v_rotate or not self.v_pin or self.v_groups > 1 or self.v_wide or self.v_hi
                    or self.v_exact)

    def value_bytes(self, content: int, head_dim: int, page_size: int) -> int:
        """``content`` bytes plus the sections the value knobs add, each 16-byte aligned (rotation and
        free codebook ends cost nothing)."""
        D, P = head_dim, page_size
        sections = []
        if self.v_groups > 1:  # fp16 lo and scale per token for each further group
            if D % self.v_groups:
                raise ValueError(f"v_groups={self.v_groups} does not divide head_dim {D}")
            sections += [(self.v_groups - 1) * P * META_BYTES] * 2
        if self.v_wide:  # top bit plane, fp16 lo/scale per channel, uint8 channel index, codebook
            sections += [self.v_wide * P // 8, self.v_wide * META_BYTES, self.v_wide * META_BYTES,
                         self.v_wide, (2 << self.v_bits) * META_BYTES]
        if self.v_hi:  # the extra low bits of the re-coded rows, uint8 token index, their codebook
            sections += [self.v_hi * D * (self.v_hi_bits - self.v_bits) // 8, self.v_hi,
                         (1 << self.v_hi_bits) * META_BYTES]
        if self.v_exact:  # fp16 rows, uint8 token index
            sections += [self.v_exact * D * META_BYTES, self.v_exact]
        for n in sections:
            content = align_up(content) + n
        return content

    def bits(self, head_dim: int, page_size: int) -> float:
        c = self.wide(head_dim)
        native = c and self.wide_bits == self.k_bits + 1  # what PageLayout itself stores
        slot = int(self.exact_rule != "none" and not (self.side_sink and self.exact_rule == "sink"))
        layout = PageLayout(
            head_dim,
            page_size,
            self.k_bits,
            self.v_bits,
            slot,
            int(self.k_outliers),
            wide_channels=c if native else 0,
        )
        content = layout.content_bytes
        if self.v_outliers:  # fp16 value + uint8 index per token, each section 16-byte aligned
            content = align_up(content) + page_size * META_BYTES
            content = align_up(content) + page_size
        if c and not native:  # extra code bits for c channels, their codebook, their channel indices
            content = align_up(content) + c * page_size * (self.wide_bits - self.k_bits) // 8
            content = align_up(content) + (1 << self.wide_bits) * META_BYTES
            content = align_up(content) + c
        content = self.value_bytes(content, head_dim, page_size)
        slot = math.ceil(content / page_size)
        return slot * page_size * 8 / (2 * page_size * head_dim)


#: The reference's other schemes as variants (selfcheck).
K3V2 = Variant(3, 2)
K4V4 = Variant(4, 4, wide_16ths=0)
KIVI2 = Variant(exact_rule="none", codebook="uniform", wide_16ths=0)
#: The format before the wide channels (the first screening table's default).
FIRST = Variant(k_outliers=True, k_weight="none", wide_16ths=0, wide_bits=3)


#: Attention received by each key of the pages being quantized (oracle exact-token rule only).
_ORACLE_RECEIVED: torch.Tensor | None = None


def exact_token_scores(rule: str, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-token score (n, P) fp64; the exact slot of a non-first page keeps the argmax."""
    kd, vd = k.double(), v.double()
    if rule == "outlier":
        return R.outlier_token_score(k, torch.ones(k.shape[:2], dtype=torch.bool, device=k.device))
    if rule == "knorm":
        return (kd * kd).sum(-1)
    if rule == "kdist":  # distance from the page's mean key, per channel in units of the range
        rng = (kd.amax(1, keepdim=True) - kd.amin(1, keepdim=True)).clamp_min(1e-30)
        z = (kd - kd.mean(1, keepdim=True)) / rng
        return (z * z).sum(-1)
    if rule == "shrink":  # how much removing the token shrinks the channel ranges (relative)
        hi, lo = kd.amax(1, keepdim=True), kd.amin(1, keepdim=True)
        rng = (hi - lo).clamp_min(1e-30)
        top2 = kd.topk(2, dim=1).values  # (n, 2, D)
        bot2 = (-kd).topk(2, dim=1).values.neg()
        gain_hi = torch.where(kd == hi, (top2[:, 0:1] - top2[:, 1:2]), 0.0)
        gain_lo = torch.where(kd == lo, (bot2[:, 1:2] - bot2[:, 0:1]), 0.0)
        return ((gain_hi + gain_lo) / rng).sum(-1)
    if rule == "vnorm":
        return (vd * vd).sum(-1)
    if rule == "oracle":
        if _ORACLE_RECEIVED is None:
            raise RuntimeError("oracle rule needs the study's attention hook")
        return _ORACLE_RECEIVED.double()
    raise ValueError(f"unknown exact_rule {rule!r}")


def rotation(D: int, device=None, seed: int | None = None) -> torch.Tensor:
    """A fixed orthonormal (D, D) matrix: Sylvester-Hadamard / sqrt(D) with seeded random column signs
    (``D`` a power of two; ``seed`` default ``D``). Quantizing ``k @ R`` and reading back ``k_hat @ R.T``
    is what a kernel that rotates the query the same way computes (``q · k == (q R) · (k R)``): no bytes
    in the page. For values, ``sum_t p_t (v_t R) R.T``: the kernel rotates each output row back once."""
    if D & (D - 1):
        raise ValueError(f"head_dim {D} is not a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < D:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    g = torch.Generator().manual_seed(D if seed is None else seed)
    signs = torch.randint(0, 2, (D,), generator=g).double() * 2 - 1
    return (h * signs / math.sqrt(D)).float().to(device)


def fit_free(u: torch.Tensor, mask: torch.Tensor, bits: int, mode: str = "fitted", weight=None,
             steps: int = LLOYD_STEPS) -> torch.Tensor:
    """Per-page Lloyd-Max codebooks with *free* end levels (plain MSE; simulation only, float sums):
    the value-side alternative to :func:`fit_codebooks`' pinned ends. Same shapes and fp16 result."""
    n, L = u.shape[0], 1 << bits
    levels = uniform_levels(bits).to(u.device).expand(n, L).clone()
    if mode == "uniform":
        return levels.to(torch.float16)
    w = mask.double() if weight is None else weight.double() * mask
    ud = u.double()
    for _ in range(steps):
        codes = assign(u, levels)
        zeros = torch.zeros(n, L, dtype=torch.float64, device=u.device)
        sw, swu = zeros.scatter_add(1, codes, w), zeros.scatter_add(1, codes, w * ud)
        levels = torch.where(sw > 0, swu / sw.clamp_min(1e-300), levels.double()).float()
    return torch.cummax(levels.to(torch.float16).float(), dim=1).values.to(torch.float16)


def simulate_values(v: torch.Tensor, kept_tok: torch.Tensor, var: Variant) -> torch.Tensor:
    """The values a page reads back under ``var``'s value knobs (rotation, free codebook ends, channel
    groups, wide V channels, re-coded or exact rows); the exact-slot token (``~kept_tok``) is left to
    the caller. With every value knob off this is the reference's value path (``selfcheck``).

    v : (n, P, D) fp32; kept_tok : (n, P) bool → v_hat (n, P) fp32.
    """
    n, P, D = v.shape
    if var.v_rotate:
        rot = rotation(D, v.device, seed=D + 1)
        return simulate_values(v @ rot, kept_tok, replace(var, v_rotate=False)) @ rot.T
    dev = v.device
    kept = kept_tok.unsqueeze(-1).expand(n, P, D)
    wide = torch.zeros(n, D, dtype=torch.bool, device=dev)
    if var.v_wide:  # the channels with the largest (fp16) range over the page's kept tokens
        rng = torch.where(kept, v, -torch.inf).amax(1) - torch.where(kept, v, torch.inf).amin(1)
        wide.scatter_(1, R.pick_wide_channels(R.fp16_round(rng), var.v_wide), True)
    wide3 = wide.unsqueeze(1).expand(n, P, D)
    lo = torch.zeros(n, P, D, device=dev)
    scale = torch.zeros(n, P, D, device=dev)
    group = torch.arange(D, device=dev) // (D // var.v_groups)
    for g in range(var.v_groups):  # per token and channel group, over the group's non-wide channels
        cols = group == g
        g_lo, g_scale = R.range_params(v[..., cols], ~wide3[..., cols], dim=2)
        lo[..., cols], scale[..., cols] = g_lo.unsqueeze(-1), g_scale.unsqueeze(-1)
    if var.v_wide:  # wide channels: per channel over the page's kept tokens
        c_lo, c_scale = R.range_params(v, kept, dim=1)
        lo = torch.where(wide3, c_lo.unsqueeze(1), lo)
        scale = torch.where(wide3, c_scale.unsqueeze(1), scale)
    uv = R.normalise(v, lo, scale).reshape(n, -1)
    fit = fit_codebooks if var.v_pin else fit_free

    def decode(mask: torch.Tensor, bits: int) -> torch.Tensor:
        cb = fit(uv, mask.reshape(n, -1), bits, var.codebook, None, var.steps).float()
        return torch.gather(cb, 1, assign(uv, cb)).reshape(n, P, D)

    level = decode(kept & ~wide3, var.v_bits)
    if var.v_wide:
        level = torch.where(wide3, decode(kept & wide3, var.v_bits + 1), level)
    v_hat = lo + scale * level
    if var.v_exact or var.v_hi:  # rows ranked by their squared error (the exact-slot token excluded)
        err = torch.where(kept_tok, ((v_hat - v) ** 2).sum(-1), -1.0)
        rows = torch.arange(n, device=dev).unsqueeze(1)
        if var.v_exact:
            top = err.topk(var.v_exact, dim=1).indices
            v_hat[rows, top] = R.fp16_round(v[rows, top])
            err[rows, top] = -1.0
        if var.v_hi:
            top = err.topk(var.v_hi, dim=1).indices
            sel = torch.zeros(n, P, dtype=torch.bool, device=dev)
            sel[rows, top] = True
            sel3 = sel.unsqueeze(-1).expand(n, P, D) & ~wide3
            v_hat = torch.where(sel3, lo + scale * decode(sel3, var.v_hi_bits), v_hat)
    return v_hat


def simulate(
    k: torch.Tensor, v: torch.Tensor, sink: torch.Tensor, var: Variant
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``dequantize_pages(quantize_pages(k, v, ...))`` reads back under the variant's rules.

    k, v : (n, P, D) full pages; sink : (n,) bool → (k_hat, v_hat) fp32 and exact_idx (n,) (-1: none).
    """
    if var.k_rotate:
        rot = rotation(k.shape[-1], k.device)
        k_hat, v_hat, idx = simulate(k.float() @ rot, v, sink, replace(var, k_rotate=False))
        return k_hat @ rot.T, v_hat, idx
    n, P, D = k.shape
    dev = k.device
    kf, vf = k.float(), v.float()
    tok = torch.arange(P, device=dev)
    rows = torch.arange(n, device=dev)
    kept_tok = torch.ones(n, P, dtype=torch.bool, device=dev)
    exact_idx = torch.full((n,), -1, dtype=torch.long, device=dev)
    if var.exact_rule != "none":
        if var.exact_rule == "sink":
            exact_idx = torch.where(sink, 0, -1)
        else:
            exact_idx = exact_token_scores(var.exact_rule, kf, vf).argmax(1)
            if var.sink:
                exact_idx = torch.where(sink, 0, exact_idx)
        kept_tok &= tok.unsqueeze(0) != exact_idx.unsqueeze(1)
    k_kept = kept_tok.unsqueeze(-1).expand(n, P, D).clone()
    kout_idx = None
    if var.k_outliers:
        kout_idx, drop = R.choose_k_outliers(kf, k_kept)
        k_kept &= ~((tok.view(1, P, 1) == kout_idx.unsqueeze(1)) & drop.unsqueeze(1))
    v_kept = kept_tok.unsqueeze(-1).expand(n, P, D).clone()
    vout_idx = None
    if var.v_outliers:  # per token: drop whichever channel extreme shrinks the token's range more
        vout_idx, drop = R.choose_k_outliers(vf.transpose(1, 2), v_kept.transpose(1, 2))  # (n, P)
        v_kept &= ~(
            (torch.arange(D, device=dev).view(1, 1, D) == vout_idx.unsqueeze(-1)) & drop.unsqueeze(-1)
        )
        v_range_kept = v_kept | ~kept_tok.unsqueeze(-1)  # the exact token's row keeps its own range
        v_range_kept &= ~(
            (torch.arange(D, device=dev).view(1, 1, D) == vout_idx.unsqueeze(-1)) & drop.unsqueeze(-1)
        )
    else:
        v_range_kept = torch.ones(n, P, D, dtype=torch.bool, device=dev)

    k_lo, k_scale = R.range_params(kf, k_kept, dim=1)
    uk = R.normalise(kf, k_lo.unsqueeze(1), k_scale.unsqueeze(1))
    v_lo, v_scale = R.range_params(vf, v_range_kept, dim=2)
    uv = R.normalise(vf, v_lo.unsqueeze(-1), v_scale.unsqueeze(-1))

    wk = wv = None
    if var.k_weight == "scale2":
        wk = scale_weights(k_scale).unsqueeze(1).expand(n, P, D).reshape(n, -1)
    if var.v_weight == "scale2":
        wv = scale_weights(v_scale).unsqueeze(-1).expand(n, P, D).reshape(n, -1)
    c = var.wide(D)
    hi = torch.zeros(n, D, dtype=torch.bool, device=dev)
    if c:  # the c channels with the largest (fp16) scale; ties go to the lower channel index
        order = torch.sort(k_scale, dim=1, descending=True, stable=True).indices[:, :c]
        hi.scatter_(1, order, True)
    hi3 = hi.unsqueeze(1).expand(n, P, D)
    k_cb = fit_codebooks(
        uk.reshape(n, -1), (k_kept & ~hi3).reshape(n, -1), var.k_bits, var.codebook, wk, var.steps
    ).float()
    v_cb = fit_codebooks(
        uv.reshape(n, -1), v_kept.reshape(n, -1), var.v_bits, var.codebook, wv, var.steps
    ).float()
    k_codes = assign(uk.reshape(n, -1), k_cb).reshape(n, P, D)
    v_codes = assign(uv.reshape(n, -1), v_cb).reshape(n, P, D)
    k_lv = torch.gather(k_cb.unsqueeze(1).expand(-1, P, -1), 2, k_codes)
    if c:
        hi_cb = fit_codebooks(
            uk.reshape(n, -1), (k_kept & hi3).reshape(n, -1), var.wide_bits, var.codebook, wk, var.steps
        ).float()
        hi_codes = assign(uk.reshape(n, -1), hi_cb).reshape(n, P, D)
        k_lv = torch.where(hi3, torch.gather(hi_cb.unsqueeze(1).expand(-1, P, -1), 2, hi_codes), k_lv)
    k_hat = k_lo.unsqueeze(1) + k_scale.unsqueeze(1) * k_lv
    v_hat = v_lo.unsqueeze(-1) + v_scale.unsqueeze(-1) * torch.gather(
        v_cb.unsqueeze(1).expand(-1, P, -1), 2, v_codes
    )
    if var.value_knobs():
        if var.v_outliers:
            raise ValueError("the value knobs do not combine with v_outliers")
        v_hat = simulate_values(vf, kept_tok, var)
    if kout_idx is not None:
        k_hat.scatter_(1, kout_idx.unsqueeze(1), R.fp16_round(kf.gather(1, kout_idx.unsqueeze(1))))
    if vout_idx is not None:
        v_hat.scatter_(2, vout_idx.unsqueeze(-1), R.fp16_round(vf.gather(2, vout_idx.unsqueeze(-1))))
    has = exact_idx >= 0
    if has.any():
        r, e = rows[has], exact_idx[has]
        k_hat[r, e] = R.fp16_round(kf[r, e])
        v_hat[r, e] = R.fp16_round(vf[r, e])
    return k_hat, v_hat, exact_idx


class VariantScheme(Scheme):
    """A harness scheme whose pages go through :func:`simulate` with ``variant``'s knobs."""

    def __init__(self, name: str, variant: Variant, keep_exact: tuple[str, ...] = ()):
        super().__init__(
            name,
            variant.k_bits,
            variant.v_bits,
            int(variant.exact_rule != "none"),
            int(variant.k_outliers),
            variant.codebook,
            keep_exact=keep_exact,
        )
        object.__setattr__(self, "variant", variant)
        object.__setattr__(self, "last_exact_idx", None)

    def bits_per_element(self, head_dim: int = REFERENCE_HEAD_DIM, page_size: int = 128) -> float:
        return self.variant.bits(head_dim, page_size)

    def roundtrip(self, k, v, page_size, sink):
        kq, vq, idx = simulate(k, v, sink, self.variant)
        object.__setattr__(self, "last_exact_idx", idx)
        if "k" in self.keep_exact:
            kq = k.float()
        if "v" in self.keep_exact:
            vq = v.float()
        return kq, vq


# --------------------------------------------------------------------------- the study driver
@dataclass
class Study:
    lm: H.LoadedModel
    ids: torch.Tensor
    out: str | None = None
    refs: dict = field(default_factory=dict)
    corpus: str = ""
    passkey_contexts: tuple[int, ...] | None = None
    passkey_seeds: int | None = None
    candidates: str | None = None  # value screens: candidate ids (VALUE_CANDIDATES), None: all
    trials: str | None = None  # value screens: context/depth/seed cells, None: the 1K-2K grid
    no_baselines: bool = False  # vppl: candidates only (the baselines' rows are already measured)
    layers: tuple[int, ...] = ()  # layerbits: the layers stored at 4 bits
    named: tuple = ()  # value screens: named schemes (e.g. REFERENCE_SCHEMES) measured after the candidates

    def reference(self) -> H.SchemeRun:
        if "fp16" not in self.refs:
            self.refs["fp16"] = H.run_scheme(self.lm, self.ids, SCHEMES["fp16"], 128)
        return self.refs["fp16"]

    def measure(self, scheme: Scheme, page_size: int = 128, tag: str = "", observer=None) -> dict:
        t0 = time.time()
        run = H.run_scheme(self.lm, self.ids, scheme, page_size, observer)
        row = H.summarize(run, self.reference(), page_size, self.lm.head_dim)
        row.update(
            experiment=tag,
            page_size=page_size,
            windows=self.ids.shape[0],
            window_len=self.ids.shape[1],
            seconds=round(time.time() - t0, 1),
        )
        self.emit(row)
        return row

    def emit(self, row: dict) -> None:
        if "ppl" in row:
            print(
                f"  {row.get('experiment', ''):10s} {row['scheme']:34s} P={row.get('page_size', ''):<4} "
                f"ppl {row['ppl']:8.3f}  Δ {row['delta_pct']:+7.2f} %  top-1 {row['top1_agreement']:.3f}  "
                f"bits {row['bits_per_element']:.3f}/{row['bits_per_element_model']:.3f}  "
                f"({row.get('seconds', '')} s)",
                flush=True,
            )
        else:
            print("  " + json.dumps(row), flush=True)
        if self.out:
            with open(self.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")


def exp_selfcheck(st: Study) -> None:
    """simulate(default Variant) reproduces the reference round trip exactly (on real K/V)."""
    caught = {}

    def grab(d):
        if d["layer"] in (0, 15, 29) and d["layer"] not in caught:
            caught[d["layer"]] = (d["key"].detach().clone(), d["value"].detach().clone())

    H.run_scheme(st.lm, st.ids[:1], SCHEMES["kivi-serve-2bit"], 128, grab)
    worst = 0.0
    for k, v in caught.values():
        for P in (64, 128, 256):
            B, Hk, T, D = k.shape
            n = T // P
            kp = k[:, :, : n * P].reshape(-1, P, D)
            vp = v[:, :, : n * P].reshape(-1, P, D)
            sink = (torch.arange(kp.shape[0]) % n) == 0
            pairs = [(Variant(), "kivi-serve-2bit"), (K3V2, "kivi-serve-3bit"), (K4V4, "kivi-serve-4bit"),
                     (KIVI2, "kivi2-uniform")] if P < 256 else [(P256, "kivi-serve-2bit-p256")]
            for var, scheme in pairs:
                a = SCHEMES[scheme].roundtrip(kp, vp, P, sink)
                b = simulate(kp, vp, sink, var)
                worst = max(worst, (a[0] - b[0]).abs().max().item(), (a[1] - b[1]).abs().max().item())
                # the value knobs' own path, every knob off, is the reference's values too
                kept = torch.ones(kp.shape[:2], dtype=torch.bool)
                has = b[2] >= 0
                kept[has.nonzero().squeeze(1), b[2][has]] = False
                vv = torch.where(kept.unsqueeze(-1), simulate_values(vp.float(), kept, var), a[1])
                worst = max(worst, (vv - a[1]).abs().max().item())
    st.emit({"experiment": "selfcheck", "max_abs_diff": worst})
    if worst != 0.0:
        raise SystemExit(f"selfcheck failed: simulate differs from the reference by {worst}")


def exp_table(st: Study) -> None:
    for P in (128, 64):
        for name in SCHEMES:
            if name != "fp16":
                st.measure(SCHEMES[name], P, "table")


def exp_ablate(st: Study) -> None:
    base = Variant()
    st.measure(VariantScheme("2bit K only (V exact)", base, ("v",)), 128, "ablate")
    st.measure(VariantScheme("2bit V only (K exact)", base, ("k",)), 128, "ablate")
    st.measure(VariantScheme("uniform K only", KIVI2, ("v",)), 128, "ablate")
    st.measure(VariantScheme("uniform V only", KIVI2, ("k",)), 128, "ablate")
    st.measure(VariantScheme("no wide K channels", replace(base, wide_16ths=0)), 128, "ablate")
    st.measure(VariantScheme("no K weights (plain Lloyd)", replace(base, k_weight="none")), 128, "ablate")
    st.measure(VariantScheme("no exact token", replace(base, exact_rule="none")), 128, "ablate")
    st.measure(
        VariantScheme("sink only (no page outlier token)", replace(base, exact_rule="sink")), 128, "ablate"
    )
    st.measure(VariantScheme("uniform codebooks", replace(base, codebook="uniform")), 128, "ablate")


def exp_diagnose(st: Study, scheme: Scheme | None = None, windows: int = 2) -> None:
    """Per layer and KV head, with the quantized run's own inputs at that layer."""
    scheme = scheme or VariantScheme("kivi-serve-2bit", Variant())
    acc = defaultdict(lambda: defaultdict(float))
    picks: Counter = Counter()
    received = defaultdict(float)

    def obs(d):
        q, k, v, kd, vd, m, p = (
            d["query"],
            d["key"],
            d["value"],
            d["k_deq"],
            d["v_deq"],
            d["mask"],
            d["probs"],
        )
        s = d["scaling"]
        out_ref, p_ref = H.mixed_attention(q, k, v, None, None, None, s)
        out_k, _ = H.mixed_attention(q, k, v, kd, v, m, s)
        out_v, _ = H.mixed_attention(q, k, v, k, vd, m, s)
        B, Hq, T, D = q.shape
        Hk = k.shape[1]
        G = Hq // Hk
        rows = m.any(1)  # queries that read at least one finalised page

        def err(o):  # relative L2 error per kv head over those queries
            e = o - out_ref
            e = e.reshape(B, Hk, G, T, D)[..., rows, :].pow(2).sum((0, 2, 3, 4))
            r = out_ref.reshape(B, Hk, G, T, D)[..., rows, :].pow(2).sum((0, 2, 3, 4))
            return (e / r).sqrt()

        # attention depends on K only: TV is the key error's effect on where attention goes
        tv = 0.5 * (p - p_ref).abs().sum(-1)[..., rows].mean((0, 2, 3))  # (Hk,)
        sinkmass = p_ref[..., 1:, 0].mean((0, 2, 3))
        L = d["layer"]
        for h in range(Hk):
            a = acc[(L, h)]
            a["n"] += 1
            a["err_both"] += err(d["out"])[h].item()
            a["err_k"] += err(out_k)[h].item()
            a["err_v"] += err(out_v)[h].item()
            a["tv"] += tv[h].item()
            a["sink_mass"] += sinkmass[h].item()
        # exact-slot pick vs the key that received most attention from dequantized reads
        idx = getattr(scheme, "last_exact_idx", None)
        if idx is not None:
            P = 128
            n_pages = T // P
            recv = (p_ref * m).sum((2, 3)).reshape(B, Hk, n_pages, P)  # (B, Hk, pages, P)
            idx = idx.reshape(B, Hk, n_pages)
            tot = recv.sum(-1).clamp_min(1e-30)
            got = recv.gather(-1, idx.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            best = recv.amax(-1)
            nz = torch.arange(n_pages) > 0
            received["picked"] += (got / tot)[..., nz].mean().item()
            received["oracle"] += (best / tot)[..., nz].mean().item()
            received["n"] += 1
            ids = st.ids[d["window"]]
            for b in range(B):
                for h in range(Hk):
                    for j in range(1, n_pages):
                        picks[st.lm.tokenizer.decode([int(ids[j * P + idx[b, h, j]])])] += 1

    H.run_scheme(st.lm, st.ids[:windows], scheme, 128, obs)
    layers = sorted({L for L, _ in acc})
    n_heads = max(h for _, h in acc) + 1
    print(
        f"\n  diagnose {scheme.name}: per layer, mean over {n_heads} KV heads "
        "(rel. L2 output error; TV of attention)"
    )
    print("  layer  err_both  err_Konly  err_Vonly   TV      sink_mass   worst-head(err_both)")
    for L in layers:
        rows = [{k: v / acc[(L, h)]["n"] for k, v in acc[(L, h)].items() if k != "n"} for h in range(n_heads)]
        mean = {k: sum(r[k] for r in rows) / n_heads for k in rows[0]}
        worst = max(range(n_heads), key=lambda h: rows[h]["err_both"])
        print(
            f"  {L:5d}  {mean['err_both']:.4f}    {mean['err_k']:.4f}     {mean['err_v']:.4f}   "
            f"{mean['tv']:.4f}  "
            f"{mean['sink_mass']:.3f}      h{worst} {rows[worst]['err_both']:.4f}"
        )
        st.emit(
            {
                "experiment": "diagnose",
                "scheme": scheme.name,
                "layer": L,
                "heads": [{k: round(v, 5) for k, v in r.items()} for r in rows],
            }
        ) if st.out else None
    if received["n"]:
        print(
            "  exact slot (non-first pages): share of the page's dequantized-read attention on the kept "
            f"token "
            f"{received['picked'] / received['n']:.3f}; on the page's most-attended token (oracle) "
            f"{received['oracle'] / received['n']:.3f}"
        )
        print("  most kept tokens:", ", ".join(f"{t!r}×{c}" for t, c in picks.most_common(12)))
        st.emit(
            {
                "experiment": "diagnose-exact",
                "scheme": scheme.name,
                "picked_share": received["picked"] / received["n"],
                "oracle_share": received["oracle"] / received["n"],
                "top_picks": picks.most_common(20),
            }
        )


class _OracleScheme(VariantScheme):
    pass


def oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """Study-only attention hook: measures the attention each key receives from the queries that
    read it dequantized (exact cache), for the ``oracle`` exact-token rule, then runs the harness."""
    global _ORACLE_RECEIVED
    run = H._ACTIVE
    T, D = query.shape[2], query.shape[3]
    if (
        run is not None
        and isinstance(run.scheme, VariantScheme)
        and run.scheme.variant.exact_rule == "oracle"
    ):
        P = run.page_size
        m = H.finalised_mask(T, P)
        _, p = H.mixed_attention(query, key, value, None, None, None, scaling or D**-0.5)
        recv = (p * m).sum((2, 3))  # (B, Hk, T)
        n = T // P
        _ORACLE_RECEIVED = recv[:, :, : n * P].reshape(-1, P)
    try:
        return H.kivi_eval_attention(module, query, key, value, attention_mask, scaling, dropout, **kw)
    finally:
        _ORACLE_RECEIVED = None


def exp_proxies(st: Study, windows: int = 2, P: int = 128) -> None:
    """Which per-token score finds the key that later queries attend to most (unquantized run)?

    For every non-first page, ``received[s]`` is the attention key ``s`` gets from the queries that
    read its page dequantized (summed over the KV head's query heads). A rule's *share* is
    ``received[argmax score] / sum(received)`` averaged over pages (uniform pick: 1/P; oracle: max).
    """
    shares = defaultdict(float)
    count = [0]

    def obs(d):
        q, k, v, p = d["query"], d["key"], d["value"], d["probs"]  # p: exact (fp16 run)
        B, Hq, T, D = q.shape
        Hk = k.shape[1]
        n = T // P
        m = H.finalised_mask(T, P)
        recv = (p * m).sum((2, 3))[:, :, : n * P].reshape(B, Hk, n, P)
        own = (p * ~m).sum(2)  # attention received while the page was open (exact reads), per q head
        own = own.sum(2)[:, :, : n * P].reshape(B, Hk, n, P)
        kp = k[:, :, : n * P].reshape(B * Hk * n, P, D)
        vp = v[:, :, : n * P].reshape(B * Hk * n, P, D)
        qp = q.float().reshape(B, Hk, -1, T, D)[:, :, :, : n * P].reshape(B, Hk, -1, n, P, D)
        qmean = qp.mean((2, 4)).reshape(B * Hk * n, 1, D)  # mean query of the page (all its q heads)
        scores = {
            "outlier (current)": R.outlier_token_score(kp, torch.ones(kp.shape[:2], dtype=torch.bool)),
            "knorm": exact_token_scores("knorm", kp, vp),
            "kdist": exact_token_scores("kdist", kp, vp),
            "shrink": exact_token_scores("shrink", kp, vp),
            "vnorm": exact_token_scores("vnorm", kp, vp),
            "-vnorm": -exact_token_scores("vnorm", kp, vp),
            "-knorm": -exact_token_scores("knorm", kp, vp),
            "mean-query . k": (qmean * kp).sum(-1),
            "received while open": own.reshape(-1, P),
        }
        r = recv.reshape(-1, P)
        tot = r.sum(-1).clamp_min(1e-30)
        keep = (torch.arange(B * Hk * n) % n) != 0
        for name, sc in scores.items():
            got = r.gather(1, sc.argmax(1, keepdim=True)).squeeze(1) / tot
            shares[name] += got[keep].mean().item()
        shares["oracle"] += (r.amax(1) / tot)[keep].mean().item()
        shares["uniform"] += 1.0 / P
        count[0] += 1

    class _Exact(VariantScheme):
        def roundtrip(self, k, v, page_size, sink):
            return k.float(), v.float()

    H.run_scheme(st.lm, st.ids[:windows], _Exact("exact", Variant()), P, obs)
    print(f"  share of later (dequantized-read) attention on the token each rule keeps exact, page {P}:")
    for name, val in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"    {name:24s} {val / count[0]:.4f}")
    st.emit({"experiment": "proxies", "page_size": P, "shares": {k: v / count[0] for k, v in shares.items()}})


def exp_rules(st: Study) -> None:
    base = Variant()
    for rule in ("knorm", "kdist", "shrink", "vnorm", "oracle"):
        st.measure(VariantScheme(f"exact rule={rule}", replace(base, exact_rule=rule)), 128, "rules")
    st.measure(VariantScheme("Lloyd w=scale² (K)", replace(base, k_weight="scale2")), 128, "rules")
    st.measure(
        VariantScheme("Lloyd w=scale² (K, V)", replace(base, k_weight="scale2", v_weight="scale2")),
        128,
        "rules",
    )
    st.measure(VariantScheme("Lloyd 16 steps", replace(base, steps=16)), 128, "rules")


HI_GRID = ((4, 3, True), (4, 3, False), (2, 3, True), (2, 4, False), (2, 3, False), (3, 3, False))


def exp_hi(st: Study) -> None:
    """More bits for the K channels with the largest range, on top of the first format (the study
    that chose the wide channels)."""
    st.measure(VariantScheme("first format (K outliers, no wide channels)", FIRST), 128, "hi")
    for n16, bits, kout in HI_GRID:
        v = replace(FIRST, wide_16ths=n16, wide_bits=bits, k_outliers=kout)
        st.measure(
            VariantScheme(f"K top-{n16}D/16 channels {bits}-bit" + ("" if kout else ", no K outliers"), v),
            128,
            "hi",
        )


def exp_kweight(st: Study) -> None:
    """Lloyd weights ∝ scale² for K (error counted in original units) against plain Lloyd, every mode."""
    for name, var in (("K2/V2", Variant()), ("K3/V2", K3V2), ("K4/V4", K4V4)):
        for w in ("none", "scale2"):
            st.measure(VariantScheme(f"{name} K weights={w}", replace(var, k_weight=w)), 128, "kweight")


def exp_modes(st: Study) -> None:
    """Where the 3-bit and 4-bit modes lose."""
    for name, v in (("K4/V4", K4V4), ("K3/V2", K3V2)):
        st.measure(VariantScheme(f"{name} K only", v, ("v",)), 128, "modes")
        st.measure(VariantScheme(f"{name} V only", v, ("k",)), 128, "modes")


def exp_layouts(st: Study) -> None:
    base = Variant()
    st.measure(VariantScheme("+ V outliers", replace(base, v_outliers=True)), 128, "layouts")
    st.measure(VariantScheme("+ K outliers", replace(base, k_outliers=True)), 128, "layouts")
    st.measure(VariantScheme("kivi-serve-2bit P=256", base), 256, "layouts")
    st.measure(VariantScheme("kivi-serve-2bit P=64", base), 64, "layouts")


# --------------------------------------------------------------------------- passkey
#: The trials of the passkey screen (``--passkey-contexts``, ``--passkey-seeds`` override them).
PASSKEY_GRID = {"contexts": (1024,), "depths": (0, 25, 50, 75, 100), "seeds": 4}


def passkey_screen(
    st: Study, schemes: list[tuple[str, Scheme]], contexts=None, seeds=None, tag="passkey", page_size=128
) -> None:
    """Teacher-forced passkey through the harness, in the engine's steps (document prefilled in
    2048-token chunks, the question reading its pages from the cache): per scheme, the fraction of
    trials whose key tokens are all the argmax (``tf_accuracy``), the mean ``log P(key)``, and the
    mean difference from fp16 on the same trials."""
    from kivi_serve.eval.passkey import PromptBuilder, needle_attention

    builder = PromptBuilder(st.lm.tokenizer, st.corpus)
    trials = builder.grid(
        contexts or PASSKEY_GRID["contexts"], PASSKEY_GRID["depths"], range(seeds or PASSKEY_GRID["seeds"])
    )
    ref = None
    for name, scheme in schemes:
        t0 = time.time()
        got = [needle_attention(st.lm, t, scheme, page_size) for t in trials]
        lps = [g["key_logprob"] for g in got]
        ok = [g["digits"] == t.key for g, t in zip(got, trials)]
        if ref is None:
            ref = lps
        row = {
            "experiment": tag,
            "scheme": name,
            "bits": round(scheme.bits_per_element(128, page_size), 4),
            "page_size": page_size,
            "contexts": sorted({t.context for t in trials}),
            "n": len(trials),
            "tf_accuracy": round(sum(ok) / len(ok), 3),
            "key_logprob": round(sum(lps) / len(lps), 4),
            "vs_fp16": round(sum(a - b for a, b in zip(lps, ref)) / len(lps), 4),
            "worst": round(min(a - b for a, b in zip(lps, ref)), 3),
            "seconds": round(time.time() - t0, 1),
            "misses": [
                (t.context, t.depth, t.seed, g["digits"]) for g, t, k in zip(got, trials, ok) if not k
            ],
            "needle_mass": [
                round(sum(g["mass"][L] for g in got) / len(got), 4) for L in range(len(got[0]["mass"]))
            ],
        }
        st.emit(row)


def exp_passkey(st: Study) -> None:
    """Where the 2-bit format loses the passkey: keys or values, and what each part is worth."""
    base = Variant()
    passkey_screen(
        st,
        [
            ("fp16", SCHEMES["fp16"]),
            ("kivi-serve-2bit", SCHEMES["kivi-serve-2bit"]),
            ("2bit K only (V exact)", VariantScheme("2bit K only (V exact)", base, ("v",))),
            ("2bit V only (K exact)", VariantScheme("2bit V only (K exact)", base, ("k",))),
            ("kivi-serve-3bit", SCHEMES["kivi-serve-3bit"]),
            ("kivi-serve-4bit", SCHEMES["kivi-serve-4bit"]),
            ("no wide K channels", VariantScheme("no wide K channels", replace(base, wide_16ths=0))),
            ("sink only", VariantScheme("sink only", replace(base, exact_rule="sink"))),
        ],
        contexts=st.passkey_contexts,
        seeds=st.passkey_seeds,
    )


#: Format changes within 2.5 bits at head_dim 128 that target what the passkey evidence shows
#: (keys carry the loss; the needle is a few tokens that a late query must single out).
PROTOTYPES = (
    ("randomised-Hadamard K rotation", Variant(k_rotate=True)),
    (
        "sink outside the pages, 7D/16 wide K channels",
        Variant(exact_rule="sink", side_sink=True, wide_16ths=7),
    ),
    (
        "rotation + sink outside, 7D/16 wide",
        Variant(k_rotate=True, exact_rule="sink", side_sink=True, wide_16ths=7),
    ),
)


def exp_proto(st: Study) -> None:
    """The prototypes on both tasks: the passkey screen (teacher-forced, harness) and perplexity."""
    for name, var in PROTOTYPES:
        if var.bits(REFERENCE_HEAD_DIM, 128) > 2.5:
            raise SystemExit(
                f"prototype {name!r} is over the budget: {var.bits(REFERENCE_HEAD_DIM, 128)} bits"
            )
    schemes = [("fp16", SCHEMES["fp16"]), ("kivi-serve-2bit", SCHEMES["kivi-serve-2bit"])]
    schemes += [(name, VariantScheme(name, var)) for name, var in PROTOTYPES]
    passkey_screen(st, schemes, seeds=st.passkey_seeds, contexts=st.passkey_contexts, tag="proto-passkey")
    for _, scheme in schemes[1:]:
        st.measure(scheme, 128, "proto-ppl")


def exp_protokey(st: Study) -> None:
    """Retrieval only (no perplexity): fp16, the 2-bit format, the sink-outside prototype, and the
    2-bit format with only K or only V quantized, on the passkey screen (``--passkey-contexts``)."""
    base = Variant()
    name, var = PROTOTYPES[1]
    passkey_screen(
        st,
        [
            ("fp16", SCHEMES["fp16"]),
            ("kivi-serve-2bit", SCHEMES["kivi-serve-2bit"]),
            (name, VariantScheme(name, var)),
            ("2bit K only (V exact)", VariantScheme("2bit K only (V exact)", base, ("v",))),
            ("2bit V only (K exact)", VariantScheme("2bit V only (K exact)", base, ("k",))),
        ],
        contexts=st.passkey_contexts,
        seeds=st.passkey_seeds,
        tag="protokey",
    )


def exp_p256(st: Study) -> None:
    """256-token pages, where the per-page exact slot and codebooks cost half as much per token and
    the saving buys more wide K channels at the same 2.5 bits (head_dim 128): the passkey screen
    (fp16 and ``kivi-serve-2bit-p256``, both in the engine's steps at page 256), then perplexity
    with 7D/16 (the scheme), 3D/16 (today's share: the page size's own effect, 2.375 bits), 6D/16
    and 5D/16 wide channels. No format change: every row is the reference quantizer."""
    P = 256
    long = SCHEMES["kivi-serve-2bit-p256"]
    passkey_screen(
        st,
        [("fp16", SCHEMES["fp16"]), (long.name, long)],
        contexts=st.passkey_contexts,
        seeds=st.passkey_seeds,
        tag="p256-passkey",
        page_size=P,
    )
    exp_p256ppl(st)


def exp_p256ppl(st: Study) -> None:
    """Perplexity only: 256-token pages with 7D/16 (``kivi-serve-2bit-p256``), then 3D/16 (today's
    share: the page size's own effect, 2.375 bits), 6D/16 and 5D/16 wide K channels."""
    P = 256
    long = SCHEMES["kivi-serve-2bit-p256"]
    st.measure(long, P, "p256-ppl")
    for w in (3, 6, 5):
        st.measure(replace(long, name=f"page 256, {w}D/16 wide K channels", wide_16ths=w), P, "p256-ppl")


def exp_p256o(st: Study) -> None:
    """The one point of the page-256 format within 2.5 bits at head_dim 128 that the embedded model
    (head_dim 64) can tell from ``kivi-serve-2bit-p256`` and that was not tried: one exact outlier per
    K channel per page, paid for with 8 of the 56 wide channels (6D/16: 48 at head_dim 128, 24 at 64).
    Teacher-forced ``log P(key)`` on the page-256 grid's failed trials up to 2K
    (``docs/data/passkey-grid-p256.json``), then perplexity on the screen."""
    from kivi_serve.eval.passkey import failed_trials, key_logprob

    P = 256
    long = SCHEMES["kivi-serve-2bit-p256"]
    cand = replace(long, name="page 256, K outliers, 6D/16 wide K channels", k_outliers=1, wide_16ths=6)
    bits = cand.bits_per_element(REFERENCE_HEAD_DIM, P)
    if bits > 2.5:
        raise SystemExit(f"{cand.name} is over the budget: {bits} bits")
    with open("docs/data/passkey-grid-p256.json") as fh:
        report = json.load(fh)
    for o, t in failed_trials(report, long.name):
        if t.context > 2048:
            continue
        for s in (long, cand):
            t0 = time.time()
            st.emit({"experiment": "p256o-passkey", "scheme": s.name, "context": t.context, "depth": t.depth,
                     "seed": t.seed, "key": t.key, "engine_digits": o.digits}
                    | key_logprob(st.lm, t, s, P, report["chunk"]) | {"seconds": round(time.time() - t0, 1)})
    st.measure(cand, P, "p256o-ppl")


# --------------------------------------------------------------------------- value formats (issue 16)
#: ``kivi-serve-2bit-p256`` as a variant (page 256, 7D/16 wide K channels: 2.500 bits at head_dim 128).
P256 = Variant(wide_16ths=7)
#: Page 256 with the default 3D/16 wide K channels: 2.375 bits, 1,192 bytes per page and KV head free at
#: head_dim 128 (2.5 bits: 20,480 bytes) for the values.
P256_K3 = Variant(wide_16ths=3)
#: Value-side candidates: short id → (name, variant, page size). All within 2.500 bits at head_dim 128
#: (``vbits`` checks); the zero-byte ones (rotation, free codebook ends) keep p256's 7D/16 wide K channels.
VALUE_CANDIDATES = {
    "rot": ("p256 + V rotation", replace(P256, v_rotate=True), 256),
    "free": ("p256 + V codebook ends free", replace(P256, v_pin=False), 256),
    "rotfree": ("p256 + V rotation + free ends", replace(P256, v_rotate=True, v_pin=False), 256),
    "p128rotfree": ("page 128 + V rotation + free ends", Variant(v_rotate=True, v_pin=False), 128),
    "g2": ("p256 3D/16 K + V scales per half-head", replace(P256_K3, v_groups=2), 256),
    "vwide": ("p256 3D/16 K + 7D/32 wide V channels", replace(P256_K3, v_wide=7), 256),
    "hi32": ("p256 3D/16 K + 32 4-bit V rows/page", replace(P256_K3, v_hi=32), 256),
    "ex4": ("p256 3D/16 K + 4 exact V rows/page", replace(P256_K3, v_exact=4), 256),
    "vout": ("p256 3D/16 K + 1 exact V element/token", replace(P256_K3, v_outliers=True), 256),
    "g2rotfree": ("p256 3D/16 K + V half-head scales, rotation, free ends",
                  replace(P256_K3, v_groups=2, v_rotate=True, v_pin=False), 256),
    "hi32rotfree": ("p256 3D/16 K + 32 4-bit V rows, rotation, free ends",
                    replace(P256_K3, v_hi=32, v_rotate=True, v_pin=False), 256),
}
#: The baselines every value screen carries: (name, scheme, page size).
VALUE_BASELINES = (("kivi-serve-2bit", 128), ("kivi-serve-2bit-p256", 256))
#: The engine reports whose trials (and engine results) the value screens reuse.
VALUE_REPORTS = ("docs/data/passkey-default.json", "docs/data/passkey-4k8k-3keys.json")


def value_candidates(ids: str | None) -> list[tuple[str, str, Variant, int]]:
    """``(id, name, variant, page size)`` of the chosen candidates (``ids``: comma-separated, None: all),
    each checked to be within 2.5 bits at head_dim 128."""
    keys = list(VALUE_CANDIDATES) if not ids else ids.split(",")
    out = []
    for key in keys:
        if key not in VALUE_CANDIDATES:
            raise SystemExit(f"unknown candidate {key!r}; known: {', '.join(VALUE_CANDIDATES)}")
        name, var, P = VALUE_CANDIDATES[key]
        if var.bits(REFERENCE_HEAD_DIM, P) > 2.5:
            raise SystemExit(f"candidate {name!r} is over the budget: {var.bits(REFERENCE_HEAD_DIM, P)} bits")
        out.append((key, name, var, P))
    return out


def exp_vbits(st: Study) -> None:
    """Bits per element of the baselines and every value candidate, at head_dim 128 and 64."""
    for name, P in VALUE_BASELINES:
        st.emit({"experiment": "vbits", "scheme": name, "page_size": P,
                 "bits_hd128": SCHEMES[name].bits_per_element(128, P),
                 "bits_hd64": SCHEMES[name].bits_per_element(64, P)})
    for key, name, var, P in value_candidates(None):
        st.emit({"experiment": "vbits", "id": key, "scheme": name, "page_size": P,
                 "bits_hd128": var.bits(128, P), "bits_hd64": var.bits(64, P)})


def exp_vproxy(st: Study) -> None:
    """Value reconstruction error on the model's own values (fp16 pass over the screen windows): per
    scheme, relative MSE of the values a finalised page reads back, mean over layers 0-16 and 17-29 (the
    late layers whose values lost the key in the p256 ablation). Free: no second forward pass."""
    caught: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def grab(d):
        if d["window"] == 0:
            caught[d["layer"]] = (d["key"].detach().float().clone(), d["value"].detach().float().clone())

    H.run_scheme(st.lm, st.ids[:1], SCHEMES["fp16"], 128, grab)
    rows = [(name, SCHEMES[name], P) for name, P in VALUE_BASELINES]
    rows += [(name, VariantScheme(name, var), P) for _, name, var, P in value_candidates(st.candidates)]
    for name, scheme, P in rows:
        err = {}
        for L, (k, v) in caught.items():
            B, Hk, T, D = k.shape
            n = T // P
            kp, vp = (x[:, :, : n * P].reshape(-1, P, D) for x in (k, v))
            sink = (torch.arange(kp.shape[0]) % n) == 0
            kq, vq = scheme.roundtrip(kp, vp, P, sink)
            err[L] = [((a - b) ** 2).sum().item() / (b**2).sum().item() for a, b in ((vq, vp), (kq, kp))]
        early = [err[L] for L in sorted(err) if L <= 16]
        late = [err[L] for L in sorted(err) if L > 16]
        st.emit({"experiment": "vproxy", "scheme": name, "page_size": P,
                 "v_rel_mse_0_16": round(sum(e[0] for e in early) / len(early), 5),
                 "v_rel_mse_17_29": round(sum(e[0] for e in late) / len(late), 5),
                 "k_rel_mse": round(sum(e[1] for e in err.values()) / len(err), 5),
                 "v_rel_mse_per_layer": [round(err[L][0], 5) for L in sorted(err)]})


def _value_trials(spec: str | None, reports: tuple[str, ...] = VALUE_REPORTS):
    """The value screen's trials, rebuilt from the engine reports: ``spec`` = ``context/depth/seed,...``
    (default: the whole default grid at 1K and 2K, 30 trials); an item that is a context alone
    (``4096``) takes all of that context's trials, seed by seed (a stopped run is then a balanced
    subset). Returns (trials, engine results by (scheme, context, depth, seed))."""
    from kivi_serve.eval.passkey import report_trials

    trials, engine = {}, {}
    for path in reports:
        with open(path) as fh:
            _, ts, outcomes = report_trials(json.load(fh))
        trials |= {(t.context, t.depth, t.seed): t for t in ts}
        engine |= {(o.scheme, o.context, o.depth, o.seed): o for o in outcomes}
    if spec:
        want = []
        for cell in spec.split(","):
            if "/" in cell:
                want.append(tuple(int(x) for x in cell.split("/")))
            else:
                ctx = int(cell)
                want += sorted((c for c in trials if c[0] == ctx), key=lambda c: (c[2], c[1]))
    else:
        want = sorted(c for c in trials if c[0] <= 2048)
    missing = [c for c in want if c not in trials]
    if missing:
        raise SystemExit(f"no engine trial {missing} in {', '.join(reports)} (context/depth/seed)")
    return [trials[c] for c in want], engine


def exp_vkey(st: Study) -> None:
    """Teacher-forced passkey (harness, engine steps) on the engine grid's prompts for fp16, both baselines
    and the value candidates (``--candidates``, ``--trials``): one row per trial and scheme, then per
    scheme and context the paired summary against fp16 (:func:`kivi_serve.eval.passkey.paired`). The
    variants of a trial share its exact first engine step."""
    from kivi_serve.eval.passkey import Outcome, key_logprobs, paired

    trials, engine = _value_trials(st.trials)
    schemes = [("fp16", SCHEMES["fp16"], 128)]
    schemes += [] if st.no_baselines else [(n, SCHEMES[n], P) for n, P in VALUE_BASELINES]
    chosen = [] if st.candidates == "none" else value_candidates(st.candidates)
    schemes += [(name, VariantScheme(name, var), P) for _, name, var, P in chosen]
    schemes += [(s.name, s, s.default_page_size) for s in st.named]
    got: dict[str, list] = defaultdict(list)
    for t in trials:
        t0 = time.time()
        rows = key_logprobs(st.lm, t, [(sch, P, None) for _, sch, P in schemes])
        for (name, sch, P), r in zip(schemes, rows):
            o = engine.get((name, t.context, t.depth, t.seed))
            got[name].append(Outcome(name, t.context, t.depth, t.seed, t.key, r["digits"], r["correct"],
                                     r["key_logprob"], (), 0))
            st.emit({"experiment": "vkey", "scheme": name, "page_size": P,
                     "bits": round(sch.bits_per_element(128, P), 4), "context": t.context, "depth": t.depth,
                     "seed": t.seed, "key": t.key} | r
                    | ({"engine_correct": o.correct, "engine_key_logprob": o.key_logprob} if o else {}))
        print(f"  ({time.time() - t0:.0f} s for the trial)", flush=True)
    for name, _, P in schemes[1:]:
        for ctx in sorted({t.context for t in trials}):
            mine = [o for o in got[name] if o.context == ctx]
            ref = [o for o in got["fp16"] if o.context == ctx]
            st.emit({"experiment": "vkey-summary", "scheme": name, "page_size": P, "context": ctx,
                     "n": len(mine), "tf_correct": sum(o.correct for o in mine),
                     "fp16_tf_correct": sum(o.correct for o in ref)} | paired(mine, ref))


#: The engine reports whose prompts the pre-RoPE screen reuses: 1K (four keys), 2K (four keys), 4K and
#: 8K (six keys) through vLLM, fp16 and kivi-serve-2bit-p256-vr on every prompt.
PR_REPORTS = ("docs/data/passkey-default.json", "docs/data/passkey-2k-4keys.json",
              "docs/data/passkey-4k8k-6keys.json")


def exp_prkey(st: Study) -> None:
    """Teacher-forced passkey (harness, engine steps) of the ``--named`` schemes on the engine reports'
    prompts (:data:`PR_REPORTS`; ``--trials``, e.g. ``4096,8192``), each paired with the **engine's** fp16
    and kivi-serve-2bit-p256-vr outcomes on the same prompt (the harness reproduces the engine's log P(key)
    to ~0.04 nats: no harness fp16 pass, which would double the cost at 8K). One row per trial and
    scheme, then per scheme and context the paired summary against the engine's fp16."""
    from kivi_serve.eval.passkey import Outcome, key_logprobs, paired

    if not st.named:
        raise SystemExit("prkey needs --named (e.g. kivi-serve-2bit-pr)")
    trials, engine = _value_trials(st.trials, PR_REPORTS)
    refs = ("fp16", "kivi-serve-2bit-p256-vr")  # the engine's outcomes each row is paired with
    got: dict[str, list] = defaultdict(list)
    for t in trials:
        t0 = time.time()
        eng = {n: engine.get((n, t.context, t.depth, t.seed)) for n in refs}
        engine_rows = {f"engine_{n}": {"correct": o.correct, "key_logprob": round(o.key_logprob, 4)}
                       for n, o in eng.items() if o}
        rows = key_logprobs(st.lm, t, [(s, s.default_page_size, None) for s in st.named])
        for s, r in zip(st.named, rows):
            got[s.name].append(Outcome(s.name, t.context, t.depth, t.seed, t.key, r["digits"], r["correct"],
                                       r["key_logprob"], (), 0))
            st.emit({"experiment": "prkey", "scheme": s.name, "page_size": s.default_page_size,
                     "context": t.context, "depth": t.depth, "seed": t.seed, "key": t.key} | r | engine_rows)
        print(f"  ({time.time() - t0:.0f} s for the trial)", flush=True)
    for s in st.named:
        for ctx in sorted({t.context for t in trials}):
            mine = [o for o in got[s.name] if o.context == ctx]
            ref, vr = ([o for (n, *_), o in engine.items() if n == name and o.context == ctx]
                       for name in refs)
            st.emit({"experiment": "prkey-summary", "scheme": s.name, "context": ctx, "n": len(mine),
                     "tf_correct": sum(o.correct for o in mine)}
                    | {"vs_engine_fp16": paired(mine, ref), "vs_engine_p256_vr": paired(mine, vr)})


def _engine_logprobs(engine: dict, t) -> dict:
    """The engine's fp16 and kivi-serve-2bit-p256-vr log P(key) on trial ``t``'s prompt, as row fields."""
    return {f"engine_{n}": round(o.key_logprob, 4) for n in ("fp16", "kivi-serve-2bit-p256-vr")
            if (o := engine.get((n, t.context, t.depth, t.seed)))}


@contextlib.contextmanager
def exact_span(start: int, end: int, parts: str):
    """Within the block, every page round trip of the harness reads back tokens ``[start, end)`` exact
    (``parts``: ``"k"`` and/or ``"v"``), all layers: an oracle, not a format (the bits are unchanged)."""
    inner = H.page_roundtrip

    def roundtrip(scheme, key, value, page_size, rope=None):
        k, v = inner(scheme, key, value, page_size, rope)
        stop = min(end, key.shape[2])
        if "k" in parts:
            k[:, :, start:stop] = key[:, :, start:stop].float()
        if "v" in parts:
            v[:, :, start:stop] = value[:, :, start:stop].float()
        return k, v

    H.page_roundtrip = roundtrip
    try:
        yield
    finally:
        H.page_roundtrip = inner


def exp_needle(st: Study) -> None:
    """Oracle (issue 16, tenth session): is the needle's own precision what a 4K-8K miss lacks? For each
    ``--trials`` prompt of the engine reports and each ``--named`` scheme: the scheme as is, with the
    needle's tokens' keys read back exact, and with their keys and values exact (the needle sentence,
    :attr:`Trial.needle`; every other token as the scheme stores it). Rows carry the engine's fp16 and
    kivi-serve-2bit-p256-vr outcomes on the same prompt."""
    from kivi_serve.eval.passkey import key_logprobs

    if not st.named:
        raise SystemExit("needle needs --named (e.g. kivi-serve-2bit-p256-vr)")
    trials, engine = _value_trials(st.trials, PR_REPORTS)
    for t in trials:
        eng = _engine_logprobs(engine, t)
        for s in st.named:
            for parts in ("", "k", "kv"):
                t0 = time.time()
                with exact_span(*t.needle, parts) if parts else contextlib.nullcontext():
                    r = next(key_logprobs(st.lm, t, [(s, s.default_page_size, None)]))
                st.emit({"experiment": "needle", "scheme": s.name, "needle_exact": parts or "none",
                         "context": t.context, "depth": t.depth, "seed": t.seed, "key": t.key,
                         "needle": list(t.needle), "seconds": round(time.time() - t0)} | r | eng)


#: findneedle: a query closer than this to a key is left out of the attention it "receives" (a token's
#: neighbours attend to it whatever it says; the question is whether anything later singles it out).
FAR = 16


def exp_findneedle(st: Study) -> None:
    """Could the format spend precision on the needle at page finalisation, before the question exists?
    For each ``--trials`` prompt: one exact pass up to the end of the engine step that finalises the
    needle's page (2048-token steps); per layer and KV head, three per-token scores a quantizer could
    compute then — the attention each token receives from queries at least :data:`FAR` tokens later
    (max, and sum, over the queries and the group's heads) and the exact slot's outlier score
    (:func:`kivi_serve.quant.page.outlier_token_score`) — and where the key's first occurrence ranks
    within its 256-token page (0 = top). A rule that keeps m tokens per page finds the key only if all
    its digits rank below m."""
    from kivi_serve.eval.passkey import DEFAULT_CHUNK, served_chunks

    P, step = 256, DEFAULT_CHUNK
    trials, _ = _value_trials(st.trials, PR_REPORTS)
    for t in trials:
        kid = list(t.key_ids)
        first = t.key_starts[0]
        page = first // P
        lo, hi = page * P, (page + 1) * P
        digits = torch.arange(first, min(first + len(kid), hi)) - lo
        # the end of the engine step that finalises the page (the prompt's end for the last step)
        L = next((c for c in served_chunks(t, step, P) if c >= hi), len(t.prompt))
        scores: dict[int, dict[str, torch.Tensor]] = {}

        def observe(d, lo=lo, hi=hi, scores=scores):
            p = d["probs"][0]
            T = p.shape[-1]
            Hk = d["key"].shape[1]
            p = p.reshape(Hk, -1, p.shape[-2], T)[..., lo:hi]  # (Hk, group, Tq, page tokens)
            q = torch.arange(T - p.shape[-2], T).view(-1, 1)
            far = (q - torch.arange(lo, hi).view(1, -1)) >= FAR
            pf = torch.where(far, p, 0.0)
            key = d["key"][0, :, lo:hi].float()  # (Hk, P, D)
            outlier = R.outlier_token_score(key, torch.ones(key.shape[:2], dtype=torch.bool))
            scores[d["layer"]] = {"recv_max": pf.amax((1, 2)), "recv_sum": pf.sum(2).amax(1),
                                  "outlier": outlier.float()}

        H.run_logits(st.lm, torch.tensor([t.prompt[:L]]), SCHEMES["fp16"], P, observer=observe)
        worst = {rule: [] for rule in ("recv_max", "recv_sum", "outlier")}
        for layer in sorted(scores):
            for rule, sc in scores[layer].items():
                rank = sc.argsort(1, descending=True).argsort(1)  # (Hk, P)
                worst[rule].append(int(rank[:, digits].amax(1).min()))  # the best KV head of the layer
        st.emit({"experiment": "findneedle", "context": t.context, "depth": t.depth, "seed": t.seed,
                 "key": t.key, "digits": [int(first), int(first) + len(kid)], "page": page, "far": FAR,
                 "worst_digit_rank_best_head": worst,
                 "min_over_layers": {rule: min(w) for rule, w in worst.items()}})


def exp_queryrank(st: Study) -> None:
    """Could the *question* find the needle in a 2-bit cache (query-time precision: re-read the top-k
    tokens exactly)? For each ``--trials`` prompt, fp16 and each ``--named`` scheme, teacher-forced in
    the engine's steps: at the query that predicts the key's first digit, per layer and KV head, the
    attention over every token of the prompt (max over the group's heads), and the worst rank of the
    key's five digit tokens (first occurrence) among all of them, 0 = top; per layer the best head."""
    from kivi_serve.eval.passkey import DEFAULT_CHUNK, served_chunks

    trials, _ = _value_trials(st.trials, PR_REPORTS)
    for t in trials:
        kid = list(t.key_ids)
        first = t.key_starts[0]
        digits = torch.arange(first, first + len(kid))
        ids = torch.tensor([t.scored])
        prefixes: dict[int, object] = {}  # the exact first engine step, shared by every scheme
        for s in (SCHEMES["fp16"], *st.named):
            P = s.default_page_size
            chunks = served_chunks(t, DEFAULT_CHUNK, P)
            past = None
            if len(chunks) > 1:
                if chunks[1] not in prefixes:
                    prefixes[chunks[1]] = H.prefix_cache(st.lm, ids, chunks[1])
                past = prefixes[chunks[1]]
            start = chunks[1] if past is not None else 0
            row = len(t.prompt) - 1
            worst: dict[int, int] = {}

            def observe(d, worst=worst, start=start, row=row, digits=digits):
                p = d["probs"][0, :, :, row - start]  # (Hk, G, T)
                rank = p.amax(1).argsort(1, descending=True).argsort(1)  # (Hk, T)
                worst[d["layer"]] = int(rank[:, digits].amax(1).min())

            t0 = time.time()
            H.token_logprobs(st.lm, ids, s, P, observer=observe, chunks=chunks, positions=[row], past=past)
            ranks = [worst[L] for L in sorted(worst)]
            st.emit(
                {
                    "experiment": "queryrank",
                    "scheme": s.name,
                    "context": t.context,
                    "depth": t.depth,
                    "seed": t.seed,
                    "key": t.key,
                    "digits": [first, first + len(kid)],
                    "worst_digit_rank_best_head": ranks,
                    "layers_top32": sum(r < 32 for r in ranks),
                    "min_over_layers": min(ranks),
                    "seconds": round(time.time() - t0),
                }
            )


#: layerbits: the other layers' format (p256-vr without its wide K channels: 2.281 bits at head_dim 128)
#: and the format of the ``--layers`` (4-bit keys and values at page 256: 4.281 bits).
LAYERBITS_BASE = replace(SCHEMES["kivi-serve-2bit-p256-vr"], name="kivi-serve-2bit-p256-vr-w0", wide_16ths=0)
LAYERBITS_HI = SCHEMES["kivi-serve-4bit"]


def exp_layerbits(st: Study) -> None:
    """Per-layer precision (issue 16's last candidate): the ``--layers`` (chosen by a calibration pass,
    e.g. ``queryrank`` on other prompts) store 4-bit pages, the rest p256-vr without wide channels, so
    that the model's average stays within 2.5 bits (3 of 30 layers: 2.481). Teacher-forced passkey on
    ``--trials``, next to p256-vr, paired with the engine's outcomes."""
    from kivi_serve.eval.passkey import key_logprobs

    if not st.layers:
        raise SystemExit("layerbits needs --layers (e.g. 20,21,22)")
    n_layers = st.lm.model.config.num_hidden_layers
    P = 256
    vr = SCHEMES["kivi-serve-2bit-p256-vr"]
    bits = (len(st.layers) * LAYERBITS_HI.bits_per_element(128, P)
            + (n_layers - len(st.layers)) * LAYERBITS_BASE.bits_per_element(128, P)) / n_layers
    name = f"p256-vr-w0+4bit@{'-'.join(map(str, st.layers))}"
    # (label, bits at head_dim 128, key_logprobs variant)
    variants = [(vr.name, vr.bits_per_element(128, P), (vr, P, None)),
                (name, bits, (LAYERBITS_BASE, P, {i: LAYERBITS_HI for i in st.layers}))]
    trials, engine = _value_trials(st.trials, PR_REPORTS)
    for t in trials:
        eng = _engine_logprobs(engine, t)
        t0 = time.time()
        for (label, b, _), r in zip(variants, key_logprobs(st.lm, t, [v for *_, v in variants])):
            st.emit({"experiment": "layerbits", "scheme": label, "bits_hd128": round(b, 4),
                     "context": t.context, "depth": t.depth, "seed": t.seed, "key": t.key} | r | eng)
        print(f"  ({time.time() - t0:.0f} s for the trial)", flush=True)


def exp_vppl(st: Study) -> None:
    """Perplexity of the baselines (unless ``--no-baselines``) and the value candidates
    (``--candidates``, ``none``: only ``--named``) on the windows."""
    for name, P in () if st.no_baselines else VALUE_BASELINES:
        st.measure(SCHEMES[name], P, "vppl")
    for _, name, var, P in [] if st.candidates == "none" else value_candidates(st.candidates):
        st.measure(VariantScheme(name, var), P, "vppl")
    for scheme in st.named:
        st.measure(scheme, scheme.default_page_size, "vppl")


EXPERIMENTS = {
    "selfcheck": exp_selfcheck,
    "table": exp_table,
    "ablate": exp_ablate,
    "diagnose": exp_diagnose,
    "proxies": exp_proxies,
    "rules": exp_rules,
    "hi": exp_hi,
    "kweight": exp_kweight,
    "modes": exp_modes,
    "layouts": exp_layouts,
    "passkey": exp_passkey,
    "proto": exp_proto,
    "protokey": exp_protokey,
    "p256": exp_p256,
    "p256ppl": exp_p256ppl,
    "p256o": exp_p256o,
    "vbits": exp_vbits,
    "vproxy": exp_vproxy,
    "vkey": exp_vkey,
    "vppl": exp_vppl,
    "prkey": exp_prkey,
    "needle": exp_needle,
    "findneedle": exp_findneedle,
    "queryrank": exp_queryrank,
    "layerbits": exp_layerbits,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/study.py", description=__doc__.split("\n")[0])
    ap.add_argument(
        "experiments", nargs="*", default=list(EXPERIMENTS), help=f"any of {', '.join(EXPERIMENTS)}"
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--corpus", default="hamlet")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window-len", type=int, default=1024)
    ap.add_argument("--screen", action="store_true", help="2 windows × 1024 tokens (quicker comparisons)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="append every result as a JSON line to this file")
    ap.add_argument("--passkey-contexts", default=None, help="passkey screens: contexts (default 1024)")
    ap.add_argument(
        "--passkey-seeds", type=int, default=None, help="passkey screens: seeds per cell (default 4)"
    )
    ap.add_argument("--candidates", default=None,
                    help="value screens: candidate ids (default: all; none: only --named)")
    ap.add_argument("--trials", default=None,
                    help="vkey/prkey/needle/findneedle/queryrank/layerbits: context/depth/seed cells of the "
                         "engine reports, or a context alone for all of its trials (default: the 1K-2K grid)")
    ap.add_argument("--no-baselines", action="store_true",
                    help="vkey/vppl: leave out kivi-serve-2bit and -p256 (their rows are already measured)")
    ap.add_argument("--named", default="",
                    help="vkey/vppl/prkey/needle/queryrank: named schemes to add (each at its own page size)")
    ap.add_argument("--layers", default="", help="layerbits: layers stored at 4 bits (e.g. 20,21,22)")
    ap.add_argument("--skip-reference", action="store_true",
                    help="do not run the fp16 perplexity reference first (passkey-only experiments)")
    a = ap.parse_args(argv)
    for e in a.experiments:
        if e not in EXPERIMENTS:
            ap.error(f"unknown experiment {e!r}; choose from {', '.join(EXPERIMENTS)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.screen:
        a.windows = 2
    from transformers import AttentionInterface

    lm = H.load_model(a.model, "cpu")
    AttentionInterface.register(H.ATTN_IMPLEMENTATION, oracle_attention)
    _, text = H.read_corpus(a.corpus)
    st = Study(
        lm,
        H.make_windows(lm.tokenizer, text, a.windows, a.window_len),
        a.out,
        corpus=text,
        passkey_contexts=tuple(int(c) for c in a.passkey_contexts.split(",")) if a.passkey_contexts else None,
        passkey_seeds=a.passkey_seeds,
        candidates=a.candidates,
        trials=a.trials,
        no_baselines=a.no_baselines,
        named=tuple(get_scheme(n) for n in a.named.split(",") if n),
        layers=tuple(int(i) for i in a.layers.split(",") if i),
    )
    if not a.skip_reference:
        ref = st.reference()
        print(
            f"fp16 reference: ppl {math.exp(ref.nll.mean().item()):.4f} over {ref.nll.numel()} tokens "
            f"({a.windows} × {a.window_len})",
            flush=True,
        )
    for e in a.experiments:
        print(f"\n== {e}", flush=True)
        EXPERIMENTS[e](st)
    return 0


if __name__ == "__main__":
    sys.exit(main())
