"""The CUDA kernels emulated on CPU (marker ``simt``): the same ``cuda/*.cu`` source nvcc compiles,
built with g++ and the SIMT runtime of tests/simt, launched through the real Python wrappers on
CPU tensors (``loader.emulate()``). Nothing here is a GPU result.

* the cases of tests/test_kernels_cuda.py (kernel_cases.py: one list for both), at small shapes:
  quantize-append bit-exact along a StagingPool schedule with early finalisation and re-opening,
  early finalisation with fills 1, 2, 3, 17, P - 1 and tied / all-zero scales, dequantize bit-exact,
  decode within K_TOL for head_dim 64/128/256, pages 64/128, GQA groups 1..32 (16-row tiles at D=256
  too), ragged lengths, staging tails, the null block 0 full of garbage;
* decode cases aimed at single failure modes: q = 0 (the mean of V), a query peaked on each
  page-edge token, the partial results (part_lse, part_o) per split, zero-length (padded)
  query_start_loc entries;
* the checking modes: a race check (shadow state on shared memory) and AddressSanitizer, each clean
  on small cases and each shown to catch a planted bug;
* the runtime itself (tests/simt/selftest.cu): warp collectives, the mma.sync fragment layouts
  against a matmul, cp.async poison, divergent barriers and deadlocks reported as errors, faults,
  time limit, and CuPy-style argument checks.

Skipped only where no C++20 compiler or no CUDA headers exist (simt.unavailable_reason()).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kernel_cases as kc
import numpy as np
import pytest
import torch

from kivi_serve.kernels import loader
from kivi_serve.kernels.loader import KernelSpec
from kivi_serve.quant.layout import PageLayout
from tests.support import simt

REASON = simt.unavailable_reason()
pytestmark = [pytest.mark.simt, pytest.mark.skipif(REASON is not None, reason=f"SIMT emulation: {REASON}")]
SELFTEST = Path(__file__).parent / "simt" / "selftest.cu"
#: The configuration the race and AddressSanitizer modes check (the Llama-3.1-8B shape of the kernels).
CHECKED_LAYOUT = PageLayout(128, 64)
#: Race-checked too: the default page, whose 8-row tiles make a whole page's scores before one softmax step.
RACE_DECODE_LAYOUT = PageLayout(128, 128)
#: 16-row tiles at D=256 (a group of 16): the warp pair of decode_attention.cu (kPair), race-checked
PAIR_LAYOUT = PageLayout(256, 64)
#: The vr flags' new shared-memory exchanges, race-checked: the quantizer's in-place rotation of the V
#: tile (rotate_tile, at page 256), the decode merge's rotation back (unrotate_rows; 8-row tiles) and the
#: warp pair's rotated exact values (kPair).
VR_RACE_LAYOUT = kc.p256(64, **kc.VR)
VR_RACE_DECODE = PageLayout(64, 64, **kc.VR)
VR_PAIR_LAYOUT = PageLayout(256, 64, **kc.VR)
SELFTEST_KERNELS = (
    "st_collectives",
    "st_mma_bf16",
    "st_mma_f16",
    "st_movmatrix",
    "st_divergent_barrier",
    "st_deadlock",
    "st_cp_async",
    "st_smem_write",
    "st_smem_read",
    "st_store",
    "st_trap",
    "st_spin",
    "st_race",
    "st_args",
)


#: Int8 staging rows (KIVI_STAGING=1, kivi_serve/quant/staging.py): a subset of the cases above.
INT8_APPEND = kc.APPEND_LAYOUTS[:2]
INT8_DECODE = [kc.DECODE_CASES[0], kc.DECODE_CASES[2]]
#: 16-row tiles at D=256: the register-bound path that makes its fragments and wide-channel LUTs per chunk
#: (decode_attention.cu, kFoldPerWord) and splits O's channels across the CTA's two warps (kPair: pages in
#: lockstep, a shared running max, P exchanged through shared memory; "ragged" gives warp 1 no page on the
#: last step of odd page counts), alone and with K outliers (the outlier pass over wide channels).
ROWS16_D256 = [
    (PageLayout(256, 128), torch.bfloat16, 16, "ragged"),
    (PageLayout(256, 64, k_outliers=1), torch.float16, 12, "page_edges"),
]


def _specs() -> set[tuple[KernelSpec, str]]:
    """Every (kernel configuration, mode) this module builds."""
    out = set()
    for lay, dt, _ in kc.APPEND_LAYOUTS:
        out.add((KernelSpec.for_layout("quantize_append", lay, dt), "plain"))
    for lay, dt in kc.EARLY_LAYOUTS + kc.DEQUANT_CASES:
        out.add((KernelSpec.for_layout("quantize_append", lay, dt), "plain"))
    for lay, dt, g in kc.DECODE_CASES + kc.TARGETED_DECODE + kc.WINDOW_DECODE:
        out.add((KernelSpec.for_layout("decode_attention", lay, dt, rows16=g > 8), "plain"))
    for lay, dt, _ in INT8_APPEND:
        out.add((KernelSpec.for_layout("quantize_append", lay, dt, staging=1), "plain"))
    for lay, dt, _g, _ in ROWS16_D256:
        out.add((KernelSpec.for_layout("decode_attention", lay, dt, rows16=True), "plain"))
    for lay, dt, g in INT8_DECODE:
        out.add((KernelSpec.for_layout("decode_attention", lay, dt, rows16=g > 8, staging=1), "plain"))
    for lay, dt, _ in kc.P256_APPEND:
        out.add((KernelSpec.for_layout("quantize_append", lay, dt), "plain"))
    for lay, dt in kc.P256_EARLY + kc.P256_DEQUANT:
        out.add((KernelSpec.for_layout("quantize_append", lay, dt), "plain"))
    for lay, dt, g, _ in kc.P256_DECODE:
        out.add((KernelSpec.for_layout("decode_attention", lay, dt, rows16=g > 8), "plain"))
    out.add((KernelSpec.for_layout("quantize_append", VR_RACE_LAYOUT, torch.bfloat16), "race"))
    for lay, g in ((VR_RACE_DECODE, 4), (VR_PAIR_LAYOUT, 16)):
        out.add((KernelSpec.for_layout("decode_attention", lay, torch.bfloat16, rows16=g > 8), "race"))
    for source in loader.SOURCES:
        for mode in ("race", "asan"):
            out.add((KernelSpec.for_layout(source, CHECKED_LAYOUT, torch.bfloat16), mode))
    out.add((KernelSpec.for_layout("decode_attention", RACE_DECODE_LAYOUT, torch.bfloat16), "race"))
    out.add((KernelSpec.for_layout("decode_attention", PAIR_LAYOUT, torch.bfloat16, rows16=True), "race"))
    return out


@pytest.fixture(scope="module", autouse=True)
def built():
    """Compile everything once, two at a time (cached by source hash: a re-run takes no compiler).
    KIVI_SERVE_SIMT_LAZY=1 (scripts/mutate_kernels.py) builds on first use instead."""
    if os.environ.get("KIVI_SERVE_SIMT_LAZY"):
        return
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(simt.build, spec, mode) for spec, mode in _specs()]
        jobs.append(pool.submit(simt.build_source, SELFTEST, SELFTEST_KERNELS))
        for mode in ("race", "asan"):
            jobs.append(pool.submit(simt.build_source, SELFTEST, SELFTEST_KERNELS, (), mode))
        for job in jobs:
            job.result()


@pytest.fixture
def emulated():
    with loader.emulate("plain"):
        yield torch.device("cpu")


CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- quantize-append
@pytest.mark.parametrize(("layout", "dtype", "codebook"), kc.APPEND_LAYOUTS, ids=kc.APPEND_IDS)
def test_append_schedule_is_bit_exact_emulated_on_cpu(emulated, layout, dtype, codebook):
    kc.check_append_schedule(layout, dtype, codebook, emulated, short=True)


@pytest.mark.parametrize(("layout", "dtype", "codebook"), INT8_APPEND, ids=kc.APPEND_IDS[:2])
def test_append_schedule_int8_staging_is_bit_exact_emulated_on_cpu(emulated, layout, dtype, codebook):
    """Int8 staging rows written (warp per row), re-opened pages encoded, pages quantized from the
    staged rows: every page byte and staging byte as the reference's."""
    kc.check_append_schedule(layout, dtype, codebook, emulated, short=True, staging_dtype="int8")


