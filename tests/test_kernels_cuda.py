"""The CUDA kernels against the PyTorch reference (the spec).

GPU tests (``cuda`` marker; skipped without an NVIDIA GPU, and without CuPy):

* quantize-append is bit-exact: every page byte (codes, metadata, codebooks, wide K channels'
  khi_plane / khi_cb / khi_idx, padding) and every staging element, step after step of a real
  StagingPool schedule (prefill chunks, decode, pages filling, pool overflow → early finalisation
  and re-opening), for the default layouts (wide K channels) and others, and dtypes;
* early finalisation with fill < P, directly (fills 1, 2, 3, 17, P - 1, garbage past the fill,
  tied and all-zero channel scales: the wide-channel tie rule and all-zero Lloyd weights);
* dequantize is bit-exact (wide channels read khi_cb with their full code);
* decode attention is within K_TOL times the error that attention in the query dtype itself makes
  against fp64 on the same cached values (FlashAttention-3 style), over named batch specs with
  random block permutations, block 0 as a null block full of garbage, ragged lengths, mid-page
  staging tails, tails finalised early, pages completed by the new token, GQA groups 1..32;
* CUDA-graph capture and replay give bit-identical output; eager runs are deterministic;
* ``compute-sanitizer --tool memcheck`` finds no error on a small case.

CPU tests (no marker): the wrappers reject bad arguments with a ValueError naming them before
anything needs a GPU, and importing the kernel modules needs no CuPy.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kivi_serve.backend.staging import StagingPool
from kivi_serve.kernels import reference
from kivi_serve.quant import page
from kivi_serve.quant.layout import PageLayout

HAS_CUPY = importlib.util.find_spec("cupy") is not None


def gpu(test):
    """Needs an NVIDIA GPU (the ``cuda`` marker; conftest skips it without one) and CuPy."""
    return pytest.mark.cuda(
        pytest.mark.skipif(not HAS_CUPY, reason="needs CuPy (pip install cupy-cuda13x)")(test)
    )


#: Kernel error bound, in multiples of the query-dtype attention's own error vs fp64. The kernel
#: rounds q * k_scale and p * v_scale to the query dtype where a plain low-precision attention
#: rounds k and v, so its error is of the same order; 4x leaves room, not luck.
K_TOL = 4.0


def _dev():
    return torch.device("cuda")


# ----------------------------------------------------------------------------- data
def kv_tokens(n: int, H: int, D: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values with LLM-like structure: channel offsets, a few outlier channels, a massive token."""
    k = torch.randn(n, H, D, generator=gen) + torch.randn(1, H, D, generator=gen) * 2
    k[:, :, :: max(1, D // 8)] *= 6.0  # outlier channels
    v = torch.randn(n, H, D, generator=gen)
    if n > 3:
        k[n // 3] *= 8.0  # an outlier token
    return k, v


# ----------------------------------------------------------------------------- quantize-append
APPEND_LAYOUTS = [
    # the default page format (24 / 12 / 48 wide K channels)
    (PageLayout(128, 64), torch.bfloat16, "fitted"),
    (PageLayout(64, 128), torch.float16, "fitted"),
    (PageLayout(256, 128), torch.bfloat16, "fitted"),
    # 3-bit keys with 4-bit wide channels, together with K outliers
    (PageLayout(64, 128, k_bits=3, v_bits=2, k_outliers=1, k_hi_channels=8), torch.float16, "fitted"),
    # no wide channels: the first format (K outliers), and 4-bit codes
    (PageLayout(128, 64, k_outliers=1, k_hi_channels=0), torch.bfloat16, "fitted"),
    (PageLayout(256, 64, k_bits=4, v_bits=4, exact_tokens=0, k_outliers=0), torch.bfloat16, "fitted"),
    (PageLayout(128, 128, exact_tokens=1, k_outliers=0), torch.float16, "uniform"),
]


def _schedule(P: int) -> list[list[tuple[int, int]]]:
    """Steps of (sequence, new tokens): prefill chunks, then decode with one sequence left out in
    turn, so that a 3-slot pool must evict and later re-open pages."""
    steps = [[(0, P + P // 2), (1, P), (2, 5)], [(3, 2 * P + 3), (0, 1)]]
    for i in range(P + 6):
        steps.append([(s, 1) for s in range(4) if s != i % 4])
    return steps


def _layout_id(layout: PageLayout) -> str:
    return (
        f"d{layout.head_dim}p{layout.page_size}k{layout.k_bits}v{layout.v_bits}"
        f"x{layout.exact_tokens}o{layout.k_outliers}h{layout.k_hi_channels}"
    )


@gpu
@pytest.mark.parametrize(
    ("layout", "dtype", "codebook"),
    APPEND_LAYOUTS,
    ids=[f"{_layout_id(lay)}-{str(dt)[6:]}-{cb}" for lay, dt, cb in APPEND_LAYOUTS],
)
def test_append_is_bit_exact(layout, dtype, codebook):
    from kivi_serve.kernels import quantize_append

    gen = torch.Generator().manual_seed(0)
    H, D, P = 2, layout.head_dim, layout.page_size
    n_seqs, max_pages = 4, 8
    NB = 1 + n_seqs * max_pages
    perm = (1 + torch.randperm(NB - 1, generator=gen)).tolist()  # block 0 stays the null block
    tables = [perm[s * max_pages : (s + 1) * max_pages] for s in range(n_seqs)]
    pool = StagingPool(num_slots=3, page_size=P)
    pages_ref = torch.randint(0, 256, (NB, H, layout.page_bytes), dtype=torch.uint8, generator=gen)
    staging_ref = torch.zeros(3, 2, H, P, D, dtype=dtype)
    pages_gpu, staging_gpu = pages_ref.to(_dev()), staging_ref.to(_dev())
    lens = [0] * n_seqs
    for step, work in enumerate(_schedule(P)):
        seqs = [s for s, _ in work]
        q_lens = [n for _, n in work]
        for s, n in work:
            lens[s] += n
        plan = pool.plan([tables[s] for s in seqs], [lens[s] for s in seqs], q_lens)
        k, v = kv_tokens(sum(q_lens), H, D, gen)
        k, v = k.to(dtype), v.to(dtype)
        reference.append_kv(plan, k, v, pages_ref, staging_ref, layout, codebook)
        quantize_append.append_kv(
            plan.to(_dev()), k.to(_dev()), v.to(_dev()), pages_gpu, staging_gpu, layout, codebook
        )
        torch.cuda.synchronize()
        _assert_pages_equal(pages_gpu.cpu(), pages_ref, layout, f"step {step}")
        assert torch.equal(staging_gpu.cpu(), staging_ref), f"step {step}: staging differs"
    assert pool.stats.early_finalisations > 0 and pool.stats.reopened > 0, (
        "schedule did not exercise evict/reopen"
    )


def _assert_pages_equal(got: torch.Tensor, want: torch.Tensor, layout: PageLayout, where: str) -> None:
    if torch.equal(got, want):
        return
    bad = (got != want).any(-1).nonzero().tolist()
    b, h = bad[0]
    diffs = [
        name
        for name, s in layout.sections.items()
        if not torch.equal(
            got[b, h, s.offset : s.offset + s.nbytes], want[b, h, s.offset : s.offset + s.nbytes]
        )
    ]
    raise AssertionError(
        f"{where}: {len(bad)} pages differ; first block {b} head {h}, sections {diffs or ['padding']}"
    )


EARLY_LAYOUTS = [
    (PageLayout(128, 64), torch.bfloat16),
    (PageLayout(64, 128), torch.float16),
    (PageLayout(256, 128), torch.float16),
    (PageLayout(128, 128, k_bits=3, k_outliers=1, k_hi_channels=24), torch.bfloat16),
    (PageLayout(64, 64, k_outliers=1, k_hi_channels=0), torch.bfloat16),
]


@gpu
@pytest.mark.parametrize(
    ("layout", "dtype"), EARLY_LAYOUTS, ids=[f"{_layout_id(lay)}-{str(dt)[6:]}" for lay, dt in EARLY_LAYOUTS]
)
@pytest.mark.parametrize("codebook", ["fitted", "uniform"])
def test_early_finalisation_is_bit_exact(layout, dtype, codebook):
    """Evict ops alone (pages quantized from staging with fill <= P), against the reference."""
    from kivi_serve.backend.staging import AppendPlan, PageOps
    from kivi_serve.kernels import quantize_append

    gen = torch.Generator().manual_seed(3)
    H, D, P = 2, layout.head_dim, layout.page_size
    fills = [P, 1, 2, 3, 17, P - 1, P, P // 2 + 5]
    sinks = [False, True, False, False, True, False, False, False]
    n = len(fills)
    staging = (torch.randn(n, 2, H, P, D, generator=gen) * 50).to(dtype)  # garbage past each fill
    for i, f in enumerate(fills):
        k, v = kv_tokens(f, H, D, gen)
        staging[i, 0, :, :f] = k.transpose(0, 1).to(dtype)
        staging[i, 1, :, :f] = v.transpose(0, 1).to(dtype)
    # equal scales across the wide/narrow boundary (ties go to the lower channel): one column
    # repeated over every channel; and a page of constants (every scale 0: all Lloyd weights 0).
    staging[6, 0, 0, :P] = staging[6, 0, 0, :P, :1]
    staging[6, 0, 1, :P] = 0.5
    staging[7, 0, :, : fills[7], 1::2] = staging[7, 0, :, : fills[7], 0::2]  # pairs of equal channels
    blocks = (1 + torch.randperm(n, generator=gen)).tolist()
    evict = PageOps.of([(blocks[i], i, fills[i], sinks[i], 0, 0) for i in range(n)])
    empty = torch.zeros(0, dtype=torch.int32)
    plan = AppendPlan(empty, empty, evict, PageOps(), PageOps(), empty)
    pages_ref = torch.randint(0, 256, (n + 1, H, layout.page_bytes), dtype=torch.uint8, generator=gen)
    pages_gpu = pages_ref.to(_dev())
    staging_gpu = staging.to(_dev())
    none = torch.zeros(0, H, D, dtype=dtype)
    reference.append_kv(plan, none, none, pages_ref, staging.clone(), layout, codebook)
    quantize_append.append_kv(
        plan.to(_dev()), none.to(_dev()), none.to(_dev()), pages_gpu, staging_gpu, layout, codebook
    )
    torch.cuda.synchronize()
    _assert_pages_equal(pages_gpu.cpu(), pages_ref, layout, "evict")
    assert torch.equal(staging_gpu.cpu(), staging), "evict must not write staging"
    if layout.k_hi_channels:  # the wide channels are really in use: some wide codes use their top bit
        top = layout.raw(pages_ref[1:].reshape(n * H, -1), "khi_plane")
        assert top.any()
        # the repeated-column page: every scale ties, so the wide channels are 0 .. H-1
        idx = layout.view(pages_ref[blocks[6], 0:1], "khi_idx")[0].long()
        assert idx.tolist() == list(range(layout.k_hi_channels))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_is_bit_exact(dtype):
    from kivi_serve.kernels import quantize_append

    gen = torch.Generator().manual_seed(1)
    for layout in (
        PageLayout(128, 64),
        PageLayout(256, 128),
        PageLayout(64, 128, k_bits=4, v_bits=3, exact_tokens=0),
        PageLayout(64, 128, k_bits=3, k_outliers=1, k_hi_channels=8),
    ):
        k, v = kv_tokens(6 * layout.page_size, 1, layout.head_dim, gen)
        k = k.reshape(6, layout.page_size, layout.head_dim)
        v = v.reshape(6, layout.page_size, layout.head_dim)
        fill = torch.tensor([layout.page_size, 1, 3, layout.page_size, 17, layout.page_size])
        sink = torch.tensor([True, False, False, False, True, False])
        pages = page.quantize_pages(k, v, layout, fill=fill, sink=sink)
        kr, vr = page.dequantize_pages(pages, layout)
        kg, vg = quantize_append.dequantize_pages(pages.to(_dev()), layout, dtype)
        assert torch.equal(kg.cpu(), kr.to(dtype)) and torch.equal(vg.cpu(), vr.to(dtype))


# ----------------------------------------------------------------------------- decode attention
#: Named decode batches: each sequence's length including its new token; `early` sequences have
#: their partial last page finalised early (read quantized, tail_slot -1).
BATCH_SPECS = {
    "tiny": {"seq_lens": [1, 2, 3]},
    "page_edges": {"seq_lens": [63, 64, 65, 127, 128, 129]},
    "ragged": {"seq_lens": [5, 200, 64 * 7 + 11, 1000, 1]},
    "early_tails": {"seq_lens": [100, 300, 77], "early": [0, 2]},
    "long": {"seq_lens": [4096 + 17]},
}
DECODE_CASES = [
    (PageLayout(128, 64), torch.bfloat16, 4),  # Llama-3.1-8B per KV head, 24 wide K channels
    (PageLayout(128, 64), torch.float16, 1),
    (PageLayout(64, 128), torch.bfloat16, 12),  # rows16 tile, 12 wide channels
    (PageLayout(256, 64, exact_tokens=0, k_outliers=0), torch.float16, 8),  # 48 wide channels
    (PageLayout(128, 128, exact_tokens=1, k_outliers=0), torch.bfloat16, 32),  # two 16-row tiles
    (PageLayout(128, 64, k_outliers=1), torch.bfloat16, 4),  # wide channels and K outliers together
    (PageLayout(128, 64, k_outliers=1, k_hi_channels=0), torch.float16, 4),  # the first format
    (PageLayout(64, 64, exact_tokens=0, k_hi_channels=0), torch.bfloat16, 16),  # plain 2-bit
]


def build_decode_case(
    layout: PageLayout, dtype, group: int, seq_lens: list[int], early=(), H: int = 2, seed: int = 0
):
    """Cache state after this step's append, on the CPU: pages quantized by the reference, tails in
    staging, random block placement, block 0 and unused slots full of garbage."""
    gen = torch.Generator().manual_seed(seed)
    P, D = layout.page_size, layout.head_dim
    B = len(seq_lens)
    max_pages = max(1, max(-(-n // P) for n in seq_lens))
    NB = 1 + B * max_pages
    perm = (1 + torch.randperm(NB - 1, generator=gen)).tolist()
    pages = torch.randint(0, 256, (NB, H, layout.page_bytes), dtype=torch.uint8, generator=gen)
    staging = torch.randn(B + 1, 2, H, P, D, generator=gen).to(dtype) * 100  # garbage in unused rows
    block_tables = torch.zeros(B, max_pages, dtype=torch.int32)
    tail_slots = torch.full((B,), -1, dtype=torch.int32)
    key = torch.empty(B, H, D, dtype=dtype)
    value = torch.empty(B, H, D, dtype=dtype)
    for b, n in enumerate(seq_lens):
        k, v = kv_tokens(n, H, D, gen)
        k, v = k.to(dtype), v.to(dtype)
        key[b], value[b] = k[-1], v[-1]
        for i in range(-(-n // P)):
            blk = perm[b * max_pages + i]
            block_tables[b, i] = blk
            lo, hi = i * P, min(n, (i + 1) * P)
            full = hi - lo == P
            if full or b in early:
                kp = torch.zeros(P, H, D, dtype=dtype)
                vp = torch.zeros(P, H, D, dtype=dtype)
                kp[: hi - lo], vp[: hi - lo] = k[lo:hi], v[lo:hi]
                q = page.quantize_pages(
                    kp.transpose(0, 1),
                    vp.transpose(0, 1),
                    layout,
                    fill=torch.full((H,), hi - lo),
                    sink=torch.full((H,), i == 0),
                )
                pages[blk] = q
            else:
                tail_slots[b] = b + 1
                staging[b + 1, 0, :, : hi - lo] = k[lo:hi].transpose(0, 1)
                staging[b + 1, 1, :, : hi - lo] = v[lo:hi].transpose(0, 1)
    query = (torch.randn(B, H * group, D, generator=gen) * 2).to(dtype)
    return {
        "query": query,
        "key": key,
        "value": value,
        "kv_pages": pages,
        "staging": staging,
        "block_tables": block_tables,
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
        "query_start_loc": torch.arange(B + 1, dtype=torch.int32),
        "tail_slots": tail_slots,
    }


def attention_truth_and_lowp(case: dict, layout: PageLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 attention over the cached values, and the same computed in the query dtype on the GPU."""
    q = case["query"]
    B, Hq, D = q.shape
    H = case["key"].shape[1]
    G = Hq // H
    truth = torch.empty(B, Hq, D, dtype=torch.float64)
    lowp = torch.empty(B, Hq, D, dtype=q.dtype)
    scale = D**-0.5
    for b in range(B):
        n = int(case["seq_lens"][b])
        ck, cv = reference.gather_context(
            reference.pages_view(case["kv_pages"], layout),
            case["staging"],
            case["block_tables"][b],
            n - 1,
            n,
            int(case["tail_slots"][b]),
            layout,
        )
        k = torch.cat([ck, case["key"][b : b + 1].float()])  # (n, H, D)
        v = torch.cat([cv, case["value"][b : b + 1].float()])
        qb = q[b].reshape(H, G, D)
        s = torch.einsum("hgd,shd->hgs", qb.double(), k.double()) * scale
        truth[b] = torch.einsum("hgs,shd->hgd", s.softmax(-1), v.double()).reshape(Hq, D)
        qd, kd, vd = qb.to(_dev()), k.to(q.dtype).to(_dev()), v.to(q.dtype).to(_dev())
        sl = torch.einsum("hgd,shd->hgs", qd, kd) * scale
        p = sl.float().softmax(-1).to(q.dtype)
        lowp[b] = torch.einsum("hgs,shd->hgd", p, vd).reshape(Hq, D).cpu()
    return truth, lowp


def _on_gpu(case: dict) -> dict:
    return {k: v.to(_dev()) for k, v in case.items()}


@gpu
@pytest.mark.parametrize("spec_name", list(BATCH_SPECS))
@pytest.mark.parametrize(
    ("layout", "dtype", "group"),
    DECODE_CASES,
    ids=[f"{_layout_id(lay)}-{str(dt)[6:]}-g{g}" for lay, dt, g in DECODE_CASES],
)
def test_decode_matches_reference(layout, dtype, group, spec_name):
    from kivi_serve.kernels import decode_attention

    spec = BATCH_SPECS[spec_name]
    case = build_decode_case(layout, dtype, group, spec["seq_lens"], spec.get("early", ()))
    truth, lowp = attention_truth_and_lowp(case, layout)
    g = _on_gpu(case)
    out = decode_attention.paged_attention(**g, layout=layout).cpu()
    assert out.dtype == dtype and out.shape == truth.shape
    err_lowp = (lowp.double() - truth).abs().max().item()
    err = (out.double() - truth).abs().max().item()
    assert math.isfinite(err), "non-finite output"
    assert err <= K_TOL * err_lowp + 1e-6, (
        f"kernel error {err:.3e} > {K_TOL} x {err_lowp:.3e} ({dtype} attention's own)"
    )
    # Same cached values as the spec: the reference agrees with fp64 too (sanity of the harness).
    ref = reference.paged_attention(**case, layout=layout)
    assert (ref.double() - truth).abs().max().item() <= K_TOL * err_lowp + 1e-6
    # Other split counts: same math, different merge order.
    for ns in (1, 3):
        other = decode_attention.paged_attention(**g, layout=layout, num_splits=ns).cpu()
        assert (other.double() - truth).abs().max().item() <= K_TOL * err_lowp + 1e-6


@gpu
def test_decode_graph_replay_is_identical():
    from kivi_serve.kernels import decode_attention

    layout = PageLayout(128, 64)
    case = _on_gpu(build_decode_case(layout, torch.bfloat16, 4, [70, 1000, 129]))
    B, Hq, D = case["query"].shape
    splits = decode_attention.choose_num_splits(
        B, 2, 4, case["block_tables"].shape[1], torch.cuda.get_device_properties(0).multi_processor_count
    )
    ws = decode_attention.make_workspace(B, Hq, D, splits, _dev())
    out = torch.empty(B, Hq, D, dtype=torch.bfloat16, device=_dev())
    eager = decode_attention.paged_attention(**case, layout=layout, num_splits=splits).clone()
    again = decode_attention.paged_attention(**case, layout=layout, num_splits=splits)
    assert torch.equal(eager, again), "eager runs differ: the kernel is not deterministic"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch recommends before capture
        decode_attention.paged_attention(**case, layout=layout, out=out, workspace=ws, num_splits=splits)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention.paged_attention(**case, layout=layout, out=out, workspace=ws, num_splits=splits)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def small_case_for_sanitizer() -> None:
    """A small append + decode, run under compute-sanitizer by the test below."""
    from kivi_serve.kernels import decode_attention, quantize_append

    layout = PageLayout(128, 64)
    case = _on_gpu(build_decode_case(layout, torch.bfloat16, 4, [1, 65, 130]))
    decode_attention.paged_attention(**case, layout=layout)
    pool = StagingPool(num_slots=2, page_size=64)
    plan = pool.plan([[1, 2], [3]], [70, 5], [70, 5])
    k, v = kv_tokens(75, 2, 128, torch.Generator().manual_seed(0))
    pages = torch.zeros(4, 2, layout.page_bytes, dtype=torch.uint8, device=_dev())
    staging = torch.zeros(2, 2, 2, 64, 128, dtype=torch.bfloat16, device=_dev())
    quantize_append.append_kv(
        plan.to(_dev()), k.to(_dev(), torch.bfloat16), v.to(_dev(), torch.bfloat16), pages, staging, layout
    )
    torch.cuda.synchronize()


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if not found and root and (Path(root) / "bin" / "compute-sanitizer").is_file():
            found = str(Path(root) / "bin" / "compute-sanitizer")
    return found


@gpu
def test_memcheck_is_clean():
    tool = _sanitizer()
    if tool is None:
        pytest.skip("compute-sanitizer is not installed (CUDA toolkit)")
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import test_kernels_cuda as t; t.small_case_for_sanitizer()"
    )
    run = subprocess.run(
        [tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "ERROR SUMMARY: 0 errors" in run.stdout + run.stderr


# ----------------------------------------------------------------------------- CPU: argument checks
def _cpu_decode_args(layout: PageLayout, dtype=torch.bfloat16) -> dict:
    B, H, G, D, P = 2, 2, 4, layout.head_dim, layout.page_size
    return {
        "query": torch.zeros(B, H * G, D, dtype=dtype),
        "key": torch.zeros(B, H, D, dtype=dtype),
        "value": torch.zeros(B, H, D, dtype=dtype),
        "kv_pages": torch.zeros(3, H, layout.page_bytes, dtype=torch.uint8),
        "staging": torch.zeros(1, 2, H, P, D, dtype=dtype),
        "block_tables": torch.zeros(B, 2, dtype=torch.int32),
        "seq_lens": torch.ones(B, dtype=torch.int32),
        "query_start_loc": torch.arange(B + 1, dtype=torch.int32),
        "tail_slots": torch.full((B,), -1, dtype=torch.int32),
    }


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"query": torch.zeros(2, 8, 128)}, "query must be float16 or bfloat16"),
        ({"query": torch.zeros(2, 8, 64, dtype=torch.bfloat16)}, "query: head_dim"),
        ({"key": torch.zeros(3, 2, 128, dtype=torch.bfloat16)}, "key must have shape"),
        ({"value": torch.zeros(2, 2, 128, dtype=torch.float16)}, "value must be bfloat16"),
        ({"staging": torch.zeros(1, 2, 2, 32, 128, dtype=torch.bfloat16)}, "staging must have shape"),
        ({"kv_pages": torch.zeros(3, 2, 100, dtype=torch.uint8)}, "kv_pages must be"),
        ({"block_tables": torch.zeros(2, 2, dtype=torch.int64)}, "block_tables must be int32"),
        ({"seq_lens": torch.ones(3, dtype=torch.int32)}, "seq_lens must have shape"),
        ({"query_start_loc": torch.arange(2, dtype=torch.int32)}, "query_start_loc must have shape"),
        ({"query": torch.zeros(2, 16, 128, dtype=torch.bfloat16).transpose(0, 1)}, "query"),
        ({}, "must be on a CUDA device"),
    ],
)
def test_decode_wrapper_rejects_bad_arguments(change, match):
    from kivi_serve.kernels import decode_attention

    layout = PageLayout(128, 64)
    args = {**_cpu_decode_args(layout), **change}
    with pytest.raises(ValueError, match=match):
        decode_attention.paged_attention(**args, layout=layout)


def test_decode_wrapper_accepts_wide_channel_layouts():
    """Any wide-channel count of a 2-bit layout is a supported configuration (it fails only for the CPU)."""
    from kivi_serve.kernels import decode_attention

    for layout in (PageLayout(128, 64), PageLayout(128, 64, k_hi_channels=8, k_outliers=1), PageLayout(64)):
        with pytest.raises(ValueError, match="must be on a CUDA device"):
            decode_attention.paged_attention(**_cpu_decode_args(layout), layout=layout)


def test_decode_wrapper_rejects_unsupported_layouts():
    from kivi_serve.kernels import decode_attention

    for layout, match in (
        (PageLayout(128, 64, k_bits=3), "layout: the decode kernel reads 2-bit"),
        (PageLayout(128, 256), "layout: page_size"),
    ):
        with pytest.raises(ValueError, match=match):
            decode_attention.paged_attention(**_cpu_decode_args(layout), layout=layout)


def test_append_wrapper_rejects_bad_arguments():
    from kivi_serve.kernels import quantize_append

    layout = PageLayout(128, 64)
    pool = StagingPool(num_slots=2, page_size=64)
    plan = pool.plan([[1]], [3], [3])
    k = torch.zeros(3, 2, 128, dtype=torch.bfloat16)
    pages = torch.zeros(2, 2, layout.page_bytes, dtype=torch.uint8)
    staging = torch.zeros(2, 2, 2, 64, 128, dtype=torch.bfloat16)
    cases = [
        ((plan, k.float(), k, pages, staging, layout), "key must be float16 or bfloat16"),
        ((plan, k, k[:2], pages, staging, layout), "value must have shape"),
        ((plan, k, k, pages, staging.half(), layout), "staging must be bfloat16"),
        ((plan, k, k, pages[:, :1].contiguous(), staging, layout), "kv_pages has 1 KV heads"),
        ((plan, k[:2], k[:2], pages, staging, layout), "plan.token_slots must have shape"),
        ((plan, k, k, pages, staging, layout), "must be on a CUDA device"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            quantize_append.append_kv(*args)
    with pytest.raises(ValueError, match="codebook"):
        quantize_append.append_kv(plan, k, k, pages, staging, layout, codebook="nf4")


def test_kernel_modules_import_without_cupy():
    code = (
        "import sys; sys.modules['cupy'] = None; "
        "import kivi_serve.kernels.loader, kivi_serve.kernels.decode_attention, "
        "kivi_serve.kernels.quantize_append"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
