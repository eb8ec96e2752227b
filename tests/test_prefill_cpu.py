"""CPU prefill attention (:mod:`kivi_serve.backend.prefill_cpu`): vLLM's CPU attention op over a scratch
of the rows' context pages plus their own tokens, against fp64 attention over the same keys and values.

Rows mix what a step's prefill holds: a first chunk (no context), chunks whose context ends mid-page
(the own tokens continue that page in the scratch) or on a page boundary, one-token rows, rows whose
own tokens cross pages; GQA; head_dim 64/128, pages 64/128; fp32, bf16 and fp16. Tolerance: fp32 within
1e-5 of fp64; bf16/fp16 within ``K_TOL`` times the error of torch attention in that dtype (two numeric
stacks meet: vLLM's kernel and ours; their rounding is not ours to pin down).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from kivi_serve.backend import prefill_cpu  # noqa: E402
from kivi_serve.kernels.semantics import LayerAttention  # noqa: E402

K_TOL = 2.0  # measured: at most 0.75x torch's own bf16/fp16 error on these cases

pytestmark = pytest.mark.skipif(
    not prefill_cpu.available(torch.bfloat16), reason="vLLM's CPU attention op is not installed"
)


def _fp64_attention(q, k, v, ctx, scale):
    """Causal attention of n new tokens after ctx cached ones (GQA), in q's dtype math."""
    n = q.shape[0]
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = torch.einsum("thd,shd->hts", q, k) * scale
    keep = torch.arange(ctx + n).unsqueeze(0) <= (ctx + torch.arange(n)).unsqueeze(1)
    p = torch.softmax(s.float().masked_fill(~keep, -torch.inf), -1).to(q.dtype)
    return torch.einsum("hts,shd->thd", p, v)


