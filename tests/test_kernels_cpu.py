"""The C++ CPU kernels (``kivi_serve/kernels/cpu``) against the PyTorch reference (the spec).

* quantize is bit-exact: every byte of :func:`kivi_serve.quant.page.quantize_pages` — fills 1..P,
  sinks, garbage past the fill, tied and all-zero channel scales, head_dim 64/128/256, pages
  64/128/256, the 2/3/4-bit schemes of :mod:`kivi_serve.quant.schemes`, K outliers, uniform
  codebooks, float32/bfloat16/float16 input;
* ``append_kv`` executes a real :class:`StagingPool` schedule (prefill chunks, decode, pages filling,
  pool overflow: evict, reopen, a page finalised early then completed) bit-identically to
  :func:`kivi_serve.kernels.reference.append_kv`, pages and staging; dequantize is bit-exact;
* decode attention is within ``K_TOL`` times the error that attention in the query dtype itself
  makes against fp64 on the same cached values (FlashAttention-3 style), over named batch specs
  with random block permutations, block 0 as a null block full of garbage, ragged lengths,
  staging tails, tails finalised early, pages completed by the new token, GQA groups 1..16, and
  batches mixing decode rows with prefill and zero-length rows (left untouched);
* the ISA paths (AVX-512, AVX2 through the LUT, scalar) agree: identical pages, decode within the
  same bound — a path this CPU cannot run is skipped, never failed; neither do the verdicts depend
  on the thread count;
* the once-per-step path (:class:`DecodeBatch`, the backend's): one batch reused by several layers,
  with query/key/value as row-strided views of a fused qkv tensor, gives exactly the one-call result;
  metadata changed after the batch checked it (a batch kept past its step) and layer tensors that do
  not match it are refused with a ValueError naming them;
* bad arguments (dtype, shape, device, contiguity, head size, page size, out-of-range indices in a
  plan or a block table) are ValueErrors naming them; without a compiler the wrappers run the
  reference after one RuntimeWarning.
"""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from kernel_cases import (
    BAD_DECODE_ARGS,
    assert_pages_equal,
    bad_append_cases,
    build_decode_case,
    check_append_schedule,
    dtype_id,
    kv_tokens,
    layout_id,
)
from test_kernels_cuda import _cpu_decode_args

from kivi_serve.backend.executors import KernelExecutor
from kivi_serve.backend.staging import AppendPlan, PageOps, StagingPool
from kivi_serve.kernels import cpu, reference
from kivi_serve.kernels.cpu import loader
from kivi_serve.quant import page
from kivi_serve.quant.codec import QuantCodec
from kivi_serve.quant.layout import PageLayout
from kivi_serve.quant.schemes import get_scheme

#: Decode error bound, in multiples of the error of attention computed in the query dtype
#: against fp64 on the same cached values. bf16/fp16: the kernel rounds only its output to the
#: query dtype, so it is far below the bound. float32: the kernel sums q . k as
#: q . centre + (q * scale) . level and P . V likewise — the same fp32 terms grouped differently
#: from a dot over dequantized keys — measured up to ~6x fp32 attention's own (tiny) error.
K_TOL = {torch.bfloat16: 4.0, torch.float16: 4.0, torch.float32: 10.0}


@pytest.fixture(scope="module", autouse=True)
def built():
    """The library of the selected ISA; skip without a compiler, fail if a compiler cannot build it."""
    if loader.find_compiler() is None:
        pytest.skip("no C++ compiler: the CPU kernels fall back to the reference (tested below)")
    reason = loader.unavailable_reason()
    assert reason is None, reason
    return loader.library()


#: The rotated-values scheme (its layouts at any head_dim; 256-token pages).
VR = get_scheme("kivi-serve-2bit-p256-vr")