@pytest.mark.parametrize(("layout", "dtype"), kc.EARLY_LAYOUTS, ids=kc.EARLY_IDS)
@pytest.mark.parametrize("codebook", ["fitted", "uniform"])
def test_early_finalisation_is_bit_exact_emulated_on_cpu(emulated, layout, dtype, codebook):
    kc.check_early_finalisation(layout, dtype, codebook, emulated)


@pytest.mark.parametrize(("layout", "dtype"), kc.DEQUANT_CASES, ids=kc.DEQUANT_IDS)
def test_dequantize_is_bit_exact_emulated_on_cpu(emulated, layout, dtype):
    kc.check_dequantize(layout, dtype, emulated)


# ----------------------------------------------------------------------------- 256-token pages, vr flags
@pytest.mark.parametrize(("layout", "dtype", "codebook"), kc.P256_APPEND, ids=kc.P256_APPEND_IDS)
def test_append_schedule_p256_vr_is_bit_exact_emulated_on_cpu(emulated, layout, dtype, codebook):
    """256-token pages and the vr flags (rotated values, free V codebook ends) along a StagingPool
    schedule: every page byte (rotation, unpinned Lloyd-Max fit) and staging byte as the reference's."""
    kc.check_append_schedule(layout, dtype, codebook, emulated, short=True)


