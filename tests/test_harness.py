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
from kivi_serve.quant.page import dequantize_pages, quantize_pages
from kivi_serve.quant.schemes import SCHEMES, Scheme

WINDOW_LEN = 256
PAGE = 64


class ExactPagesScheme(Scheme):
    """Finalised pages read back exactly, through the harness's mixing path: the harness must then
    reproduce the stock model (up to fp32 rounding), which proves the exact/dequantized masks."""

    def roundtrip(self, k, v, page_size, sink):  # noqa: D102
        return k.float().clone(), v.float().clone()


EXACT_PAGES = ExactPagesScheme("exact-pages", k_bits=2, v_bits=2, exact_tokens=1, k_outliers=0, k_hi_channels=None)


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


def test_batched_mixing_equals_token_by_token_decode():
    """The one-pass masked mixing == T decode steps against a cache that quantizes each page once,
    at the append that fills it (sink on the first page), and keeps the open page exact."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, D, P = 2, 4, 2, 150, 64, 64
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (Hq, Hkv, Hkv))
    k[..., 5] += 4.0  # an outlier channel, as real keys have
    scheme = SCHEMES["kivi-serve-2bit"]
    layout = scheme.layout(D, P)
    k_deq, v_deq = H.page_roundtrip(scheme, k, v, P)
    out, _ = H.mixed_attention(q, k, v, k_deq, v_deq, H.finalised_mask(T, P), D**-0.5)

    G = Hq // Hkv
    ck, cv = k.double().clone(), v.double().clone()  # the cache as the server holds it
    for t in range(T):
        if (t + 1) % P == 0:  # this append completes page j: quantize it once, from the tokens present
            j = t // P
            kp = k[:, :, j * P : (j + 1) * P].reshape(B * Hkv, P, D)
            vp = v[:, :, j * P : (j + 1) * P].reshape(B * Hkv, P, D)
            pages = quantize_pages(kp, vp, layout, sink=torch.full((B * Hkv,), j == 0))
            kq, vq = dequantize_pages(pages, layout)
            ck[:, :, j * P : (j + 1) * P] = kq.reshape(B, Hkv, P, D).double()
            cv[:, :, j * P : (j + 1) * P] = vq.reshape(B, Hkv, P, D).double()
        keys, vals = ck[:, :, : t + 1].clone(), cv[:, :, : t + 1].clone()
        keys[:, :, t], vals[:, :, t] = k[:, :, t].double(), v[:, :, t].double()  # own token: exact
        for h in range(Hq):
            s = (q[:, h, t].double().unsqueeze(1) * keys[:, h // G]).sum(-1) * D**-0.5  # (B, t+1)
            want = (torch.softmax(s, -1).unsqueeze(-1) * vals[:, h // G]).sum(1)
            torch.testing.assert_close(out[:, h, t].double(), want, atol=2e-5, rtol=2e-5)


def test_open_page_and_own_token_stay_exact():
    # a scheme that destroys every finalised page: queries before the first page completes are unaffected
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 2, 100, 64, generator=g), torch.randn(1, 1, 100, 64, generator=g), torch.randn(1, 1, 100, 64, generator=g)
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
            rc = H.run_cli("smollm2", "hamlet", windows=1, window_len=WINDOW_LEN, page_size=PAGE, json_out=True)
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
    assert [r["scheme"] for r in out["results"]] == list(SCHEMES)
    keys = {"scheme", "ppl", "delta_pct", "bits_per_element", "greedy_agreement", "top1_agreement", "bits_per_element_model"}
    for r in out["results"]:
        assert set(r) == keys
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