# ----------------------------------------------------------------------------- quantize
def page_batch(layout: PageLayout, dtype, gen: torch.Generator, small: bool = False):
    """Pages that reach every rule: fills 1..P, sinks, garbage past the fill, an outlier token, a
    page whose channels all tie (wide channels 0..H-1), a constant page (every scale 0, every Lloyd
    weight 0), pairs of equal channels. ``small``: pages 0, 1, 6, 7, 8 only (the reference encoder
    is slow on big pages)."""
    P, D = layout.page_size, layout.head_dim
    fills = [P, 1, 2, 3, min(17, P - 1), P // 2, P - 1, P, P, P // 2 + 5]
    sinks = [False, True, False, False, True, False, False, True, False, False]
    n = len(fills)
    k = torch.randn(n, P, D, generator=gen) * 50  # garbage, overwritten below the fill
    v = torch.randn(n, P, D, generator=gen) * 50
    for i, f in enumerate(fills):
        kt, vt = kv_tokens(f, 1, D, gen)
        k[i, :f], v[i, :f] = kt[:, 0], vt[:, 0]
    k[7] = k[7, :, :1]  # one column repeated over every channel: all scales tie
    k[8], v[8] = 0.5, -1.25  # constant page
    k[9, :, 1::2] = k[9, :, 0::2]  # pairs of equal channels
    keep = [0, 1, 6, 7, 8] if small else list(range(n))
    fill, sink = torch.tensor(fills)[keep], torch.tensor(sinks)[keep]
    return k[keep].to(dtype), v[keep].to(dtype), fill, sink


QUANT_CASES = [  # (layout, dtype, codebook, every page of page_batch)
    (PageLayout(64, 64), torch.bfloat16, "fitted", True),
    (PageLayout(64, 128), torch.float16, "fitted", False),  # SmolLM2's heads, default format
    (PageLayout(128, 128), torch.float32, "fitted", False),  # Llama-3.1-8B's heads, default format
    (PageLayout(256, 64), torch.bfloat16, "fitted", False),
    (PageLayout(64, 256), torch.bfloat16, "fitted", False),
    (get_scheme("kivi-serve-3bit").layout(128, 64), torch.float16, "fitted", False),
    (get_scheme("kivi-serve-4bit").layout(64, 128), torch.bfloat16, "fitted", False),
    (get_scheme("kivi2-uniform").layout(128, 64), torch.float32, "uniform", False),
    (PageLayout(128, 64, k_outliers=1), torch.bfloat16, "fitted", True),  # K outliers + wide channels
    (PageLayout(64, 64, exact_tokens=0, k_outliers=1, wide_channels=0), torch.float16, "fitted", False),
    # kivi-serve-2bit-p256-vr: values quantized rotated, free V codebook ends (SmolLM2's and Llama's heads)
    (VR.layout(64, 256), torch.bfloat16, "fitted", False),
    (VR.layout(128, 256), torch.float16, "fitted", False),
    # the two value options at other sizes, together (every page) and each alone
    (PageLayout(256, 64, v_rotate=True, v_pin_ends=False), torch.float32, "fitted", True),
    (PageLayout(64, 128, v_rotate=True), torch.bfloat16, "uniform", False),
    (PageLayout(128, 128, v_pin_ends=False), torch.float16, "fitted", False),
]


@pytest.mark.parametrize(
    ("layout", "dtype", "codebook", "every_page"),
    QUANT_CASES,
    ids=[f"{layout_id(lay)}-{dtype_id(dt)}-{cb}" for lay, dt, cb, _ in QUANT_CASES],
)
def test_quantize_is_bit_exact(layout, dtype, codebook, every_page):
    gen = torch.Generator().manual_seed(layout.head_dim + layout.page_size + layout.k_bits)
    k, v, fill, sink = page_batch(layout, dtype, gen, small=not every_page)
    want = page.quantize_pages(k, v, layout, fill=fill, sink=sink, codebook=codebook)
    got = cpu.quantize_pages(k, v, layout, fill=fill, sink=sink, codebook=codebook)
    assert_pages_equal(
        got.view(-1, 1, layout.page_bytes), want.view(-1, 1, layout.page_bytes), layout, "quantize"
    )
    if layout.wide_channels:  # the tied page ranks its wide channels by index: 0 .. H-1
        tied = 7 if every_page else 3
        idx = layout.view(got[tied : tied + 1], "wide_idx")[0].long().tolist()
        assert idx == list(range(layout.wide_channels))


def test_quantize_page_of_256_tokens_and_channels():
    """The largest page (256 x 256: uint8 token indices at their limit), two fills."""
    layout = PageLayout(256, 256)
    gen = torch.Generator().manual_seed(7)
    k, v = kv_tokens(256, 2, 256, gen)
    k, v = (
        k.transpose(0, 1).contiguous().to(torch.bfloat16),
        v.transpose(0, 1).contiguous().to(torch.bfloat16),
    )
    fill, sink = torch.tensor([256, 200]), torch.tensor([True, False])
    want = page.quantize_pages(k, v, layout, fill=fill, sink=sink)
    assert torch.equal(cpu.quantize_pages(k, v, layout, fill=fill, sink=sink), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_is_bit_exact(dtype):
    gen = torch.Generator().manual_seed(1)
    # every format of QUANT_CASES (3/4-bit planes, wide channels, K outliers, no exact token, pages
    # of 64..256) and 3-bit keys with 2-bit values
    layouts = [lay for lay, *_ in QUANT_CASES] + [PageLayout(64, 256, k_bits=3)]
    for layout in layouts:
        k, v, fill, sink = page_batch(layout, torch.float32, gen)
        pages = cpu.quantize_pages(k, v, layout, fill=fill, sink=sink)  # = the reference's (tested above)
        kr, vr = page.dequantize_pages(pages, layout)
        kc, vc = cpu.dequantize_pages(pages, layout, dtype)
        assert torch.equal(kc, kr.to(dtype)) and torch.equal(vc, vr.to(dtype))
    # dequantize_blocks: all heads of the chosen blocks, entries < 0 skipped (rows stay zero)
    blocks3 = pages.view(5, 2, layout.page_bytes)
    kb, vb = cpu.dequantize_blocks(blocks3, torch.tensor([3, -1, 0], dtype=torch.int32), layout, dtype)
    assert torch.equal(kb[0], kr.view(5, 2, layout.page_size, -1)[3].to(dtype))
    assert torch.equal(vb[2], vr.view(5, 2, layout.page_size, -1)[0].to(dtype))
    assert not kb[1].any() and not vb[1].any()


# ----------------------------------------------------------------------------- append
APPEND_CASES = [
    (PageLayout(64, 64), torch.bfloat16, "fitted"),
    (PageLayout(128, 64, k_bits=3, k_outliers=1, wide_channels=8), torch.float16, "fitted"),
    (get_scheme("kivi-serve-4bit").layout(64, 64), torch.float32, "fitted"),
    (get_scheme("kivi2-uniform").layout(64, 64), torch.bfloat16, "uniform"),
    # rotated values, free V ends: early-finalised pages completed from their own block (dequantized,
    # rotated back) and re-opened pages go through the decoder's inverse rotation too
    (PageLayout(128, 64, v_rotate=True, v_pin_ends=False), torch.float32, "fitted"),
]


@pytest.mark.parametrize(
    ("layout", "dtype", "codebook"),
    APPEND_CASES,
    ids=[f"{layout_id(lay)}-{dtype_id(dt)}-{cb}" for lay, dt, cb in APPEND_CASES],
)
def test_append_schedule_is_bit_exact(layout, dtype, codebook):
    check_append_schedule(layout, dtype, codebook, torch.device("cpu"), short=True, append_kv=cpu.append_kv)


INT8_STAGING_CASES = [  # (layout, model dtype): compact staging rows (quant/staging.py "int8")
    (PageLayout(64, 128), torch.bfloat16),  # SmolLM2's heads, default format
    (PageLayout(128, 64), torch.float16),
    (PageLayout(64, 64), torch.float32),
    (VR.layout(64, 256), torch.bfloat16),  # the backend's form of kivi-serve-2bit-p256-vr on SmolLM2
]


@pytest.mark.parametrize(
    ("layout", "dtype"),
    INT8_STAGING_CASES,
    ids=[f"{layout_id(lay)}-{dtype_id(dt)}" for lay, dt in INT8_STAGING_CASES],
)
def test_append_schedule_int8_staging_is_bit_exact(layout, dtype):
    """Staging rows encoded (new tokens, re-opened pages) and pages quantized from the staged rows
    (finalise, evict), byte for byte as the reference does."""
    check_append_schedule(
        layout, dtype, "fitted", torch.device("cpu"), short=True, append_kv=cpu.append_kv,
        staging_dtype="int8",
    )


def test_append_threads_do_not_change_pages(monkeypatch):
    """Pages are written by several threads at once; the bytes cannot depend on how many."""
    layout = PageLayout(128, 64)
    gen = torch.Generator().manual_seed(5)
    k, v = kv_tokens(6 * 64, 2, 128, gen)
    fin = PageOps.of([(1 + i, -1, 64, i == 0, 64 * i, 0) for i in range(6)])
    none = torch.full((k.shape[0],), -1, dtype=torch.int32)
    plan = AppendPlan(
        none, torch.zeros_like(none), PageOps(), fin, PageOps(), torch.zeros(0, dtype=torch.int32)
    )
    results = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            pages = torch.zeros(7, 2, layout.page_bytes, dtype=torch.uint8)
            cpu.append_kv(
                plan, k.bfloat16(), v.bfloat16(), pages, torch.zeros(1, 2, 2, 64, 128).bfloat16(), layout
            )
            results.append(pages)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


# ----------------------------------------------------------------------------- decode
#: Named decode batches (in the style of tests/test_backend_units.py): each sequence's length
#: including its new token (``P`` is the page size); ``early``: partial last pages finalised early.
BATCH_SPECS = {
    "tiny": {"seq_lens": lambda P: [1, 2, 3]},
    "page_edges": {"seq_lens": lambda P: [P - 1, P, P + 1, 2 * P - 1, 2 * P, 2 * P + 1]},
    "ragged": {"seq_lens": lambda P: [5, 200, 7 * P + 11, 1000, 1]},
    "early_tails": {"seq_lens": lambda P: [100, 300, 77], "early": [0, 2]},
    "long": {"seq_lens": lambda P: [4096 + 17]},
}
DECODE_CASES = [
    (PageLayout(128, 64), torch.bfloat16, 4),  # Llama-3.1-8B per KV head, 24 wide K channels
    (PageLayout(64, 128), torch.float32, 3),  # SmolLM2 per KV head, the CPU backend's fp32 models
    (PageLayout(64, 128), torch.float16, 3),
    (PageLayout(128, 256), torch.float32, 1),
    (PageLayout(256, 64, exact_tokens=0), torch.bfloat16, 8),  # 48 wide channels
    (PageLayout(128, 64, k_outliers=1), torch.float32, 5),  # wide channels and K outliers together
    (PageLayout(64, 64, exact_tokens=0, wide_channels=0), torch.bfloat16, 16),  # plain 2-bit
    # kivi-serve-2bit-p256: 7D/16 = 56 wide channels, many pairs of two wide channels
    (get_scheme("kivi-serve-2bit-p256").layout(128, 256), torch.bfloat16, 4),
    # SmolLM2's heads in it (28 wide channels of 64): 3 heads take avx512's one-chain 4-block score
    # loop, its pairs of two wide channels included, and the fused P.V at page 256
    (get_scheme("kivi-serve-2bit-p256").layout(64, 256), torch.bfloat16, 3),
    # kivi-serve-2bit-p256-vr: P.V over codes in the rotated space, rotated back once per head and
    # split (the exact token, the staged tail and the new token unrotated); every head_dim, and the
    # value options at pages of 64 and 128 (8 heads: two head groups on avx2)
    (VR.layout(64, 256), torch.bfloat16, 3),
    (VR.layout(128, 256), torch.float32, 4),
    (VR.layout(256, 256), torch.float16, 2),
    (PageLayout(64, 64, v_rotate=True, v_pin_ends=False), torch.float32, 5),
    (PageLayout(128, 128, k_outliers=1, v_rotate=True, v_pin_ends=False), torch.bfloat16, 8),
]


@pytest.fixture
def cpp_quantizer(monkeypatch):
    """Build decode cases with the C++ encoder (bit-exact with the reference: tested above) — the
    reference encoder would take most of this file's time."""
    monkeypatch.setattr(page, "quantize_pages", cpu.quantize_pages)


def decode_case(layout, dtype, group, spec: dict, seed: int = 0) -> dict:
    P = layout.page_size
    return build_decode_case(layout, dtype, group, spec["seq_lens"](P), spec.get("early", ()), seed=seed)


def truth_and_lowp(case: dict, layout: PageLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 attention over the cached values (the reference's decoding), and the same in the query dtype."""
    q = case["query"]
    B, Hq, D = q.shape
    H = case["key"].shape[1]
    G = Hq // H
    truth = torch.empty(B, Hq, D, dtype=torch.float64)
    lowp = torch.empty(B, Hq, D, dtype=q.dtype)
    scale = D**-0.5
    pages = reference.pages_view(case["kv_pages"], layout)
    for b in range(B):
        n = int(case["seq_lens"][b])
        table, tail = case["block_tables"][b], int(case["tail_slots"][b])
        ck, cv = reference.gather_context(
            pages, case["staging"], table, n - 1, n, tail, layout, dtype=q.dtype
        )
        k = torch.cat([ck, case["key"][b : b + 1].float()])  # (n, H, D)
        v = torch.cat([cv, case["value"][b : b + 1].float()])
        qb = q[b].reshape(H, G, D)
        s = torch.einsum("hgd,shd->hgs", qb.double(), k.double()) * scale
        truth[b] = torch.einsum("hgs,shd->hgd", s.softmax(-1), v.double()).reshape(Hq, D)
        sl = torch.einsum("hgd,shd->hgs", qb, k.to(q.dtype)) * scale
        p = sl.float().softmax(-1).to(q.dtype)
        lowp[b] = torch.einsum("hgs,shd->hgd", p, v.to(q.dtype)).reshape(Hq, D)
    return truth, lowp


def assert_close_to_truth(out: torch.Tensor, truth: torch.Tensor, lowp: torch.Tensor, what: str) -> None:
    err_lowp = (lowp.double() - truth).abs().max().item()
    err = (out.double() - truth).abs().max().item()
    tol = K_TOL[lowp.dtype]
    assert math.isfinite(err), f"{what}: non-finite output"
    assert err <= tol * err_lowp + 1e-6, (
        f"{what}: error {err:.3e} > {tol} x {err_lowp:.3e} ({lowp.dtype} attention's own)"
    )


@pytest.mark.parametrize("spec_name", list(BATCH_SPECS))
@pytest.mark.parametrize(
    ("layout", "dtype", "group"),
    DECODE_CASES,
    ids=[f"{layout_id(lay)}-{dtype_id(dt)}-g{g}" for lay, dt, g in DECODE_CASES],
)
def test_decode_matches_reference(layout, dtype, group, spec_name, cpp_quantizer):
    if spec_name == "long" and layout.head_dim == 256:
        pytest.skip("long context covered by the other layouts (keeps the suite's time small)")
    case = decode_case(layout, dtype, group, BATCH_SPECS[spec_name])
    truth, lowp = truth_and_lowp(case, layout)
    out = cpu.paged_attention(**case, layout=layout)
    assert out.dtype == dtype and out.shape == truth.shape
    assert_close_to_truth(out, truth, lowp, "default splits")
    for ns in (1, 3):  # other split counts: the same math, another merge order
        assert_close_to_truth(
            cpu.paged_attention(**case, layout=layout, num_splits=ns), truth, lowp, f"{ns} splits"
        )


@pytest.mark.parametrize("spec_name", ["page_edges", "early_tails", "ragged"])
@pytest.mark.parametrize(("layout", "dtype"), INT8_STAGING_CASES[:2], ids=["hd64-bf16", "hd128-fp16"])
def test_decode_int8_staging_tail(layout, dtype, spec_name, cpp_quantizer):
    """The staged tail read from int8 rows: the same bound against fp64 attention over the values
    the cache holds (the reference's decoding of those rows)."""
    spec = BATCH_SPECS[spec_name]
    case = build_decode_case(
        layout, dtype, 3, spec["seq_lens"](layout.page_size), spec.get("early", ()), staging_dtype="int8"
    )
    assert case["staging"].dtype == torch.uint8
    truth, lowp = truth_and_lowp(case, layout)
    assert_close_to_truth(cpu.paged_attention(**case, layout=layout), truth, lowp, "int8 staging")
    model = build_decode_case(layout, dtype, 3, spec["seq_lens"](layout.page_size), spec.get("early", ()))
    if (case["tail_slots"] >= 0).any():  # the tail is read rounded: not what model-dtype staging gives
        rounded = cpu.paged_attention(**case, layout=layout)
        assert not torch.equal(rounded, cpu.paged_attention(**model, layout=layout))


def test_decode_leaves_other_rows_untouched(cpp_quantizer):
    """Rows of prefill chunks and zero-length padding rows are neither read nor written."""
    layout = PageLayout(128, 64)
    dec = build_decode_case(layout, torch.bfloat16, 4, [70, 300, 129], seed=3)
    truth, lowp = truth_and_lowp(dec, layout)
    q_lens = [1, 0, 5, 1, 0, 1, 3]  # sequences 0, 3, 5 decode (they are dec's sequences 0, 1, 2)
    dec_of = {0: 0, 3: 1, 5: 2}
    T, B = sum(q_lens), len(q_lens)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    gen = torch.Generator().manual_seed(4)
    query = torch.randn(T, 8, 128, generator=gen).bfloat16()
    key, value = (
        torch.randn(T, 2, 128, generator=gen).bfloat16(),
        torch.randn(T, 2, 128, generator=gen).bfloat16(),
    )
    tables = torch.zeros(B, dec["block_tables"].shape[1], dtype=torch.int32)
    seq_lens = torch.full((B,), 9999, dtype=torch.int32)  # garbage for the other rows: never read
    tails = torch.full((B,), 12345, dtype=torch.int32)
    for b, d in dec_of.items():
        r = int(qsl[b])
        query[r], key[r], value[r] = dec["query"][d], dec["key"][d], dec["value"][d]
        tables[b], seq_lens[b], tails[b] = dec["block_tables"][d], dec["seq_lens"][d], dec["tail_slots"][d]
    sentinel = torch.full((T, 8, 128), 7.0, dtype=torch.bfloat16)
    out = cpu.paged_attention(
        query, key, value, dec["kv_pages"], dec["staging"], tables, seq_lens, qsl, tails, layout, out=sentinel
    )
    assert out is sentinel
    rows = [int(qsl[b]) for b in dec_of]
    others = [r for r in range(T) if r not in rows]
    assert (out[others] == 7.0).all(), "a non-decode row was written"
    assert_close_to_truth(out[rows], truth, lowp, "mixed batch")


# ----------------------------------------------------------------------------- ISA paths and threads
@pytest.mark.parametrize("isa", loader.ISAS)
def test_isa_paths_agree(isa, monkeypatch, cpp_quantizer):
    if isa not in loader.supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} path (it runs {', '.join(loader.supported_isas())})")
    default = loader.selected_isa()
    gen = torch.Generator().manual_seed(11)
    layout = PageLayout(128, 64, k_outliers=1)
    k, v, fill, sink = page_batch(layout, torch.bfloat16, gen)  # every rule of the encoder
    cases = [
        (PageLayout(128, 64, k_outliers=1), torch.bfloat16, 5, BATCH_SPECS["ragged"], "model"),
        (PageLayout(64, 128), torch.float32, 3, BATCH_SPECS["early_tails"], "model"),
        # int8 tails read back as bf16: each path's own rounding (AVX512-BF16 where the CPU has it)
        (PageLayout(64, 128), torch.bfloat16, 3, BATCH_SPECS["page_edges"], "int8"),
        # rotated values (a second accumulator, rotated back per item)
        (VR.layout(64, 256), torch.bfloat16, 3, BATCH_SPECS["early_tails"], "int8"),
    ]
    built = [
        build_decode_case(
            lay, dt, g, spec["seq_lens"](lay.page_size), spec.get("early", ()), seed=2, staging_dtype=sd
        )
        for lay, dt, g, spec, sd in cases
    ]
    vr = VR.layout(128, 256)
    kv, vv, fill_v, sink_v = page_batch(vr, torch.float16, gen, small=True)
    base_pages = cpu.quantize_pages(k, v, layout, fill=fill, sink=sink)
    base_vr = cpu.quantize_pages(kv, vv, vr, fill=fill_v, sink=sink_v)
    base_out = [cpu.paged_attention(**c, layout=lay) for c, (lay, *_) in zip(built, cases)]
    monkeypatch.setenv(loader.ENV_ISA, isa)
    assert loader.selected_isa() == isa
    assert loader.unavailable_reason(isa) is None
    pages = cpu.quantize_pages(k, v, layout, fill=fill, sink=sink)
    assert torch.equal(pages, base_pages), f"{isa} pages differ from {default}'s"
    vr_pages = cpu.quantize_pages(kv, vv, vr, fill=fill_v, sink=sink_v)
    assert torch.equal(vr_pages, base_vr), f"{isa} rotated-value pages differ from {default}'s"
    for c, (lay, *_), other in zip(built, cases, base_out):
        truth, lowp = truth_and_lowp(c, lay)
        out = cpu.paged_attention(**c, layout=lay)
        assert_close_to_truth(out, truth, lowp, f"{isa}")
        assert_close_to_truth(other, truth, lowp, f"{default}")


def test_isa_forcing_is_checked(monkeypatch):
    monkeypatch.setenv(loader.ENV_ISA, "sse9")
    with pytest.raises(ValueError, match="KIVI_SERVE_CPU_ISA must be auto or one of"):
        loader.selected_isa()
    monkeypatch.setattr(loader, "supported_isas", lambda: ("scalar",))
    monkeypatch.setenv(loader.ENV_ISA, "avx512")
    with pytest.raises(ValueError, match="this CPU cannot run it"):
        loader.selected_isa()


def test_decode_threads_do_not_change_the_verdict(cpp_quantizer):
    layout = PageLayout(64, 128)
    case = decode_case(layout, torch.float32, 3, BATCH_SPECS["ragged"], seed=9)
    truth, lowp = truth_and_lowp(case, layout)
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            assert_close_to_truth(cpu.paged_attention(**case, layout=layout), truth, lowp, f"{n} threads")
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- once per step
META = ("block_tables", "seq_lens", "query_start_loc", "tail_slots")


def fused(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """query, key, value as vLLM hands them to the backend: row-strided views of one fused tensor."""
    T, D = query.shape[0], query.shape[2]
    qkv = torch.cat([query.reshape(T, -1), key.reshape(T, -1), value.reshape(T, -1)], dim=1)
    widths = [query[0].numel(), key[0].numel(), value[0].numel()]
    views = tuple(x.view(T, -1, D) for x in qkv.split(widths, dim=1))
    assert not any(v.is_contiguous() for v in views[1:])
    return views


def batch_of(case: dict, layout: PageLayout, **kw) -> cpu.DecodeBatch:
    return cpu.DecodeBatch(*(case[n] for n in META), layout, case["kv_pages"], case["staging"], **kw)


def layer_args(case: dict, out: torch.Tensor) -> tuple:
    return (case["query"], case["key"], case["value"], case["kv_pages"], case["staging"], None, out)


@pytest.mark.parametrize(
    ("layout", "dtype", "staging_dtype", "spec"),
    [
        (PageLayout(64, 128), torch.bfloat16, "int8", "ragged"),  # SmolLM2's heads, the backend's default
        (PageLayout(64, 128), torch.bfloat16, "int8", "page_edges"),
        (PageLayout(128, 64, k_outliers=1), torch.float32, "model", "early_tails"),
        (PageLayout(128, 64), torch.float16, "model", "tiny"),
        (VR.layout(64, 256), torch.bfloat16, "int8", "early_tails"),  # rotated values
    ],
)
def test_decode_batch_reused_by_layers_equals_one_call(layout, dtype, staging_dtype, spec, cpp_quantizer):
    """One DecodeBatch, three "layers" (each its own query/key/value, two of them row-strided views
    of a fused qkv tensor): every output is exactly paged_attention's on the same inputs, which is
    itself within the bound of fp64 attention."""
    lens, early = BATCH_SPECS[spec]["seq_lens"](layout.page_size), BATCH_SPECS[spec].get("early", ())
    case = build_decode_case(layout, dtype, 3, lens, early, staging_dtype=staging_dtype)
    batch = batch_of(case, layout)
    gen = torch.Generator().manual_seed(5)
    for layer in range(3):
        q, k, v = (case[n] if layer == 0 else torch.randn(case[n].shape, generator=gen).to(dtype)
                   for n in ("query", "key", "value"))  # fmt: skip
        layer_case = {**case, "query": q, "key": k, "value": v}
        want = cpu.paged_attention(**layer_case, layout=layout)
        if layer == 0:
            truth, lowp = truth_and_lowp(case, layout)
            assert_close_to_truth(want, truth, lowp, "one call")
        views = (q, k, v) if layer == 0 else fused(q, k, v)
        out = torch.full_like(q, 7.0)
        assert batch.attend(*views, case["kv_pages"], case["staging"], None, out) is out
        assert torch.equal(out, want), f"layer {layer}: the reused batch differs from a fresh call"


def test_decode_batch_leaves_other_rows_untouched(cpp_quantizer):
    """A mixed step (decode rows among prefill and padding rows, the query longer than the decode
    rows): only the decode rows are written, as by paged_attention."""
    layout = PageLayout(128, 64)
    dec = build_decode_case(layout, torch.bfloat16, 4, [70, 300, 129], seed=3)
    q_lens = [1, 0, 5, 1, 1, 0]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    B, T = len(q_lens), sum(q_lens) + 4  # 4 padding rows after the last sequence
    gen = torch.Generator().manual_seed(4)
    query = torch.randn(T, 8, 128, generator=gen).bfloat16()
    key, value = (torch.randn(T, 2, 128, generator=gen).bfloat16() for _ in range(2))
    tables = torch.zeros(B, dec["block_tables"].shape[1], dtype=torch.int32)
    seq_lens, tails = torch.full((B,), 9999, dtype=torch.int32), torch.full((B,), 12345, dtype=torch.int32)
    for b, d in {0: 0, 3: 1, 4: 2}.items():
        tables[b], seq_lens[b], tails[b] = dec["block_tables"][d], dec["seq_lens"][d], dec["tail_slots"][d]
    batch = cpu.DecodeBatch(tables, seq_lens, qsl, tails, layout, dec["kv_pages"], dec["staging"])
    out = torch.full((T, 8, 128), 7.0, dtype=torch.bfloat16)
    batch.attend(*fused(query, key, value), dec["kv_pages"], dec["staging"], None, out)
    rows = [int(qsl[b]) for b in (0, 3, 4)]
    want = cpu.paged_attention(query[: T - 4], key[: T - 4], value[: T - 4], dec["kv_pages"], dec["staging"],
                               tables, seq_lens, qsl, tails, layout)  # fmt: skip
    assert torch.equal(out[rows], want[rows])
    assert (out[[r for r in range(T) if r not in rows]] == 7.0).all(), "a non-decode row was written"


def _change_block(t):
    t[0, 1] = t[2, 0]  # another sequence's full page: run on, a wrong answer, not a crash


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("block_tables", _change_block),
        ("seq_lens", lambda t: t.add_(1)),  # the next step's lengths, in vLLM's persistent buffer
        ("tail_slots", lambda t: t.copy_(t.flip(0))),
        ("query_start_loc", lambda t: t.__setitem__(1, 0)),
    ],
)
def test_decode_batch_refuses_changed_metadata(name, change, cpp_quantizer):
    layout = PageLayout(64, 128)
    case = build_decode_case(layout, torch.bfloat16, 3, [300, 77, 400], staging_dtype="int8")
    assert (case["tail_slots"] >= 0).all() and (case["tail_slots"] != case["tail_slots"].flip(0)).any()
    batch = batch_of(case, layout)
    before = batch.attend(*layer_args(case, torch.empty_like(case["query"])))
    saved = case[name].clone()
    change(case[name])
    out = torch.full_like(case["query"], 7.0)
    with pytest.raises(cpu.StaleMetadata, match="stale decode metadata"):
        batch.attend(*layer_args(case, out))
    assert (out == 7.0).all(), "a refused call wrote its output"
    case[name].copy_(saved)
    assert torch.equal(batch.attend(*layer_args(case, out)), before)


def _bad_layer_args(case: dict) -> list:
    """(argument, bad value, message) for a batch of `case` (2-bit D=128 P=64, 2 KV heads, 3 rows)."""
    q, k, pages, staging = case["query"], case["key"], case["kv_pages"], case["staging"]
    bf16 = torch.bfloat16
    return [
        ("kv_pages", pages[:-1], "kv_pages must have this batch's shape"),
        ("kv_pages", pages.view(torch.int8), "kv_pages must be uint8"),
        ("staging", staging[:-1], "staging must be this batch's"),
        ("staging", staging.to(torch.float16), "staging must be bfloat16"),
        ("query", q[:2], r"query must have shape \(>= 3, Hq, 128\)"),
        ("query", torch.zeros(3, 7, 128, dtype=bf16), "must be a multiple of KV heads"),
        ("query", torch.zeros(3, 8, 128, dtype=bf16, device="meta"), "query must be on the CPU"),
        ("query", torch.zeros(8, 3, 128, dtype=bf16).transpose(0, 1), "query must be contiguous within each"),
        ("query", torch.zeros(3, 8, 128, dtype=torch.float64), "query must be float32 or bfloat16 or"),
        ("key", k[:, :1], r"key must have shape \(>= 3, 2, 128\)"),
        ("value", case["value"].half(), "value must be bfloat16"),
        ("out", torch.empty(3, 8, 64, dtype=bf16), "out must have shape"),
        ("out", torch.empty(3, 8, 128, dtype=torch.float32), "out must be bfloat16"),
    ]


def test_decode_batch_refuses_layer_tensors_that_do_not_match(cpp_quantizer):
    layout = PageLayout(128, 64)
    case = build_decode_case(layout, torch.bfloat16, 4, [70, 300, 129], seed=3)
    batch = batch_of(case, layout)
    names = ("query", "key", "value", "kv_pages", "staging", "scale", "out")
    for name, bad, match in _bad_layer_args(case):
        args = dict(zip(names, layer_args(case, torch.empty_like(case["query"]))))
        with pytest.raises(ValueError, match=match):
            batch.attend(**{**args, name: bad})
    out = torch.empty_like(case["query"])
    with pytest.raises(ValueError, match="scale must be"):
        batch.attend(*layer_args(case, out)[:5], -1.0, out)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"block_tables": torch.full((2, 2), 3, dtype=torch.int32)}, "block id outside"),
        ({"seq_lens": torch.full((2,), 1000, dtype=torch.int32)}, "sequence length"),
        ({"tail_slots": torch.full((2,), 1, dtype=torch.int32)}, "staging slot outside"),
        ({"query_start_loc": torch.tensor([0, 2, 1], dtype=torch.int32)}, "query_start_loc"),
        ({"block_tables": torch.zeros(2, 2, dtype=torch.int64)}, "block_tables must be int32"),
        ({"seq_lens": torch.ones(3, dtype=torch.int32)}, "seq_lens must have shape"),
        ({"kv_pages": torch.zeros(3, 2, 100, dtype=torch.uint8)}, "kv_pages must be"),
        ({"staging": torch.zeros(1, 2, 2, 32, 128, dtype=torch.bfloat16)}, "staging must have shape"),
    ],
)
def test_decode_batch_checks_its_metadata_once(change, match):
    layout = PageLayout(128, 64)
    args = {**_decode_args(layout), **change}
    with pytest.raises(ValueError, match=match):
        cpu.DecodeBatch(*(args[n] for n in META), layout, args["kv_pages"], args["staging"])