@pytest.mark.parametrize(("layout", "dtype"), kc.P256_EARLY, ids=kc.P256_EARLY_IDS)
def test_early_finalisation_p256_vr_is_bit_exact_emulated_on_cpu(emulated, layout, dtype):
    kc.check_early_finalisation(layout, dtype, "fitted", emulated)


@pytest.mark.parametrize(("layout", "dtype"), kc.P256_DEQUANT, ids=kc.P256_DEQUANT_IDS)
def test_dequantize_p256_vr_is_bit_exact_emulated_on_cpu(emulated, layout, dtype):
    kc.check_dequantize(layout, dtype, emulated)


@pytest.mark.parametrize(("layout", "dtype", "group", "spec_name"), kc.P256_DECODE, ids=kc.P256_DECODE_IDS)
def test_decode_p256_vr_matches_reference_emulated_on_cpu(emulated, layout, dtype, group, spec_name):
    """Within K_TOL of fp64 attention over what the cache holds (values rotated back by the reference)."""
    kc.check_decode(layout, dtype, group, spec_name, emulated)


def test_race_check_is_clean_on_the_vr_kernels_emulated_on_cpu():
    """Race mode on the vr flags' exchanges: the quantizer's in-place V rotation (early finalisation:
    fills 1 .. P), the decode merge rotated back (8-row tiles), the warp pair's rotated exact values
    (D = 256, 16 rows)."""
    with loader.emulate("race"):
        kc.check_early_finalisation(VR_RACE_LAYOUT, torch.bfloat16, "fitted", CPU)
        kc.check_decode_part_lse(VR_RACE_DECODE, torch.bfloat16, 4, CPU)
        kc.check_decode_part_lse(VR_PAIR_LAYOUT, torch.bfloat16, 16, CPU)


# ----------------------------------------------------------------------------- decode attention
@pytest.mark.parametrize("spec_name", kc.EMULATED_BATCHES)
@pytest.mark.parametrize(("layout", "dtype", "group"), kc.DECODE_CASES, ids=kc.DECODE_IDS)
def test_decode_matches_reference_emulated_on_cpu(emulated, layout, dtype, group, spec_name):
    kc.check_decode(layout, dtype, group, spec_name, emulated)


@pytest.mark.parametrize(
    ("layout", "dtype", "group", "spec_name"),
    ROWS16_D256,
    ids=[f"{kc.layout_id(c[0])}-g{c[2]}" for c in ROWS16_D256],
)
def test_decode_rows16_head_dim_256_emulated_on_cpu(emulated, layout, dtype, group, spec_name):
    kc.check_decode(layout, dtype, group, spec_name, emulated)