def _batch(P, Hq, Hkv, D, ctxs, news, dtype, gen):
    """Rows (q0, q1, ctx, page0, 0), their context pages in one plain scratch (n, Hkv, P, D), the
    context and new tokens per row."""
    rows, pages, hist = [], [], []
    q0 = 0
    for ctx, n in zip(ctxs, news):
        n_pages = -(-ctx // P)
        ck = torch.randn(ctx, Hkv, D, generator=gen) + torch.randn(1, Hkv, D, generator=gen)
        cv = torch.randn(ctx, Hkv, D, generator=gen)
        page0 = sum(p.shape[0] for p in pages)
        kp = torch.full((n_pages * P, Hkv, D), float("nan"))  # garbage past the context
        vp = torch.full((n_pages * P, Hkv, D), float("inf"))
        kp[:ctx], vp[:ctx] = ck, cv
        pages.append(torch.stack([kp.view(n_pages, P, Hkv, D), vp.view(n_pages, P, Hkv, D)], 1))
        rows.append((q0, q0 + n, ctx, page0, 0))
        hist.append((ck, cv))
        q0 += n
    scratch = torch.cat(pages).transpose(2, 3).to(dtype)  # (pages, 2, Hkv, P, D)
    T = q0
    q = torch.randn(T, Hq, D, generator=gen).to(dtype)
    k = (torch.randn(T, Hkv, D, generator=gen) + 0.5).to(dtype)
    v = torch.randn(T, Hkv, D, generator=gen).to(dtype)
    return rows, scratch, hist, q, k, v


CASES = [  # (P, Hq, Hkv, D, contexts, new tokens)
    (64, 4, 2, 64, (0, 150, 64, 37, 200), (70, 1, 130, 27, 64)),
    (128, 9, 3, 64, (300, 0, 128), (200, 129, 1)),
    (128, 32, 8, 128, (0, 129), (40, 255)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"P{c[0]}-{c[1]}q{c[2]}kv-D{c[3]}")
def test_paged_prefill_matches_fp64_attention(case, dtype):
    P, Hq, Hkv, D, ctxs, news = case
    gen = torch.Generator().manual_seed(P + Hq + D)
    rows, scratch, hist, q, k, v = _batch(P, Hq, Hkv, D, ctxs, news, dtype, gen)
    pp = prefill_cpu.plan_paged_prefill(rows, scratch.shape[0], P)
    spare = torch.full((pp.num_spare, Hkv, P, D), float("nan"), dtype=dtype)  # stale bytes
    kc = torch.cat([scratch[:, 0], spare]).contiguous()
    vc = torch.cat([scratch[:, 1], spare]).contiguous()
    out = torch.full_like(q, float("nan"))
    scale = D**-0.5
    prefill_cpu.attend(pp, q, k, v, kc, vc, scale, out)
    for (q0, q1, ctx, _, _), (ck, cv) in zip(rows, hist):
        keys = torch.cat([ck.to(dtype), k[q0:q1]])
        values = torch.cat([cv.to(dtype), v[q0:q1]])
        truth = _fp64_attention(q[q0:q1].double(), keys.double(), values.double(), ctx, scale)
        err = (out[q0:q1].double() - truth).abs().max().item()
        if dtype == torch.float32:
            assert err <= 1e-5, (ctx, q1 - q0, err)
        else:
            lowp = _fp64_attention(q[q0:q1], keys, values, ctx, scale).double()
            err_lowp = (lowp - truth).abs().max().item()
            assert err <= K_TOL * err_lowp + 1e-6, (ctx, q1 - q0, err, err_lowp)


def test_plan_places_own_tokens_after_the_context():
    """Row 0: 150 context tokens (pages 0-2 of the context), 70 new ones: 42 continue its last context
    page, 28 open a spare page; row 1: no context, 64 new tokens fill one spare page exactly."""
    pp = prefill_cpu.plan_paged_prefill([(0, 70, 150, 0, 0), (70, 134, 0, 3, 0)], 3, 64)
    assert pp.block_table.tolist() == [[0, 1, 2, 3], [4, 0, 0, 0]]
    assert pp.seq_lens.tolist() == [220, 64] and pp.query_start_loc.tolist() == [0, 70, 134]
    assert pp.num_spare == 2
    assert pp.token_pages[:42].eq(2).all() and pp.token_pages[42:70].eq(3).all()
    assert pp.token_offsets[:3].tolist() == [22, 23, 24] and pp.token_offsets[42] == 0
    assert pp.token_pages[70:].eq(4).all() and pp.token_offsets[70:].tolist() == list(range(64))
    # after row 0's 220th token: slots 28..63 of page 3 (row 1 ends on a page boundary: nothing)
    assert pp.pad_pages.eq(3).all() and pp.pad_offsets.tolist() == list(range(28, 64))


def test_backend_prefill_runs_through_vllms_op(monkeypatch):
    """Through the real builder and impl (quantized pages, fp32): chunked prefill over context — one
    row's context ending mid-page (its open page from staging), one on a page boundary — takes this
    path, and the outputs equal the reference's (``Engine.step`` checks them)."""
    from test_backend_units import Engine

    calls = []
    real = prefill_cpu.attend
    monkeypatch.setattr(prefill_cpu, "attend", lambda pp, *a: calls.append(pp) or real(pp, *a))
    eng = Engine(seed=5, layers=1)
    for sid in range(3):
        eng.add(sid)
    eng.step({0: 150, 1: 64, 2: 30})
    eng.step({2: 1, 0: 70, 1: 100})
    assert len(calls) == 2 and calls[1].seq_lens.tolist() == [220, 164]


SEMANTICS = {
    "window": LayerAttention(window=40),
    "window-page": LayerAttention(window=64),
    "softcap": LayerAttention(softcap=5.0),
    "sinks": LayerAttention(sinks=torch.tensor([0.5, -1.0, 2.0, 0.0])),
    "all": LayerAttention(window=100, softcap=8.0, sinks=torch.tensor([1.0, 0.0, -0.5, 3.0])),
}


def _fp64_semantic(q, k, v, scale, ctx, start, attn):
    """q (n, Hq, D) at positions ctx..; k, v (ctx - start + n, Hkv, D) at start..; fp64 with the window,
    soft-cap and sinks written out (the definitions of tests/test_window_sinks.py)."""
    n, Hq, _ = q.shape
    G = Hq // k.shape[1]
    kk, vv = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = torch.einsum("thd,shd->hts", q.double(), kk) * scale
    if attn.softcap is not None:
        s = attn.softcap * torch.tanh(s / attn.softcap)
    t = (ctx + torch.arange(n)).unsqueeze(1)
    pos = (start + torch.arange(kk.shape[0])).unsqueeze(0)
    seen = (pos <= t) & ((t - pos < attn.window) if attn.window else True)
    s = s.masked_fill(~seen, -torch.inf)
    if attn.sinks is not None:
        s = torch.cat([s, attn.sinks.double().view(Hq, 1, 1).expand(Hq, n, 1)], -1)
    p = torch.softmax(s, -1)[..., : kk.shape[0]]
    return torch.einsum("hts,shd->thd", p, vv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(SEMANTICS))
def test_paged_prefill_window_softcap_sinks(name, dtype):
    """Windowed, soft-capped and sink layers: rows whose context starts at a page boundary past 0 (a
    window group's freed pages), mid-page contexts, a first chunk longer than the window. fp32 within
    1e-5 of fp64; bf16 within 2e-2 (its inputs, probabilities and outputs rounded to 8 bits)."""
    attn = SEMANTICS[name]
    P, Hq, Hkv, D = 64, 4, 2, 64
    gen = torch.Generator().manual_seed(len(name))
    ctxs, news, starts = (0, 150, 200, 64), (130, 30, 70, 1), (0, 64, 128, 0)
    lens = [c - s for c, s in zip(ctxs, starts)]
    rows, scratch, hist, q, k, v = _batch(P, Hq, Hkv, D, lens, news, dtype, gen)
    rows = [(q0, q1, ctx, page0, st) for (q0, q1, _, page0, _), ctx, st in zip(rows, ctxs, starts)]
    pp = prefill_cpu.plan_paged_prefill(rows, scratch.shape[0], P)
    spare = torch.full((pp.num_spare, Hkv, P, D), float("nan"), dtype=dtype)
    kc, vc = torch.cat([scratch[:, 0], spare]).contiguous(), torch.cat([scratch[:, 1], spare]).contiguous()
    out = torch.full_like(q, float("nan"))
    prefill_cpu.attend(pp, q, k, v, kc, vc, D**-0.5, out, attn)
    for (q0, q1, ctx, _, start), (ck, cv) in zip(rows, hist):
        keys, values = torch.cat([ck.to(dtype), k[q0:q1]]), torch.cat([cv.to(dtype), v[q0:q1]])
        truth = _fp64_semantic(q[q0:q1], keys, values, D**-0.5, ctx, start, attn)
        err = (out[q0:q1].double() - truth).abs().max().item()
        assert err <= (1e-5 if dtype == torch.float32 else 2e-2), (name, ctx, q1 - q0, err)
