"""The accuracy harness: its semantics, its wiring into the model, its report, its errors.

Fast enough for CI (~1 minute on 2 cores): one window of 256 tokens of Hamlet, page 64.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from kivi_serve.eval import harness as H
from kivi_serve.model.prepare import ModelError
from kivi_serve.quant import staging as staging_format
from kivi_serve.quant.page import dequantize_pages, quantize_pages
from kivi_serve.quant.schemes import DEFAULT_SCHEMES, SCHEMES, Scheme

WINDOW_LEN = 256
PAGE = 64


class ExactPagesScheme(Scheme):
    """Finalised pages read back exactly, through the harness's mixing path: the harness must then
    reproduce the stock model (up to fp32 rounding), which proves the exact/dequantized masks."""

    def roundtrip(self, k, v, page_size, sink):  # noqa: D102
        return k.float().clone(), v.float().clone()


EXACT_PAGES = ExactPagesScheme(
    "exact-pages", k_bits=2, v_bits=2, exact_tokens=1, k_outliers=0, wide_channels=None
)


# --------------------------------------------------------------------------- semantics (no model)
def test_finalised_mask_by_hand():
    # pages of 4: query 3 completes page 0, so it reads keys 0..2 dequantized; query 2 reads all exact.
    m = H.finalised_mask(10, 4)
    expected = {
        0: [], 1: [], 2: [], 3: [0, 1, 2], 4: [0, 1, 2, 3], 5: [0, 1, 2, 3], 6: [0, 1, 2, 3],
        7: list(range(7)), 8: list(range(8)), 9: list(range(8)),
    }  # fmt: skip
    for t, cols in expected.items():
        assert m[t].nonzero().flatten().tolist() == cols, t


def test_finalised_mask_chunks_by_hand():
    # pages of 4, chunks [0, 6) and [6, 10): the second chunk's append completes page 1 (token 7),
    # so its queries read keys 0..5 from the cache, dequantized, and 6..9 (their own chunk) exact.
    m = H.finalised_mask(10, 4, chunks=[0, 6])
    for t in range(10):
        assert m[t].nonzero().flatten().tolist() == ([] if t < 6 else list(range(6))), t
    # one chunk per token is teacher-forced decode, the default
    assert torch.equal(H.finalised_mask(37, 8, chunks=range(37)), H.finalised_mask(37, 8))
    with pytest.raises(ValueError, match="chunk starts"):
        H.finalised_mask(10, 4, chunks=[0, 10])


def _served_attention(q, k, v, scheme, P, chunk_starts, staging="model"):
    """What a server computes, step by step: each chunk appends its tokens (quantizing each page, once,
    when the append completes it: the sink on the first page; the page's tokens that arrived in
    earlier chunks as ``staging`` held them), then its queries read earlier tokens from the cache
    (open pages as staging holds them) and their own chunk exactly. fp64 (B, Hq, T, D)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    layout = scheme.layout(D, P)
    ck, cv = k.double().clone(), v.double().clone()  # the cache as the server holds it
    rk, rv = (staging_format.roundtrip(x, staging) for x in (k, v))  # what a staging slot reads back
    pos = torch.arange(T).view(1, 1, T, 1)
    bounds = list(chunk_starts) + [T]
    out = torch.empty(B, Hq, T, D, dtype=torch.float64)
    for c, c_end in zip(bounds, bounds[1:]):
        for s in range(c, c_end):  # this chunk's tokens of pages that stay open go to staging
            if (s // P + 1) * P - 1 > c_end - 1:
                ck[:, :, s], cv[:, :, s] = rk[:, :, s].double(), rv[:, :, s].double()
        for j in range(c // P, c_end // P):  # the pages this chunk's append completes
            kp = torch.where(pos < c, rk, k)[:, :, j * P : (j + 1) * P].reshape(B * Hkv, P, D)
            vp = torch.where(pos < c, rv, v)[:, :, j * P : (j + 1) * P].reshape(B * Hkv, P, D)
            pages = quantize_pages(kp, vp, layout, sink=torch.full((B * Hkv,), j == 0))
            kq, vq = dequantize_pages(pages, layout)
            ck[:, :, j * P : (j + 1) * P] = kq.reshape(B, Hkv, P, D).double()
            cv[:, :, j * P : (j + 1) * P] = vq.reshape(B, Hkv, P, D).double()
        for t in range(c, c_end):
            keys, vals = ck[:, :, : t + 1].clone(), cv[:, :, : t + 1].clone()
            keys[:, :, c:], vals[:, :, c:] = k[:, :, c : t + 1].double(), v[:, :, c : t + 1].double()
            qt = q[:, :, t].double().reshape(B, Hkv, G, D)
            s = torch.einsum("bkgd,bksd->bkgs", qt, keys) * D**-0.5  # (B, Hkv, G, t+1)
            out[:, :, t] = torch.einsum("bkgs,bksd->bkgd", torch.softmax(s, -1), vals).reshape(B, Hq, D)
    return out


@pytest.mark.parametrize(
    "chunks", [None, [0, 128], [0, 37, 100, 140]], ids=["decode", "cached-128", "chunked"]
)
def test_batched_mixing_equals_the_served_computation(chunks):
    """The one-pass masked mixing (in query blocks) == the server's step-by-step computation against a
    cache that quantizes each page once, at the append that completes it, and keeps the open page
    exact: teacher-forced decode (one token per step), a cached prefix, chunked prefill."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, D, P = 2, 4, 2, 150, 64, 64
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (Hq, Hkv, Hkv))
    k[..., 5] += 4.0  # an outlier channel, as real keys have
    scheme = SCHEMES["kivi-serve-2bit"]
    k_deq, v_deq = H.page_roundtrip(scheme, k, v, P)
    mask = H.finalised_mask(T, P, chunks=chunks)
    out, probs = H.mixed_attention(q, k, v, k_deq, v_deq, mask, D**-0.5, block=32)
    starts = list(range(T)) if chunks is None else chunks
    want = _served_attention(q, k, v, scheme, P, starts)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    # one block or many, the same numbers; the rows helper agrees; no probs unless asked for
    whole, probs_whole = H.mixed_attention(q, k, v, k_deq, v_deq, mask, D**-0.5, block=T)
    torch.testing.assert_close(out, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(probs, probs_whole, atol=1e-7, rtol=1e-6)
    rows = [0, 63, 64, 149]
    part = H.attention_rows(q, k, k_deq, mask, D**-0.5, rows)
    torch.testing.assert_close(part, probs[..., rows, :], atol=1e-7, rtol=1e-6)
    assert H.mixed_attention(q, k, v, k_deq, v_deq, mask, D**-0.5, need_probs=False)[1] is None


@pytest.mark.parametrize("staging", ["int8", "fp8"])
@pytest.mark.parametrize("chunks", [None, [0, 37, 100, 140]], ids=["decode", "chunked"])
def test_staged_mixing_equals_the_served_computation(chunks, staging):
    """With a compact staging slot: the open page read as staging rounds it, pages quantized from
    the staged values (the completing chunk's tokens as given), own chunk exact — as the harness's
    kivi_eval_attention assembles it, against the step-by-step server."""
    g = torch.Generator().manual_seed(2)
    B, Hq, Hkv, T, D, P = 1, 4, 2, 150, 64, 64
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (Hq, Hkv, Hkv))
    k[..., 5] += 4.0
    scheme = SCHEMES["kivi-serve-2bit"]
    rk, rv = staging_format.roundtrip(k, staging), staging_format.roundtrip(v, staging)
    went = H.staged_tokens(T, P, chunks=chunks).view(1, 1, T, 1)
    k_deq, v_deq = H.page_roundtrip(scheme, torch.where(went, rk, k), torch.where(went, rv, v), P)
    mask, smask = H.finalised_mask(T, P, chunks=chunks), H.staged_mask(T, P, chunks=chunks)
    assert not (mask & smask).any()
    out, _ = H.mixed_attention(q, k, v, k_deq, v_deq, mask, D**-0.5, staged=(rk, rv, smask))
    want = _served_attention(q, k, v, scheme, P, list(range(T)) if chunks is None else chunks, staging)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    exact = _served_attention(q, k, v, scheme, P, list(range(T)) if chunks is None else chunks)
    assert (exact - want).abs().amax() > 1e-4  # the rounding is visible: the test can tell


def test_open_page_and_own_token_stay_exact():
    # a scheme that destroys every finalised page: queries before the first page completes are unaffected
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, 100, 64, generator=g) for h in (2, 1, 1))
    exact, _ = H.mixed_attention(q, k, v, None, None, None, 0.125)
    mixed, _ = H.mixed_attention(q, k, v, k * 0 + 7, v * 0 - 3, H.finalised_mask(100, 64), 0.125)
    torch.testing.assert_close(mixed[:, :, :63], exact[:, :, :63], atol=0, rtol=0)
    assert (mixed[:, :, 63:] - exact[:, :, 63:]).abs().amax() > 0.1


# --------------------------------------------------------------------------- with the real model
@pytest.fixture(scope="module")
def lm():
    return H.load_model("smollm2", "cpu")


@pytest.fixture(scope="module")
def report(lm):
    """``run_cli --json`` over 1 × 256 tokens of Hamlet at page 64, every scheme; returns stdout."""
    saved = H.load_model
    H.load_model = lambda model, device=None: lm  # the model is loaded once for the module
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            rc = H.run_cli("smollm2", "hamlet", windows=1, window_len=WINDOW_LEN, page_size=PAGE,
                           json_out=True)
    finally:
        H.load_model = saved
    assert rc == 0
    return buf.getvalue()


def test_json_report_shape(report, lm):
    last = report.strip().splitlines()[-1]
    out = json.loads(last)
    assert set(out) == {"model", "corpus", "tokens", "results"}
    assert out["model"] == "smollm2" and out["corpus"] == "hamlet.txt"
    assert out["tokens"] == WINDOW_LEN - 1
    assert [r["scheme"] for r in out["results"]] == list(DEFAULT_SCHEMES)
    keys = {"scheme", "ppl", "delta_pct", "bits_per_element", "greedy_agreement", "top1_agreement",
            "bits_per_element_model", "staging"}
    for r in out["results"]:
        assert set(r) == keys and r["staging"] == "model"
        assert r["ppl"] > 1 and 0 <= r["top1_agreement"] <= 1
        assert r["greedy_agreement"] == r["top1_agreement"]
        s = SCHEMES[r["scheme"]]
        assert r["bits_per_element"] == round(s.bits_per_element(128, PAGE), 4)
        assert r["bits_per_element_model"] == round(s.bits_per_element(lm.head_dim, PAGE), 4)
    res = {r["scheme"]: r for r in out["results"]}
    assert res["fp16"]["delta_pct"] == 0 and res["fp16"]["top1_agreement"] == 1.0
    assert res["fp16"]["bits_per_element"] == 16
    assert res["kivi2-uniform"]["ppl"] > res["fp16"]["ppl"]
    assert res["kivi2-uniform"]["top1_agreement"] < 1.0
    assert abs(res["kivi-serve-4bit"]["delta_pct"]) < res["kivi2-uniform"]["delta_pct"]


def test_exact_pages_reproduce_the_stock_model(lm):
    """With finalised pages read back exactly, the mixing path must give the stock model's logits
    (transformers' sdpa and eager attention): proves the masks and the GQA wiring."""
    _, text = H.read_corpus("hamlet")
    ids = H.make_windows(lm.tokenizer, text, 1, WINDOW_LEN)
    exact = H.run_logits(lm, ids, EXACT_PAGES, PAGE)
    quant = H.run_logits(lm, ids, SCHEMES["kivi2-uniform"], PAGE)
    try:
        for impl in ("sdpa", "eager"):
            lm.model.set_attn_implementation(impl)
            with torch.no_grad():
                stock = lm.model(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(exact, stock, atol=1e-3, rtol=1e-4)
    finally:
        lm.model.set_attn_implementation(H.ATTN_IMPLEMENTATION)
    # and the mixing really reads the dequantized pages where it should:
    assert (quant - exact).abs().amax() > 1e-2
    torch.testing.assert_close(quant[:, : PAGE - 1], exact[:, : PAGE - 1], atol=1e-4, rtol=1e-5)


def test_token_logprobs_are_the_logits_log_softmax(lm):
    """The blockwise log-probabilities, argmax and ranks equal those of the full logits; with a cached
    prefix (chunks) only the queries after it read dequantized pages."""
    _, text = H.read_corpus("hamlet")
    ids = H.make_windows(lm.tokenizer, text, 1, WINDOW_LEN)
    scheme = SCHEMES["kivi-serve-2bit"]
    for chunks in (None, [0, 2 * PAGE]):
        logits = H.run_logits(lm, ids, scheme, PAGE, chunks=chunks)[0, :-1]
        logp = torch.log_softmax(logits.double(), -1)
        want = logp.gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)
        lp, am, rank = H.token_logprobs(lm, ids, scheme, PAGE, chunks=chunks, block=100)
        torch.testing.assert_close(lp, want, atol=2e-4, rtol=0)
        assert (am == logits.argmax(-1)).float().mean() > 0.99  # near-ties may flip between GEMM shapes
        assert (rank == (logp > want.unsqueeze(1)).sum(-1) + 1).float().mean() > 0.99
        pos = [5, 130, 254]
        lp3, _, _ = H.token_logprobs(lm, ids, scheme, PAGE, chunks=chunks, positions=pos)
        torch.testing.assert_close(lp3, lp[pos], atol=1e-5, rtol=0)
    exact = H.run_logits(lm, ids, EXACT_PAGES, PAGE)
    cached = H.run_logits(lm, ids, scheme, PAGE, chunks=[0, 2 * PAGE])
    torch.testing.assert_close(cached[:, : 2 * PAGE], exact[:, : 2 * PAGE], atol=1e-4, rtol=1e-5)
    assert (cached[:, 2 * PAGE :] - exact[:, 2 * PAGE :]).abs().amax() > 1e-2


def test_prefix_cache_continues_the_first_chunk(lm):
    """A pass that continues the first engine step's exact keys and values (``prefix_cache``, what a
    study shares between schemes) gives the whole pass's log-probabilities; the cached prefix is not
    changed by a pass; a prefix that reaches past the first chunk is refused."""
    _, text = H.read_corpus("hamlet")
    ids = H.make_windows(lm.tokenizer, text, 1, WINDOW_LEN)
    first = 2 * PAGE
    pos = list(range(first, WINDOW_LEN - 1))
    past = H.prefix_cache(lm, ids, first)
    # Exact read-back through the mixing path (the masks and the cache wiring): fp32 rounding only.
    # Quantized pages: the prefix pass's keys and values differ from the whole pass's in the last fp32
    # bits (other GEMM shapes), which flips the odd code at a threshold: a few 1e-3 nats per token at
    # most, far below the harness's 0.01-nat agreement with the engine.
    cases = ((EXACT_PAGES, [0, first], 1e-4, 1e-4), (EXACT_PAGES, [0, first, 3 * PAGE], 1e-4, 1e-4),
             (SCHEMES["kivi-serve-2bit"], [0, first], 1e-2, 1e-3),
             (SCHEMES["kivi2-uniform"], [0, first, 3 * PAGE], 1e-2, 1e-3))
    for scheme, chunks, worst, mean in cases:
        full, am_full, _ = H.token_logprobs(lm, ids, scheme, PAGE, chunks=chunks, positions=pos)
        fast, am_fast, _ = H.token_logprobs(lm, ids, scheme, PAGE, chunks=chunks, positions=pos, past=past)
        assert (fast - full).abs().max() < worst and (fast - full).abs().mean() < mean
        assert (am_fast == am_full).float().mean() > 0.99
    assert past.get_seq_length() == first  # each pass extends a copy
    again, _, _ = H.token_logprobs(lm, ids, scheme, PAGE, chunks=chunks, positions=pos, past=past)
    torch.testing.assert_close(again, fast, atol=0, rtol=0)
    with pytest.raises(ValueError, match="first chunk"):
        H.token_logprobs(lm, ids, scheme, PAGE, chunks=[0, PAGE], positions=pos, past=past)
    with pytest.raises(ValueError, match="first chunk"):
        H.token_logprobs(lm, ids, scheme, PAGE, positions=pos, past=past)  # decode steps: one token each
    with pytest.raises(ValueError, match="positions"):
        H.token_logprobs(lm, ids, scheme, PAGE, chunks=chunks, positions=[first - 1], past=past)
    with pytest.raises(ValueError, match="prefix end"):
        H.prefix_cache(lm, ids, WINDOW_LEN)


class NamedExactPages(ExactPagesScheme):
    """Exact pages that log their name when a layer reads them (which scheme served which layer)."""

    calls: list[str] = []

    def roundtrip(self, k, v, page_size, sink):  # noqa: D102
        self.calls.append(self.name)
        return super().roundtrip(k, v, page_size, sink)


def test_layer_overrides_pick_the_scheme_per_layer(lm):
    """``layers={i: scheme}`` (the ablation study's tool): layer ``i`` reads its pages through that
    scheme and every other layer through the main one; overriding every layer is the override alone."""
    _, text = H.read_corpus("hamlet")
    ids = H.make_windows(lm.tokenizer, text, 1, WINDOW_LEN)
    n = lm.model.config.num_hidden_layers
    main, other = NamedExactPages("main", k_bits=2, v_bits=2), NamedExactPages("other", k_bits=2, v_bits=2)
    NamedExactPages.calls.clear()
    H.token_logprobs(lm, ids, main, PAGE, layers={3: other, n - 1: other})
    assert NamedExactPages.calls == ["main"] * 3 + ["other"] + ["main"] * (n - 5) + ["other"]
    quant = SCHEMES["kivi2-uniform"]
    exact, _, _ = H.token_logprobs(lm, ids, EXACT_PAGES, PAGE)
    every, _, _ = H.token_logprobs(lm, ids, quant, PAGE, layers=dict.fromkeys(range(n), EXACT_PAGES))
    torch.testing.assert_close(every, exact, atol=1e-6, rtol=0)
    one, _, _ = H.token_logprobs(lm, ids, quant, PAGE, layers={0: EXACT_PAGES})
    plain, _, _ = H.token_logprobs(lm, ids, quant, PAGE)
    assert (one - plain).abs().max() > 1e-3 and (one - exact).abs().max() > 1e-3


def test_table_output(capsys):
    H.render_table({
        "model": "m", "corpus": "c.txt", "tokens": 10, "page_size": 64, "head_dim": 64,
        "results": [{"scheme": "fp16", "ppl": 10.0, "delta_pct": 0.0, "bits_per_element": 16.0,
                     "greedy_agreement": 1.0, "top1_agreement": 1.0, "bits_per_element_model": 16.0}],
    })  # fmt: skip
    out = capsys.readouterr().out
    assert "fp16" in out and "10.000" in out and "bits (hd64)" in out


# --------------------------------------------------------------------------- bad inputs
def test_missing_corpus(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        H.evaluate("smollm2", tmp_path / "nope.txt", 1, 64, 64, progress=False)


def test_non_utf8_corpus(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Ophélie, ".encode("latin-1") * 300)
    with pytest.raises(ValueError, match="not UTF-8"):
        H.evaluate("smollm2", bad, 1, 64, 64, progress=False)


def test_too_short_corpus(tmp_path, lm):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be, that is the question. " * 40)  # ~1800 chars, ~400 tokens
    with pytest.raises(ValueError, match="corpus too short"):
        H.evaluate(lm, short, 2, 1024, 64, progress=False)


def test_model_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    corpus = tmp_path / "c.txt"
    corpus.write_text("word " * 1000)
    with pytest.raises(ModelError, match="no weights"):
        H.evaluate(str(tmp_path), corpus, 1, 64, 64, progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"schemes": ["fp16", "kivi-9bit"]}, "unknown scheme"),
        ({"schemes": []}, "at least one scheme"),
        ({"page_size": 100}, "page_size"),
        ({"windows": 0}, "windows"),
        ({"window_len": 1}, "window_len"),
    ],
)
def test_bad_arguments(lm, kwargs, match):
    args = {"windows": 1, "window_len": 64, "page_size": 64, "progress": False} | kwargs
    with pytest.raises(ValueError, match=match):
        H.evaluate(lm, "hamlet", **args)