@pytest.mark.parametrize("spec_name", ["page_edges", "early_tails"])
@pytest.mark.parametrize(
    ("layout", "dtype", "group"), INT8_DECODE, ids=[kc.DECODE_IDS[0], kc.DECODE_IDS[2]]
)
def test_decode_int8_staging_tail_emulated_on_cpu(emulated, layout, dtype, group, spec_name):
    """The staged tail read from int8 rows, against fp64 attention over what the cache holds."""
    kc.check_decode(layout, dtype, group, spec_name, emulated, staging_dtype="int8")


@pytest.mark.parametrize(("layout", "dtype", "group"), kc.TARGETED_DECODE, ids=kc.TARGETED_IDS)
@pytest.mark.parametrize("check", list(kc.TARGETED_CHECKS))
def test_decode_targeted_cases_emulated_on_cpu(emulated, check, layout, dtype, group):
    """q = 0 (mean of V), a query peaked on page-edge tokens, part_lse per split, padded rows."""
    kc.TARGETED_CHECKS[check](layout, dtype, group, emulated)


@pytest.mark.parametrize(("layout", "dtype", "group"), kc.WINDOW_DECODE, ids=kc.WINDOW_IDS)
def test_decode_window_and_sinks_emulated_on_cpu(emulated, layout, dtype, group):
    """Sliding window (edges on and next to page boundaries, inside the tail, smaller than a page,
    the pages before it not read) and sink logits with GQA, against an fp64 truth (issue 15)."""
    kc.check_decode_window_sinks(layout, dtype, group, emulated)


def test_decode_refuses_softcap_emulated_on_cpu(emulated):
    kc.check_decode_refuses_softcap(PageLayout(64, 64), torch.bfloat16, 2, emulated)


def test_decode_fp16_large_q_k_range_keeps_the_pages_emulated_on_cpu(emulated):
    """An fp16 model whose q * k_scale is far above fp16's 65504: the MMA's A operand saturates.
    Rounded to inf instead, a zero codebook entry makes the page's scores NaN, and the split's
    partial is then reported empty (part_lse -inf) — the cached pages silently drop out of the
    softmax. Checked: every sequence's page split keeps a finite log-sum-exp, the output is finite
    and a convex combination of the values. (Not checked: accuracy — fp16 cannot hold q * k_scale
    here, so the saturated scores are off; a per-page power-of-two scale of q' would fix that.)"""
    from kivi_serve.kernels import decode_attention

    layout, dtype, group = PageLayout(64, 128), torch.float16, 12

    def wide_keys(n, H, D, gen):
        return torch.randn(n, H, D, generator=gen) * 300, torch.randn(n, H, D, generator=gen)

    seq_lens = [3, 130, 300]  # no page (staging only), one page, two pages
    case = kc.build_decode_case(layout, dtype, group, seq_lens, seed=3, kv=wide_keys)
    gen = torch.Generator().manual_seed(1)
    case["query"] = (torch.randn(case["query"].shape, generator=gen) * 200).to(dtype)
    B, Hq, D = case["query"].shape
    part_o, part_lse = decode_attention.make_workspace(B, Hq, D, 1, emulated)
    out = decode_attention.paged_attention(
        **kc.on(emulated, case), layout=layout, num_splits=1, workspace=(part_o, part_lse)
    ).double()
    lse = part_lse[: B * Hq * 2].reshape(B, Hq, 2)
    for b in range(B):
        k, v = kc.cached_kv(case, layout, b)
        qk_range = case["query"][b].abs().max().item() * (k.amax(0) - k.amin(0)).max().item()
        assert qk_range > 10 * 65504, "test setup: q * k_scale does not overflow fp16"
        if seq_lens[b] > layout.page_size:
            assert torch.isfinite(lse[b, :, 0]).all(), f"sequence {b}: the pages' partial was dropped"
        else:
            assert torch.isneginf(lse[b, :, 0]).all()
        assert torch.isfinite(out[b]).all(), f"sequence {b}: non-finite output"
        assert (out[b].abs() <= v.abs().max() * 1.01).all(), f"sequence {b}: output outside the values' range"


