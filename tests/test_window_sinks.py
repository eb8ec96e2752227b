"""Sliding window, logit soft-cap and sink logits: the reference against fp64 attention written out
directly, and the CPU executor of such layers against the reference.

The pages before a window are vLLM's null block 0 in the block table (it frees them); block 0 is
filled with NaN here, so reading it anywhere would poison the output.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kivi_serve.backend.executors import KernelExecutor, TorchExecutor
from kivi_serve.kernels import reference as R
from kivi_serve.kernels.semantics import LayerAttention, first_visible
from kivi_serve.quant.codec import FpPagesCodec, make_codec

P, D, HQ, HKV = 64, 64, 4, 2
NB = 40


def fp64_attention(q, k, v, scale, t0, attn: LayerAttention):
    """q (n, Hq, D) at positions t0.. ; k, v (t0 + n, Hkv, D) every position; fp64, written out."""
    n = q.shape[0]
    G = HQ // HKV
    kk = k.double().repeat_interleave(G, 1)
    vv = v.double().repeat_interleave(G, 1)
    out = torch.zeros(n, HQ, D, dtype=torch.float64)
    for i in range(n):
        t = t0 + i
        lo = 0 if attn.window is None else max(0, t - attn.window + 1)
        s = torch.einsum("hd,shd->hs", q[i].double(), kk[lo : t + 1]) * scale
        if attn.softcap is not None:
            s = attn.softcap * torch.tanh(s / attn.softcap)
        m = s.max(-1, keepdim=True).values
        if attn.sinks is not None:
            m = torch.maximum(m, attn.sinks.double().unsqueeze(1))
        e = torch.exp(s - m)
        den = e.sum(-1, keepdim=True)
        if attn.sinks is not None:
            den = den + torch.exp(attn.sinks.double().unsqueeze(1) - m)
        out[i] = torch.einsum("hs,shd->hd", e / den, vv[lo : t + 1])
    return out


ATTNS = {
    "full": LayerAttention(),
    "window": LayerAttention(window=100),
    "window-softcap": LayerAttention(window=P, softcap=5.0),
    "window-sinks": LayerAttention(window=37, sinks=torch.tensor([0.5, 2.0, -1.0, 3.0])),
    "sinks": LayerAttention(sinks=torch.tensor([1.0, -2.0, 0.0, 4.0])),
}
# (seq_len, new tokens): decodes deep past the window, at a page boundary, a prefill chunk that crosses
# the window boundary, a chunk starting mid-page
SEQS = [(5 * P + 3, 1), (3 * P, 1), (4 * P + 10, 90), (P + 5, 20), (7, 7)]


def build(codec, attn, seed=0):
    """Pages and block tables for SEQS as vLLM would hand them after this step's append (tails open in
    staging); pages wholly before each row's window → the null block (NaN). Returns the inputs and the
    full-precision truth of every row's K/V (as the pages store them)."""
    g = torch.Generator().manual_seed(seed)
    pages = torch.zeros(NB, HKV, codec.page_bytes, dtype=torch.uint8)
    pages[0] = torch.full((HKV, codec.page_bytes // 4), float("nan")).view(torch.uint8)
    staging = torch.zeros(len(SEQS), 2, HKV, P, D)
    perm = (torch.randperm(NB - 1, generator=g) + 1).tolist()
    tables = torch.zeros(len(SEQS), 8, dtype=torch.int32)
    tails, truth, news = [], [], []
    for b, (L, n) in enumerate(SEQS):
        k = torch.randn(L, HKV, D, generator=g)
        v = torch.randn(L, HKV, D, generator=g)
        ctx = L - n
        first = first_visible(attn, ctx) // P
        full = L // P
        stored_k, stored_v = k.clone(), v.clone()
        for i in range(-(-L // P)):
            if i < first:
                continue  # freed by vLLM: null block 0
            blk = perm.pop()
            tables[b, i] = blk
            kp, vp = k[i * P : (i + 1) * P].transpose(0, 1), v[i * P : (i + 1) * P].transpose(0, 1)
            if i < full:
                fill = torch.full((HKV,), P)
                enc = codec.encode(kp, vp, fill, torch.full((HKV,), i == 0))
                pages[blk] = enc
                dk, dv = codec.decode(enc)
                stored_k[i * P : (i + 1) * P] = dk.transpose(0, 1)
                stored_v[i * P : (i + 1) * P] = dv.transpose(0, 1)
            else:
                staging[b, 0, :, : L - i * P] = kp
                staging[b, 1, :, : L - i * P] = vp
        tails.append(b if L % P else -1)
        stored_k[ctx:], stored_v[ctx:] = k[ctx:], v[ctx:]  # new tokens: exact, from the input
        truth.append((stored_k, stored_v))
        news.append((k[ctx:], v[ctx:]))
    qlens = [n for _, n in SEQS]
    qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist())
    query = torch.randn(int(qsl[-1]), HQ, D, generator=g)
    key = torch.cat([k for k, _ in news])
    value = torch.cat([v for _, v in news])
    lens = torch.tensor([L for L, _ in SEQS])
    return query, key, value, pages, staging, tables, lens, qsl, torch.tensor(tails), truth


@pytest.mark.parametrize("name", list(ATTNS))
def test_reference_equals_fp64_attention(name):
    attn = ATTNS[name]
    codec = FpPagesCodec(D, P, torch.float32)
    query, key, value, pages, staging, tables, lens, qsl, tails, truth = build(codec, attn)
    scale = 0.2
    out = R.paged_attention(
        query, key, value, pages, staging, tables, lens, qsl, tails, codec, scale, attn=attn
    )
    assert torch.isfinite(out).all()
    for b, (L, n) in enumerate(SEQS):
        want = fp64_attention(query[qsl[b] : qsl[b + 1]], *truth[b], scale, L - n, attn)
        torch.testing.assert_close(out[qsl[b] : qsl[b + 1]].double(), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["window", "window-softcap", "window-sinks"])
def test_window_changes_the_answer(name):
    """Not vacuous: the same inputs with the window, soft-cap and sinks dropped differ."""
    attn = ATTNS[name]
    codec = FpPagesCodec(D, P, torch.float32)
    query, key, value, pages, staging, tables, lens, qsl, tails, truth = build(codec, attn)
    out = R.paged_attention(
        query, key, value, pages, staging, tables, lens, qsl, tails, codec, 0.2, attn=attn
    )
    plain = fp64_attention(query[: qsl[1]], *truth[0], 0.2, SEQS[0][0] - 1, LayerAttention())
    assert (out[: qsl[1]].double() - plain).abs().max() > 1e-2


@pytest.mark.parametrize("name", list(ATTNS))
def test_cpu_executor_serves_decode_rows_as_the_reference(name):
    """The executor a windowed/sink layer gets on CPU writes exactly the reference's decode rows and
    leaves the prefill rows to the prefill path; the compiled kernels refuse such layers."""
    attn = ATTNS[name]
    codec = make_codec(D, P, torch.float32)
    query, key, value, pages, staging, tables, lens, qsl, tails, _ = build(codec, attn, seed=1)
    want = R.paged_attention(
        query, key, value, pages, staging, tables, lens, qsl, tails, codec, 0.2, attn=attn
    )
    out = torch.full_like(query, float("nan"))
    TorchExecutor(codec, attn).decode(query, key, value, pages, staging, tables, lens, qsl, tails, 0.2, out)
    decode = torch.zeros(len(query), dtype=torch.bool)
    decode[qsl[:-1][qsl.diff() == 1]] = True
    assert decode.sum() == 2  # SEQS has two decode rows
    assert torch.equal(out[decode], want[decode])
    assert out[~decode].isnan().all()
    if attn.plain:
        KernelExecutor(codec, SimpleNamespace(), attn)
    else:
        with pytest.raises(ValueError, match="do not apply"):
            KernelExecutor(codec, SimpleNamespace(), attn)


def test_layer_attention_checks_its_arguments():
    with pytest.raises(ValueError, match="window"):
        LayerAttention(window=0)
    with pytest.raises(ValueError, match="soft-cap"):
        LayerAttention(softcap=-1.0)
    assert LayerAttention().plain and not LayerAttention(window=4).plain