def test_executor_makes_one_batch_per_step(cpp_quantizer):
    """KernelExecutor.decode_step (the backend's call): the step's first layer makes the batch, the
    others reuse it (same result as a fresh call); when the step's metadata is refreshed in place
    (as a captured graph replays one step's metadata over the next step's buffers) the old batch is
    refused by the kernel and a new one made: the result is the fresh call's on the new metadata."""
    layout = PageLayout(64, 128)
    case = build_decode_case(layout, torch.bfloat16, 3, [300, 77, 400], staging_dtype="int8")
    executor = KernelExecutor(QuantCodec(layout), cpu)
    step = SimpleNamespace(num_decodes=3, block_table=case["block_tables"], seq_lens=case["seq_lens"],
                           query_start_loc=case["query_start_loc"], tail_slots=case["tail_slots"],
                           decode_batch=None)  # fmt: skip
    q, k, v = fused(case["query"], case["key"], case["value"])
    outs = []
    for _ in range(2):
        outs.append(torch.empty_like(case["query"]))
        executor.decode_step(step, q, k, v, case["kv_pages"], case["staging"], None, outs[-1])
        if len(outs) == 1:
            first = step.decode_batch
    assert step.decode_batch is first and isinstance(first, cpu.DecodeBatch)
    want = cpu.paged_attention(**case, layout=layout)
    assert torch.equal(outs[0], want) and torch.equal(outs[1], want)
    _change_block(case["block_tables"])  # another valid block: the old batch would read the wrong page
    executor.decode_step(step, q, k, v, case["kv_pages"], case["staging"], None, outs[0])
    assert step.decode_batch is not first
    assert torch.equal(outs[0], cpu.paged_attention(**case, layout=layout))
    assert not torch.equal(outs[0], want)