# ----------------------------------------------------------------------------- checking modes
def test_race_check_is_clean_on_the_kernels_emulated_on_cpu():
    """Race mode (shared-memory shadow state): the append schedule (evict, finalize from a slot and
    from an early-finalised block, reopen, writes) and decode (cp.async ring, corrections, merge)."""
    with loader.emulate("race"):
        kc.check_append_schedule(CHECKED_LAYOUT, torch.bfloat16, "fitted", CPU, short=True)
        kc.check_decode_zero_length_rows(CHECKED_LAYOUT, torch.bfloat16, 4, CPU)
        kc.check_decode_part_lse(CHECKED_LAYOUT, torch.bfloat16, 4, CPU)
        kc.check_decode_part_lse(RACE_DECODE_LAYOUT, torch.bfloat16, 8, CPU)
        # 16-row tiles at D=256: the warp pair's exchange words and each other's ring slots (kPair), with
        # page-less steps (splits of one or two pages) and ring slots refilled (1000 tokens: 15 pages)
        kc.check_decode_part_lse(PAIR_LAYOUT, torch.bfloat16, 16, CPU)
        kc.check_decode(PAIR_LAYOUT, torch.bfloat16, 16, "ragged", CPU)


def _planted(tmp_path: Path, source: str, snippet: str, replacement: str) -> Path:
    """A copy of cuda/ with one snippet of ``source`` replaced (a planted bug)."""
    dst = tmp_path / "cuda"
    shutil.copytree(loader.CUDA_DIR, dst)
    path = dst / f"{source}.cu"
    text = path.read_text()
    assert text.count(snippet) == 1, f"planted bug: {snippet!r} is not (uniquely) in {source}.cu any more"
    path.write_text(text.replace(snippet, replacement))
    return dst


@pytest.mark.parametrize(
    ("source", "snippet", "replacement", "check"),
    [
        # every thread reads tile rows other threads loaded: the barrier at the end of load_tile
        (
            "quantize_append",
            "    }\n  }\n  __syncthreads();\n}\n\n// Quantize one page",
            "    }\n  }\n}\n\n// Quantize one page",
            "append",
        ),
        # rotated values (vr): warps read V tile rows that other warps' rotated rows overwrite in place
        # (rotate_tile): the barrier between a batch's reads and its writes
        (
            "quantize_append",
            "    hadamard_row(x, lane);\n    __syncthreads();\n",
            "    hadamard_row(x, lane);\n",
            "append-vr",
        ),
        # lanes read the cp.async ring that other lanes filled: the __syncwarp after wait_group
        (
            "decode_attention",
            "    cp_async_wait<kStages - 1>();\n    if (kPair) __syncthreads(); else __syncwarp();\n",
            "    cp_async_wait<kStages - 1>();\n",
            "decode",
        ),
        # a warp pair (16 rows, D=256) reads the partner's ring slot: the barrier after each page, before
        # the partner refills that slot
        (
            "decode_attention",
            "    if (kPair) __syncthreads(); else __syncwarp();\n  }\n  cp_async_wait<0>();",
            "    __syncwarp();\n  }\n  cp_async_wait<0>();",
            "decode-pair",
        ),
    ],
    ids=[
        "quantize-load_tile-__syncthreads",
        "quantize-rotate_tile-__syncthreads",
        "decode-ring-__syncwarp",
        "decode-pair-page-__syncthreads",
    ],
)
def test_race_check_catches_a_missing_barrier_emulated_on_cpu(tmp_path, source, snippet, replacement, check):
    cuda = _planted(tmp_path, source, snippet, replacement)
    pair = check == "decode-pair"
    layout = PAIR_LAYOUT if pair else (VR_RACE_LAYOUT if check == "append-vr" else CHECKED_LAYOUT)
    spec = KernelSpec.for_layout(source, layout, torch.bfloat16, **({"rows16": True} if pair else {}))
    simt.build(spec, "race", cuda)
    caught = "data race|cp.async into it is in flight|no thread of this block wrote"
    with loader.emulate("race", cuda), pytest.raises(simt.SimtError, match=caught):
        if check.startswith("append"):
            kc.check_early_finalisation(layout, torch.bfloat16, "fitted", CPU)
        elif pair:
            kc.check_decode(layout, torch.bfloat16, 16, "ragged", CPU)  # a warp streams several pages
        else:
            kc.check_decode_part_lse(layout, torch.bfloat16, 4, CPU)


