"""The CUDA kernels against the PyTorch reference (the spec).

GPU tests (``cuda`` marker; skipped without an NVIDIA GPU, and without CuPy). The cases and their
checks live in kernel_cases.py, shared with the same tests emulated on CPU (test_kernels_simt.py):

* quantize-append is bit-exact: every page byte (codes, metadata, codebooks, wide K channels'
  wide_plane / wide_cb / wide_idx, padding) and every staging element, step after step of a real
  StagingPool schedule (prefill chunks, decode, pages filling, pool overflow → early finalisation
  and re-opening), for the default layouts (wide K channels) and others, and dtypes;
* early finalisation with fill < P, directly (fills 1, 2, 3, 17, P - 1, garbage past the fill,
  tied and all-zero channel scales: the wide-channel tie rule and all-zero Lloyd weights);
* dequantize is bit-exact (wide channels read wide_cb with their full code);
* decode attention is within K_TOL times the error that attention in the query dtype itself makes
  against fp64 on the same cached values (FlashAttention-3 style), over named batch specs with
  random block permutations, block 0 as a null block full of garbage, ragged lengths, mid-page
  staging tails, tails finalised early, pages completed by the new token, GQA groups 1..32;
* targeted decode cases: q = 0 gives the mean of V, a query peaked on each page-edge token gives
  that token's value, part_lse / part_o per split match the reference, zero-length (padded)
  query_start_loc entries touch no output row;
* CUDA-graph capture and replay give bit-identical output; eager runs are deterministic;
* the same for 256-token pages and the vr flags (rotated values, free V codebook ends);
* ``compute-sanitizer --tool memcheck`` finds no error on a small case (skipped where it does not
  support the device).

CPU tests (no marker): the wrappers reject bad arguments with a ValueError naming them before
anything needs a GPU, and importing the kernel modules needs no CuPy.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import kernel_cases as kc
import pytest
import torch

from kivi_serve.backend.staging import StagingPool
from kivi_serve.quant.layout import PageLayout

HAS_CUPY = importlib.util.find_spec("cupy") is not None


def gpu(test):
    """Needs an NVIDIA GPU (the ``cuda`` marker; conftest skips it without one) and CuPy."""
    return pytest.mark.cuda(
        pytest.mark.skipif(not HAS_CUPY, reason="needs CuPy (pip install cupy-cuda13x)")(test)
    )


def _dev():
    return torch.device("cuda")


# ----------------------------------------------------------------------------- the shared cases
@gpu
@pytest.mark.parametrize(("layout", "dtype", "codebook"), kc.APPEND_LAYOUTS, ids=kc.APPEND_IDS)
def test_append_is_bit_exact(layout, dtype, codebook):
    kc.check_append_schedule(layout, dtype, codebook, _dev())


@gpu
@pytest.mark.parametrize(("layout", "dtype", "codebook"), kc.APPEND_LAYOUTS[:3], ids=kc.APPEND_IDS[:3])
def test_append_int8_staging_is_bit_exact(layout, dtype, codebook):
    """Int8 staging rows (the backend's default) written, re-opened and read by the page quantizer."""
    kc.check_append_schedule(layout, dtype, codebook, _dev(), staging_dtype="int8")


@gpu
@pytest.mark.parametrize("spec_name", list(kc.BATCH_SPECS))
@pytest.mark.parametrize(("layout", "dtype", "group"), kc.DECODE_CASES[:3], ids=kc.DECODE_IDS[:3])
def test_decode_int8_staging_matches_reference(layout, dtype, group, spec_name):
    kc.check_decode(layout, dtype, group, spec_name, _dev(), staging_dtype="int8")


@gpu
@pytest.mark.parametrize(("layout", "dtype"), kc.EARLY_LAYOUTS, ids=kc.EARLY_IDS)
@pytest.mark.parametrize("codebook", ["fitted", "uniform"])
def test_early_finalisation_is_bit_exact(layout, dtype, codebook):
    kc.check_early_finalisation(layout, dtype, codebook, _dev())


@gpu
@pytest.mark.parametrize(("layout", "dtype"), kc.DEQUANT_CASES, ids=kc.DEQUANT_IDS)
def test_dequantize_is_bit_exact(layout, dtype):
    kc.check_dequantize(layout, dtype, _dev())


@gpu
@pytest.mark.parametrize("spec_name", list(kc.BATCH_SPECS))
@pytest.mark.parametrize(("layout", "dtype", "group"), kc.DECODE_CASES, ids=kc.DECODE_IDS)
def test_decode_matches_reference(layout, dtype, group, spec_name):
    kc.check_decode(layout, dtype, group, spec_name, _dev())


# 256-token pages (kivi-serve-2bit-p256) and the vr flags (rotated values, free V codebook ends): the
# emulated cases (kernel_cases.P256_*) with the batches that reach 256-token pages ("long": 16 pages, the
# vr page only), plus head_dim 256 at page 256 (the decode kernel there needs sm_90's shared memory:
# skipped on smaller GPUs, with the reason). Sized for make gpu-check's 180 s test step: the short
# append schedule (the long one decodes P + 6 steps through the CPU reference).
P256_GPU_DECODE = [
    (lay, dt, g, b)
    for lay, dt, g in list(dict.fromkeys((lay, dt, g) for lay, dt, g, _ in kc.P256_DECODE))
    + [(kc.p256(256), torch.bfloat16, 8), (kc.p256(256, **kc.VR), torch.bfloat16, 16)]
    for b in ("ragged", "early_tails")
] + [(kc.p256(128, **kc.VR), torch.bfloat16, 8, "long")]


@gpu
@pytest.mark.parametrize(("layout", "dtype", "codebook"), kc.P256_APPEND, ids=kc.P256_APPEND_IDS)
def test_append_p256_vr_is_bit_exact(layout, dtype, codebook):
    kc.check_append_schedule(layout, dtype, codebook, _dev(), short=True)


@gpu
@pytest.mark.parametrize(("layout", "dtype"), kc.P256_EARLY, ids=kc.P256_EARLY_IDS)
def test_early_finalisation_p256_vr_is_bit_exact(layout, dtype):
    kc.check_early_finalisation(layout, dtype, "fitted", _dev())


@gpu
@pytest.mark.parametrize(("layout", "dtype"), kc.P256_DEQUANT, ids=kc.P256_DEQUANT_IDS)
def test_dequantize_p256_vr_is_bit_exact(layout, dtype):
    kc.check_dequantize(layout, dtype, _dev())


@gpu
@pytest.mark.parametrize(("layout", "dtype", "group", "spec_name"), P256_GPU_DECODE)
def test_decode_p256_vr_matches_reference(layout, dtype, group, spec_name):
    from kivi_serve.kernels import loader

    spec = loader.KernelSpec.for_layout("decode_attention", layout, dtype, rows16=group > 8)
    arch = loader.device_arch(0)
    if not loader.fits(spec, arch):
        pytest.skip(f"{spec} needs more shared memory than {arch} allows (KernelSpec.check_arch)")
    kc.check_decode(layout, dtype, group, spec_name, _dev())


@gpu
@pytest.mark.parametrize(("layout", "dtype", "group"), kc.TARGETED_DECODE, ids=kc.TARGETED_IDS)
@pytest.mark.parametrize("check", list(kc.TARGETED_CHECKS))
def test_decode_targeted_cases(check, layout, dtype, group):
    kc.TARGETED_CHECKS[check](layout, dtype, group, _dev())


@gpu
@pytest.mark.parametrize(("layout", "dtype", "group"), kc.WINDOW_DECODE, ids=kc.WINDOW_IDS)
def test_decode_window_and_sinks(layout, dtype, group):
    kc.check_decode_window_sinks(layout, dtype, group, _dev())


@gpu
def test_decode_refuses_softcap():
    kc.check_decode_refuses_softcap(PageLayout(64, 64), torch.bfloat16, 2, _dev())


@gpu
def test_decode_graph_replay_is_identical():
    from kivi_serve.kernels import decode_attention

    layout = PageLayout(128, 64)
    case = kc.on(_dev(), kc.build_decode_case(layout, torch.bfloat16, 4, [70, 1000, 129]))
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
    case = kc.on(_dev(), kc.build_decode_case(layout, torch.bfloat16, 4, [1, 65, 130]))
    decode_attention.paged_attention(**case, layout=layout)
    pool = StagingPool(num_slots=2, page_size=64)
    plan = pool.plan([[1, 2], [3]], [70, 5], [70, 5])
    k, v = kc.kv_tokens(75, 2, 128, torch.Generator().manual_seed(0))
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


#: What compute-sanitizer prints where it cannot instrument the device (a GPU or driver it does not
#: support, a container without its driver hooks): CUDA error 999 is CUDA_ERROR_UNKNOWN from cuInit.
SANITIZER_UNSUPPORTED = ("Device not supported", "error 999", "CUDA_ERROR_UNKNOWN", "(999)")


def _sanitizer_unsupported(said: str) -> str | None:
    """The line of compute-sanitizer's output that says it cannot run here, or None."""
    for line in said.splitlines():
        if any(marker.lower() in line.lower() for marker in SANITIZER_UNSUPPORTED):
            return line.strip()
    return None


def test_sanitizer_unsupported_answers_are_recognised():
    assert (
        _sanitizer_unsupported("========= Error: Device not supported\n")
        == "========= Error: Device not supported"
    )
    assert _sanitizer_unsupported("cuInit failed: CUDA_ERROR_UNKNOWN (999)")
    assert _sanitizer_unsupported("========= Internal Sanitizer Error: error 999") is not None
    assert (
        _sanitizer_unsupported("========= ERROR SUMMARY: 1 error\nInvalid __global__ read of size 4") is None
    )


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
    said = run.stdout + run.stderr
    unsupported = _sanitizer_unsupported(said)
    if unsupported:
        pytest.skip(f"compute-sanitizer does not support this device here (it answered {unsupported!r})")
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
        *kc.BAD_DECODE_ARGS,
        ({"query": torch.zeros(2, 8, 128)}, "query must be float16 or bfloat16"),
        ({"staging": torch.zeros(1, 2, 2, 32, 128, dtype=torch.bfloat16)}, "staging must have shape"),
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

    for layout in (PageLayout(128, 64), PageLayout(128, 64, wide_channels=8, k_outliers=1), PageLayout(64)):
        with pytest.raises(ValueError, match="must be on a CUDA device"):
            decode_attention.paged_attention(**_cpu_decode_args(layout), layout=layout)


def test_decode_wrapper_rejects_unsupported_layouts():
    from kivi_serve.kernels import decode_attention

    for layout, match in (
        (PageLayout(128, 64, k_bits=3), "layout: the decode kernel reads 2-bit"),
        (PageLayout(128, 256, v_bits=3), "layout: the decode kernel reads 2-bit"),
    ):
        with pytest.raises(ValueError, match=match):
            decode_attention.paged_attention(**_cpu_decode_args(layout), layout=layout)


def test_quantize_refuses_rotated_values_at_head_dim_256_page_256():
    """No GPU gives a block the 256 KiB the quantizer's fp32 rotated tile needs there: refused by name."""
    from kivi_serve.kernels import loader

    layout = PageLayout(256, 256, wide_channels=112, v_rotate=True, v_pin_ends=False)
    msg = r"layout: rotated values at head_dim 256 x page 256 need 269.8 KiB .*more than any GPU allows"
    with pytest.raises(ValueError, match=msg):
        loader.spec_for("quantize_append", layout, torch.bfloat16)
    assert loader.spec_for("decode_attention", layout, torch.bfloat16).v_rotate


def test_append_wrapper_rejects_bad_arguments():
    from kivi_serve.kernels import quantize_append

    good, cases = kc.bad_append_cases("float16 or bfloat16")
    cases.append((good, "must be on a CUDA device"))
    plan, k, _, pages, staging, layout = good
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


@pytest.mark.skipif(not HAS_CUPY, reason="needs CuPy (pip install cupy-cuda13x)")
def test_launch_stream_wraps_torch_handle_without_deprecation_warning():
    """Launches go on torch's stream through ``cupy.cuda.Stream.from_external`` (CuPy 14 deprecates
    ``ExternalStream``: every launch would warn); building the wrapper needs no GPU."""
    import warnings

    from kivi_serve.kernels import loader

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stream = loader.cupy_stream(0x1234)
    assert stream.ptr == 0x1234