# ----------------------------------------------------------------------------- bad arguments
def _decode_args(layout: PageLayout) -> dict:
    """Two decode rows of 3 tokens each, read from block 1 (test_kernels_cuda's CPU arguments)."""
    args = _cpu_decode_args(layout)
    args["block_tables"] = torch.ones_like(args["block_tables"])
    args["seq_lens"] = torch.full_like(args["seq_lens"], 3)
    return args


@pytest.mark.parametrize(
    ("change", "match"),
    [
        *BAD_DECODE_ARGS,
        (
            {"query": torch.zeros(2, 8, 128, dtype=torch.float64)},
            "query must be float32 or bfloat16 or float16",
        ),
        ({"staging": torch.zeros(1, 2, 2, 128, 128, dtype=torch.bfloat16)}, "staging must have shape"),
        (
            {"query": torch.zeros(16, 2, 128, dtype=torch.bfloat16).transpose(0, 1)},
            "query must be contiguous",
        ),
        ({"query": torch.zeros(2, 8, 128, dtype=torch.bfloat16, device="meta")}, "query must be on the CPU"),
        ({"block_tables": torch.full((2, 2), 3, dtype=torch.int32)}, "block id outside"),
        ({"block_tables": torch.full((2, 2), -2, dtype=torch.int32)}, "block id outside"),
        ({"seq_lens": torch.zeros(2, dtype=torch.int32)}, "sequence length"),
        ({"seq_lens": torch.full((2,), 1000, dtype=torch.int32)}, "sequence length"),
        ({"tail_slots": torch.full((2,), 1, dtype=torch.int32)}, "staging slot outside"),
        ({"query_start_loc": torch.tensor([0, 2, 1], dtype=torch.int32)}, "query_start_loc"),
    ],
)
def test_decode_rejects_bad_arguments(change, match):
    layout = PageLayout(128, 64)
    with pytest.raises(ValueError, match=match):
        cpu.paged_attention(**{**_decode_args(layout), **change}, layout=layout)