def test_race_check_on_the_runtime_emulated_on_cpu():
    st = simt.load_source(SELFTEST, SELFTEST_KERNELS, (), "race")
    out = torch.zeros(64, dtype=torch.int32)
    for sync in (1, 2):  # __syncthreads, __syncwarp: clean, right values
        st["st_race"]((1,), (64,), (np.int32(sync), loader.ptr(out)))
        t = torch.arange(64)
        assert torch.equal(out, (((t & ~31) | ((t + 1) & 31)) * 3).int())
    with pytest.raises(simt.SimtError, match="data race|no thread of this block wrote"):
        st["st_race"]((1,), (64,), (np.int32(0), loader.ptr(out)))
    with pytest.raises(simt.SimtError, match="in flight"):  # reading a cp.async destination early
        src = torch.randn(32, 4)
        st["st_cp_async"]((1,), (32,), (loader.ptr(src), loader.ptr(torch.zeros(64))), shared_mem=512)


_ASAN_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import kernel_cases as kc
from kivi_serve.kernels import loader
from tests.support import simt
from kivi_serve.quant.layout import PageLayout
layout, cpu = PageLayout(128, 64), torch.device("cpu")
with loader.emulate("asan"):
    {body}
print("ASAN-CASE-DONE")
"""
_ASAN_BODIES = {
    "clean": (
        "kc.check_early_finalisation(layout, torch.bfloat16, 'fitted', cpu)\n"
        "    kc.check_decode_zero_length_rows(layout, torch.bfloat16, 4, cpu)"
    ),
    # a block table entry one past the last block: the decode kernel reads past kv_pages
    "global": (
        "from kivi_serve.kernels import decode_attention\n"
        "    case = kc.build_decode_case(layout, torch.bfloat16, 4, [70, 130])\n"
        "    case['block_tables'][1, 1] = case['kv_pages'].shape[0]\n"
        "    decode_attention.paged_attention(**case, layout=layout)"
    ),
    # reading one byte past the launch's dynamic shared memory
    "shared": (
        "st = simt.load_source(simt.RUNTIME_DIR / 'selftest.cu', {kernels!r}, (), 'asan')\n"
        "    out = torch.zeros(1, dtype=torch.int32)\n"
        "    st['st_smem_read']((1,), (32,), (__import__('numpy').int32(96), loader.ptr(out)), shared_mem=96)"
    ),
}


def _run_asan(body: str) -> subprocess.CompletedProcess:
    code = _ASAN_SCRIPT.format(tests=str(Path(__file__).parent), body=body.format(kernels=SELFTEST_KERNELS))
    env = simt.sanitizer_env()
    env["PYTHONPATH"] = os.pathsep.join([str(loader.CUDA_DIR.parent)] + sys.path)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def test_asan_is_clean_on_the_kernels_emulated_on_cpu():
    run = _run_asan(_ASAN_BODIES["clean"])
    assert run.returncode == 0 and "ASAN-CASE-DONE" in run.stdout, run.stdout[-3000:] + run.stderr[-6000:]


@pytest.mark.parametrize("where", ["global", "shared"])
def test_asan_catches_out_of_bounds_emulated_on_cpu(where):
    run = _run_asan(_ASAN_BODIES[where])
    assert run.returncode != 0 and "ASAN-CASE-DONE" not in run.stdout
    assert "ERROR: AddressSanitizer" in run.stderr, run.stderr[-6000:]
    # past the end of kv_pages: its redzone, or whatever freed block lies beyond it
    kinds = ("heap-buffer-overflow", "heap-use-after-free") if where == "global" else ("use-after-poison",)
    assert any(f"AddressSanitizer: {k}" in run.stderr for k in kinds), run.stderr[-6000:]
    assert ("kivi_decode" if where == "global" else "st_smem_read") in run.stderr, run.stderr[-6000:]


# ----------------------------------------------------------------------------- the runtime
@pytest.fixture(scope="module")
def st():
    return simt.load_source(SELFTEST, SELFTEST_KERNELS)


def test_warp_collectives_emulated_on_cpu(st):
    out = torch.zeros(64, 4, dtype=torch.int32)
    st["st_collectives"]((1,), (64,), (loader.ptr(out),))
    tid = torch.arange(64)
    lane, base = tid % 32, tid - tid % 32
    assert torch.equal(out[:, 0], ((base + (lane ^ 5)) * 10).int())
    assert torch.equal(out[:, 1], (base + (lane * 7) % 32).int())
    peers = torch.tensor([sum(1 << m for m in range(32) if m // 3 == n // 3) for n in range(32)] * 2)
    assert torch.equal(out[:, 2].long() & 0xFFFFFFFF, peers)
    ballot = sum(1 << m for m in range(32) if m % 3 == 0)
    assert (out[:, 3].long() & 0xFFFFFFFF == ballot).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_fragments_match_a_matmul_emulated_on_cpu(st, dtype):
    """mma.sync m16n8k16 (kivi_ptx.cuh, from the PTX ISA tables) driven by lanes that gather their
    fragments with CuTe's layouts (selftest.cu): D = A B + C up to fp32 rounding."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(16, 16, generator=gen).to(dtype)
    Bt = torch.randn(8, 16, generator=gen).to(dtype)
    C = torch.randn(16, 8, generator=gen)
    D = torch.full((16, 8), float("nan"))
    name = "st_mma_bf16" if dtype == torch.bfloat16 else "st_mma_f16"
    st[name]((1,), (32,), (loader.ptr(A), loader.ptr(Bt), loader.ptr(C), loader.ptr(D)))
    want = A.double() @ Bt.double().T + C.double()
    scale = (A.double().abs() @ Bt.double().abs().T + C.double().abs()).max().item()
    assert (D.double() - want).abs().max().item() <= 1e-6 * scale
    # and a fragment mapping that is off by one lane would not pass: every element matters
    assert (want - want.roll(1, 0)).abs().max().item() > 1e-3 * scale


def test_movmatrix_transposes_emulated_on_cpu(st):
    """movmatrix.m8n8.trans.b16 (kivi_ptx.cuh) on fragments gathered with CuTe's C layout
    (selftest.cu): the transpose, every element in its place."""
    m = torch.randperm(64, generator=torch.Generator().manual_seed(0)).to(torch.int16).reshape(8, 8) * 37
    out = torch.zeros(8, 8, dtype=torch.int16)
    st["st_movmatrix"]((1,), (32,), (loader.ptr(m), loader.ptr(out)))
    assert torch.equal(out, m.T.contiguous())


def test_cp_async_lands_at_wait_group_emulated_on_cpu(st):
    src = torch.randn(32, 4)
    out = torch.zeros(32, 2)
    st["st_cp_async"]((1,), (32,), (loader.ptr(src), loader.ptr(out)), shared_mem=512)
    assert torch.isnan(out[:, 0]).all(), "a read before wait_group must see the poison"
    assert torch.equal(out[:, 1], src[:, 0])


@pytest.mark.parametrize(
    ("kernel", "threads", "args", "match"),
    [
        ("st_divergent_barrier", 64, (np.int32(0),), r"divergent __syncthreads: .*selftest.cu:\d+"),
        (
            "st_divergent_barrier",
            64,
            (np.int32(1),),
            r"returned.*divergent barrier|after \d+ thread\(s\).*returned",
        ),
        # one warp: lane 0 at the barrier, lanes 1-31 in a shuffle that needs lane 0
        (
            "st_deadlock",
            32,
            (),
            r"deadlock .*threads 0 wait in __syncthreads at selftest.cu:\d+; threads 1-31 "
            r"wait in __shfl_xor_sync \(mask 0xffffffff\) at selftest.cu:\d+",
        ),
        # two warps: warp 1 returns while thread 0 waits at the barrier; which of the two the
        # runtime sees first depends on the scheduling seed, so either report is right
        (
            "st_deadlock",
            64,
            (),
            r"returned while 1 thread\(s\) wait at __syncthreads"
            r"|__syncthreads at selftest.cu:\d+ after 1 thread\(s\) of the block returned",
        ),
    ],
    ids=["two-barriers", "early-return", "deadlock", "return-at-barrier"],
)
def test_divergence_is_an_error_not_a_hang_emulated_on_cpu(st, kernel, threads, args, match):
    out = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(simt.SimtError, match=match):
        st[kernel]((2,), (threads,), (*args, loader.ptr(out)))