def test_decode_rejects_unsupported_layouts_and_scales():
    args = _decode_args(PageLayout(128, 64))
    with pytest.raises(ValueError, match="reads 2-bit codes"):
        three = PageLayout(128, 64, k_bits=3)
        cpu.paged_attention(
            **{**args, "kv_pages": torch.zeros(3, 2, three.page_bytes, dtype=torch.uint8)}, layout=three
        )
    for scale in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="scale must be"):
            cpu.paged_attention(**args, layout=PageLayout(128, 64), scale=scale)
    with pytest.raises(ValueError, match="layout must be a PageLayout"):
        cpu.paged_attention(**args, layout="128")


def test_append_rejects_bad_arguments():
    (plan, k, _, pages, staging, layout), cases = bad_append_cases("float32 or bfloat16 or float16")
    cases += [
        ((plan, k, k, pages, staging[:, :, :, :32].contiguous(), layout), "staging must have shape"),
        ((plan, k, k, pages, staging, PageLayout(64, 64)), "key: head_dim"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            cpu.append_kv(*args)
    with pytest.raises(ValueError, match="codebook"):
        cpu.append_kv(plan, k, k, pages, staging, layout, codebook="nf4")


@pytest.mark.parametrize(
    ("ops", "match"),
    [
        ({"finalize": PageOps.of([(5, -1, 64, False, 0, 0)])}, "plan.finalize holds a block id outside"),
        ({"finalize": PageOps.of([(1, 7, 64, False, 0, 10)])}, "plan.finalize holds a staging slot outside"),
        ({"finalize": PageOps.of([(1, -1, 64, False, 2, 0)])}, "plan.finalize holds an in-page offset"),
        ({"evict": PageOps.of([(1, 0, 0, False, 0, 0)])}, "plan.evict holds an in-page offset"),
        ({"reopen": PageOps.of([(1, 2, 10, False, 0, 0)])}, "plan.reopen holds a staging slot outside"),
        ({"token_slots": torch.tensor([0, 5, 0], dtype=torch.int32)}, "token_slots / token_offsets"),
        ({"token_offsets": torch.tensor([0, 64, 1], dtype=torch.int32)}, "token_slots / token_offsets"),
    ],
)
def test_append_rejects_out_of_range_plans(ops, match):
    """A plan pointing outside the cache or the pool is refused before anything is written."""
    layout = PageLayout(128, 64)
    base = StagingPool(num_slots=2, page_size=64).plan([[1]], [3], [3])
    empty = PageOps()
    plan = AppendPlan(
        ops.get("token_slots", base.token_slots),
        ops.get("token_offsets", base.token_offsets),
        ops.get("evict", empty),
        ops.get("finalize", empty),
        ops.get("reopen", empty),
        base.tail_slots,
    )
    k = torch.randn(3, 2, 128).bfloat16()
    pages = torch.zeros(2, 2, layout.page_bytes, dtype=torch.uint8)
    staging = torch.zeros(2, 2, 2, 64, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        cpu.append_kv(plan, k, k, pages, staging, layout)
    assert not pages.any() and not staging.any(), "a refused plan wrote something"


# ----------------------------------------------------------------------------- build and fallback
def test_library_is_cached_per_isa_and_sources():
    cxx = loader.find_compiler()
    isa = loader.selected_isa()
    path = loader.library_path(isa, cxx)
    assert path.parent == loader.cache_dir() / "kernels" / "cpu" and path.is_file()
    assert loader.library_path("scalar", cxx) != path or isa == "scalar"
    assert loader.library().kivi_isa().decode() == isa


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """A machine without a C++ compiler (and an empty kernel cache)."""
    monkeypatch.setenv("KIVI_SERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(loader, "find_compiler", lambda: None)
    caches = (loader._failure, loader._load, loader._warn_once)

    def reset():
        for c in caches:
            c.cache_clear()
        loader._by_env.clear()

    reset()
    yield
    reset()


def test_without_a_compiler_the_reference_runs_after_one_warning(no_compiler):
    layout = PageLayout(64, 64)
    gen = torch.Generator().manual_seed(2)
    case = build_decode_case(layout, torch.float32, 2, [10, 70], seed=1)
    pool = StagingPool(num_slots=2, page_size=64)
    plan = pool.plan([[1], [2]], [64, 3], [64, 3])
    k, v = kv_tokens(67, 2, 64, gen)
    pages_ref = torch.zeros(3, 2, layout.page_bytes, dtype=torch.uint8)
    staging_ref = torch.zeros(2, 2, 2, 64, 64)
    pages, staging = pages_ref.clone(), staging_ref.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu.append_kv(plan, k, v, pages, staging, layout)
        out = cpu.paged_attention(**case, layout=layout)
        cpu.paged_attention(**case, layout=layout)
        batch_out = batch_of(case, layout).attend(*layer_args(case, torch.empty_like(case["query"])))
    mine = [w for w in caught if "C++ CPU kernels" in str(w.message)]
    assert len(mine) == 1 and issubclass(mine[0].category, RuntimeWarning)
    assert "no C++ compiler" in str(mine[0].message)
    reference.append_kv(plan, k, v, pages_ref, staging_ref, layout)
    assert torch.equal(pages, pages_ref) and torch.equal(staging, staging_ref)
    assert torch.equal(out, reference.paged_attention(**case, codec=layout))
    assert torch.equal(batch_out, out)