def test_faults_and_time_limit_are_errors_emulated_on_cpu(st, monkeypatch):
    with pytest.raises(simt.SimtError, match=r"st_smem_write.*past the launch's 64 bytes"):
        st["st_smem_write"]((1,), (32,), (np.int32(64),), shared_mem=64)
    st["st_smem_write"]((1,), (32,), (np.int32(63),), shared_mem=64)  # in bounds: fine
    with pytest.raises(simt.SimtError, match=r"SIGSEGV at address"):
        st["st_store"]((1,), (32,), (np.uint64(0),))
    with pytest.raises(simt.SimtError, match=r"__trap\(\) at selftest.cu"):
        st["st_trap"]((3,), (32,), ())
    monkeypatch.setenv("KIVI_SERVE_SIMT_TIMEOUT", "1")
    flag = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(simt.SimtError, match="ran for more than 1 s"):
        st["st_spin"]((1,), (32,), (loader.ptr(flag),))
    # the process is fine afterwards
    out = torch.zeros(64, 4, dtype=torch.int32)
    st["st_collectives"]((1,), (64,), (loader.ptr(out),))
    assert out[:, 3].ne(0).all()


def test_launch_arguments_are_checked_like_a_gpu_emulated_on_cpu(st):
    p = torch.tensor([5], dtype=torch.int32)
    out = torch.zeros(1, dtype=torch.float64)
    good = (
        np.int32(1),
        np.int64(2),
        np.float32(0.5),
        np.float64(0.25),
        np.uint32(3),
        loader.ptr(p),
        loader.ptr(out),
    )
    st["st_args"]((1,), (32,), good)
    assert out.item() == 1 + 2 + 0.5 + 0.25 + 3 + 5
    with pytest.raises(TypeError, match="argument 1 is a long long: pass np.int64, got int32"):
        st["st_args"]((1,), (32,), (good[0], np.int32(2), *good[2:]))
    with pytest.raises(TypeError, match="argument 0 is a int: pass np.int32, got int"):
        st["st_args"]((1,), (32,), (1, *good[1:]))
    with pytest.raises(TypeError, match="takes 7 arguments, got 6"):
        st["st_args"]((1,), (32,), good[:6])
    with pytest.raises(simt.SimtError, match="exceed the kernel's limit of 49152"):
        st["st_smem_write"]((1,), (32,), (np.int32(0),), shared_mem=64 * 1024)
    with pytest.raises(simt.SimtError, match="at most 1024 threads"):
        st["st_store"]((1,), (2048,), (loader.ptr(p),))
    with pytest.raises(ValueError, match="grid must be"):
        st["st_store"]((0,), (32,), (loader.ptr(p),))


def test_wrappers_need_emulation_for_cpu_tensors():
    """Outside loader.emulate() a CPU tensor is an error, as before."""
    from kivi_serve.kernels import quantize_append

    layout = CHECKED_LAYOUT
    pages = torch.zeros(2, layout.page_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        quantize_append.dequantize_pages(pages, layout)
    with loader.emulate():
        k, v = quantize_append.dequantize_pages(pages, layout)
    assert k.shape == (2, layout.page_size, layout.head_dim) and loader.emulation_mode() is None
    with pytest.raises(ValueError, match="emulation mode"):
        with loader.emulate("valgrind"):
            pass
