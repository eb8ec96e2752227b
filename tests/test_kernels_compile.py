"""The CUDA kernels compile to cubins for sm_80 and sm_90a — on CI, without a GPU.

A representative set of configurations (the default page format — wide K channels — at every
head_dim, the Llama-3.1-8B decode shape, both page sizes, both dtypes, 2/3/4-bit codes, with and
without exact token, K outliers and wide channels) is compiled through the same loader path the
server uses (``loader.compile_cubin``, on-disk cache: a re-run takes seconds). Skipped only when
neither nvcc nor NVRTC (+ the CUDA headers) is installed.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from kivi_serve.kernels import loader
from kivi_serve.kernels.loader import KernelSpec
from kivi_serve.quant.layout import PageLayout
from tests.support import simt

BACKENDS = loader.available_backends()
pytestmark = pytest.mark.skipif(
    not BACKENDS,
    reason="neither nvcc nor NVRTC with the CUDA headers is installed (see kivi_serve/kernels/loader.py)",
)

ARCHS = ("sm_80", "sm_90a")
#: The default page format (PageLayout(d): P = 128, 2-bit, exact token, 3 * d / 16 wide K channels)
#: and the default staging (int8 rows, ``staging=1``); the other configurations stage in the model dtype.
DEFAULT_SPECS = [
    KernelSpec.for_layout(
        source, PageLayout(d), "bfloat16", rows16=source == "decode_attention" and d != 128, staging=1
    )
    for d in (64, 128, 256)
    for source in loader.SOURCES
]
SPECS = DEFAULT_SPECS + [
    # Llama-3.1-8B: GQA 4, hd 128, page 64, 24 wide channels
    KernelSpec("decode_attention", 128, 64, dtype="bfloat16"),
    # no wide channels
    KernelSpec("decode_attention", 64, 128, dtype="float16", exact_tokens=0, wide_channels=0),
    # wide channels and K outliers together
    KernelSpec("decode_attention", 256, 128, dtype="float16", k_outliers=1),
    # the first page format: K outliers, no wide channels
    KernelSpec("quantize_append", 128, 64, dtype="float16", k_outliers=1, wide_channels=0),
    KernelSpec(
        "quantize_append", 64, 128, k_bits=3, v_bits=4, dtype="float16", exact_tokens=0, wide_channels=0
    ),
    # 3-bit keys with 4-bit wide channels (16-level wide codebook) and K outliers
    KernelSpec("quantize_append", 128, 128, k_bits=3, dtype="bfloat16", k_outliers=1, wide_channels=8),
    KernelSpec("quantize_append", 256, 128, k_bits=4, v_bits=2, dtype="bfloat16", k_outliers=1),
]
#: 256-token pages: kivi-serve-2bit-p256 (7D/16 wide K channels) at every head_dim, both kernels (the decode
#: kernel at D = 256 needs sm_90: refused for sm_80), and -p256-vr (values rotated, V codebook ends free;
#: the quantizer at D = 256 refused: its fp32 rotated tile needs 256 KiB), with int8 staging.
VR = {"v_rotate": True, "v_pin_ends": False}
P256_SPECS = [
    KernelSpec.for_layout(
        source,
        PageLayout(d, 256, wide_channels=7 * d // 16, **flags),
        "bfloat16",
        rows16=bool(rows16),
        staging=1,
    )
    for d in (64, 128, 256)
    for flags in ({}, VR)
    for source, rows16 in (("quantize_append", 0), ("decode_attention", 0), ("decode_attention", 1))
    if not (source == "quantize_append" and flags and d == 256)
] + [
    # the vr flags at the default page, and each alone
    KernelSpec.for_layout("quantize_append", PageLayout(256, 128, **VR), "float16"),
    KernelSpec.for_layout("decode_attention", PageLayout(128, 64, v_rotate=True), "float16"),
    KernelSpec.for_layout("quantize_append", PageLayout(64, 64, v_pin_ends=False), "bfloat16"),
]
SPECS += P256_SPECS


def _id(spec: KernelSpec) -> str:
    extra = ("-rows16" if spec.rows16 else "") + ("-int8staging" if spec.staging else "")
    extra += ("-rot" if spec.v_rotate else "") + ("" if spec.v_pin_ends else "-free")
    return (
        f"{spec.source}-d{spec.head_dim}-p{spec.page_size}-k{spec.k_bits}v{spec.v_bits}"
        f"-x{spec.exact_tokens}o{spec.k_outliers}h{spec.wide_channels}-{spec.dtype}{extra}"
    )


@pytest.fixture(scope="module")
def cubins():
    """Compile every (spec, arch) that fits once, two at a time (CI has two cores)."""
    work = [(s, a) for a in ARCHS for s in SPECS if loader.fits(s, a)]
    paths = loader.precompile(ARCHS, SPECS, jobs=2)
    return dict(zip(work, paths))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_kernel_compiles_to_cubin(cubins, spec, arch):
    if not loader.fits(spec, arch):  # refused before compiling, with the reason
        assert (spec.source, spec.head_dim, spec.page_size, arch) == ("decode_attention", 256, 256, "sm_80")
        with pytest.raises(ValueError, match="shared memory a block may use on sm_80: use sm_90"):
            loader.compile_cubin(spec, arch)
        return
    data = cubins[(spec, arch)].read_bytes()
    assert data[:4] == b"\x7fELF", "not a cubin"
    for name in loader.KERNELS[spec.source]:
        assert name.encode() in data, f"{name} missing from the cubin"


@pytest.mark.skipif(
    "nvrtc" not in BACKENDS, reason="NVRTC (cupy + nvidia-cuda-nvrtc + CUDA headers) not installed"
)
def test_nvrtc_backend_compiles_too():
    for source in loader.SOURCES:
        path = loader.compile_cubin(KernelSpec(source, 64, 64, dtype="float16"), "sm_90a", backend="nvrtc")
        assert path.read_bytes()[:4] == b"\x7fELF"


def test_specs_cover_wide_channels():
    assert [s.wide_channels for s in DEFAULT_SPECS] == [12, 12, 24, 24, 48, 48]
    assert any(s.wide_channels == 0 for s in SPECS)
    for spec in SPECS:
        assert f"-DKIVI_HI={spec.wide_channels}" in spec.defines()


def test_specs_follow_the_layout():
    for layout in (
        PageLayout(128),
        PageLayout(64, 64, wide_channels=0, k_outliers=1),
        PageLayout(256, 64, k_bits=3),
    ):
        spec = KernelSpec.for_layout("quantize_append", layout, "float16")
        assert (spec.k_outliers, spec.wide_channels) == (layout.k_outliers, layout.wide_channels)
    # the default spec is the default page format
    assert KernelSpec("decode_attention", 128, 128) == KernelSpec.for_layout(
        "decode_attention", PageLayout(128), "bfloat16"
    )
    assert all(
        s.wide_channels == (7 if s.page_size == 256 else 3) * s.head_dim // 16 and s.k_outliers == 0
        for s in loader.default_specs()
    )


def test_specs_carry_the_value_flags():
    """v_rotate / v_pin_ends reach the build (KIVI_V_ROTATE, KIVI_V_PIN_ENDS) and the cache key; the
    default flags add no define (the cubins of the other formats keep their hash)."""
    plain = KernelSpec.for_layout("decode_attention", PageLayout(128, 256, wide_channels=56), "bfloat16")
    vr = KernelSpec.for_layout("decode_attention", PageLayout(128, 256, wide_channels=56, **VR), "bfloat16")
    assert (vr.v_rotate, vr.v_pin_ends) == (True, False)
    assert not any("KIVI_V_ROTATE" in d or "KIVI_V_PIN_ENDS" in d for d in plain.defines())
    assert "-DKIVI_V_ROTATE=1" in vr.defines() and not any("KIVI_V_PIN_ENDS" in d for d in vr.defines())
    assert loader.cubin_path(plain, "sm_90a") != loader.cubin_path(vr, "sm_90a")
    free = KernelSpec.for_layout("quantize_append", PageLayout(64, 64, v_pin_ends=False), "float16")
    assert free.defines()[-1] == "-DKIVI_V_PIN_ENDS=0"
    with pytest.raises(ValueError, match="v_rotate must be a bool"):
        KernelSpec("quantize_append", 64, 64, v_rotate=1)


def test_configurations_that_cannot_fit_are_refused_in_the_spec():
    """Rotated values at head_dim 256 x page 256 in the quantizer (no GPU has 256 KiB per block): refused
    when the spec is made; the decode kernel there needs sm_90's 227 KiB: refused for sm_80 / sm_86 and
    consumer Blackwell (sm_120 / sm_121: 99 KiB), accepted for sm_90 / sm_100 / sm_103."""
    with pytest.raises(
        ValueError, match="rotated values at head_dim 256 x page 256 need 269.6 KiB of shared"
    ):
        KernelSpec.for_layout("quantize_append", PageLayout(256, 256, **VR), "bfloat16")
    dec = KernelSpec("decode_attention", 256, 256, wide_channels=112)
    fit = {"sm_80": False, "sm_86": False, "sm_120": False, "sm_121a": False, "sm_90a": True, "sm_100a": True}
    for arch, ok in {**fit, "sm_103a": True}.items():
        assert loader.fits(dec, arch) == ok, arch
    with pytest.raises(ValueError, match="more than the 163 KiB of shared memory a block may use on sm_80"):
        dec.check_arch("sm_80")
    with pytest.raises(
        ValueError, match=r"99 KiB of shared memory a block may use on sm_120: use sm_90 / sm_100"
    ):
        dec.check_arch("sm_120")
    assert all(loader.fits(KernelSpec("quantize_append", 256, 256, wide_channels=112), a) for a in ARCHS)


def test_shared_memory_limit_per_arch():
    """The opt-in shared memory per block of NVIDIA's compute-capability table, by arch (sm_90a is sm_90):
    not monotonic (consumer Blackwell has sm_86 / sm_89's 99 KiB); an arch the table lacks gets the
    smallest figure of the table."""
    kib = {a: loader.smem_optin(a) // 1024 for a in ("sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_90a")}
    kib |= {a: loader.smem_optin(a) // 1024 for a in ("sm_100", "sm_100a", "sm_103a", "sm_120", "sm_121a")}
    assert kib == {
        "sm_80": 163, "sm_86": 99, "sm_87": 163, "sm_89": 99, "sm_90": 227, "sm_90a": 227,
        "sm_100": 227, "sm_100a": 227, "sm_103a": 227, "sm_120": 99, "sm_121a": 99,
    }  # fmt: skip
    assert loader.smem_optin("sm_110") == loader.SMEM_OPTIN_UNKNOWN == 99 * 1024
    with pytest.raises(ValueError, match="sm_80 or newer"):
        loader.smem_optin("sm_75")


def test_quantizer_at_head_dim_256_fits_an_a100_not_a_99_kib_gpu():
    """The quantizer at head_dim 256 x page 128 with 3- or 4-bit keys: 139.6 / 139.4 KiB (the tile, the
    fixed-point values, the state: the kernel keeps the fixed-point values while the whole fits an
    A100). Accepted for sm_80 and sm_90, refused for the 99 KiB GPUs with the GPUs and pages that fit."""
    for k_bits, v_bits, need in ((3, 2, "139.6"), (4, 4, "139.4")):
        spec = KernelSpec.for_layout("quantize_append", PageLayout(256, 128, k_bits, v_bits), "bfloat16")
        for arch in ("sm_80", "sm_87", "sm_90a", "sm_100a"):
            spec.check_arch(arch)
        for arch in ("sm_86", "sm_89", "sm_120", "sm_121"):
            with pytest.raises(
                ValueError,
                match=rf"quantizer at head_dim 256 x page 128 \({k_bits}-bit keys\) "
                rf"needs {need} KiB .* on {arch}: use sm_80 / .* or pages of at most 64 tokens",
            ):
                spec.check_arch(arch)
    # the default 2-bit format at head_dim 128 x page 128 (71.0 KiB) fits every GPU
    default = KernelSpec.for_layout("quantize_append", PageLayout(128, 128), "bfloat16")
    assert all(loader.fits(default, a) for a in (*loader.SMEM_OPTIN, "sm_110"))


#: Configurations that reach every term of the two shared-memory formulas beyond SPECS: 1 and 4
#: cp.async stages with K outliers (the ring, score corrections, outlier scratch, fp32 wide tables),
#: rotated values without the exact token (no rotated-exact buffer).
EXTRA_DECODE = [
    KernelSpec("decode_attention", 128, 128, stages=4, k_outliers=1),
    KernelSpec("decode_attention", 64, 256, stages=1, exact_tokens=0, v_rotate=True, rows16=True),
]
#: The quantizer's branches: fixed-point values kept or recomputed, 2- to 4-bit keys (HI = 0 pads
#: Smem), K outliers, no exact token, rotated values (fp32 tile), both dtypes, every page size.
QUANTIZER_SMEM = [
    KernelSpec.for_layout("quantize_append", PageLayout(256, 128, 3, 2), "bfloat16"),
    KernelSpec.for_layout("quantize_append", PageLayout(256, 128, 4, 4), "bfloat16"),
    KernelSpec.for_layout("quantize_append", PageLayout(256, 256, wide_channels=112), "float16", staging=1),
    KernelSpec.for_layout("quantize_append", PageLayout(64, 256, **VR), "bfloat16"),
    KernelSpec("quantize_append", 128, 64, k_bits=3, v_bits=4, exact_tokens=0, k_outliers=1, wide_channels=8),
]


def test_shared_memory_formula_is_the_decode_kernels_own(cubins):
    """loader.smem_bytes (what check_arch refuses by) equals the decode kernel's kSmemBytes as compiled:
    the ``kivi_decode_launch_info`` symbol of its cubin (ptxas -v reports static shared memory only;
    this kernel's is dynamic), for every decode configuration compiled here."""
    from kivi_serve.kernels.static_model import elf_symbol

    decode = [s for s in SPECS if s.source == "decode_attention"]
    for spec in decode + EXTRA_DECODE:
        cubin = cubins.get((spec, "sm_90a")) or loader.compile_cubin(spec, "sm_90a")
        smem, _threads = struct.unpack("<ii", elf_symbol(cubin, "kivi_decode_launch_info"))
        assert loader.smem_bytes(spec) == smem, _id(spec)


@pytest.mark.skipif(simt.unavailable_reason() is not None, reason=f"emulation: {simt.unavailable_reason()}")
@pytest.mark.parametrize("spec", QUANTIZER_SMEM, ids=_id)
def test_shared_memory_formula_is_the_quantizers_own(spec):
    """loader.smem_bytes equals the quantizer's kSmemBytes as its own probe kernel
    (``kivi_append_smem_bytes``, what the loader reads at load) reports it, run in the CPU emulation
    (the same .cu; the C ABI lays Smem out as nvcc does); checked against the limits in
    test_quantizer_at_head_dim_256_fits_an_a100_not_a_99_kib_gpu."""
    assert loader.smem_bytes(spec) == simt.module(spec).smem_bytes


def test_cache_key_covers_the_configuration():
    a = loader.cubin_path(SPECS[0], "sm_80")
    assert loader.cubin_path(SPECS[0], "sm_80") == a
    assert loader.cubin_path(SPECS[0], "sm_90a") != a
    assert loader.cubin_path(KernelSpec("decode_attention", 64, 128, dtype="float16"), "sm_80") != a
    b = KernelSpec("quantize_append", 128, 64)
    c = KernelSpec("quantize_append", 128, 64, wide_channels=8)
    assert loader.cubin_path(b, "sm_80") != loader.cubin_path(c, "sm_80")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "nope", "head_dim": 128, "page_size": 64}, "source"),
        ({"source": "decode_attention", "head_dim": 96, "page_size": 64}, "head_dim"),
        ({"source": "decode_attention", "head_dim": 128, "page_size": 512}, "page_size"),
        ({"source": "decode_attention", "head_dim": 128, "page_size": 64, "k_bits": 3}, "2-bit"),
        ({"source": "quantize_append", "head_dim": 128, "page_size": 64, "v_bits": 5}, "v_bits"),
        ({"source": "quantize_append", "head_dim": 128, "page_size": 64, "dtype": "float32"}, "dtype"),
        ({"source": "quantize_append", "head_dim": 128, "page_size": 64, "wide_channels": 6}, "wide_chan"),
        ({"source": "quantize_append", "head_dim": 64, "page_size": 64, "wide_channels": 64}, "wide_chan"),
        (
            {"source": "quantize_append", "head_dim": 64, "page_size": 64, "k_bits": 4, "wide_channels": 8},
            "wide_channels needs k_bits < 4",
        ),
        ({"source": "quantize_append", "head_dim": 64, "page_size": 64, "count_build": True}, "count_build"),
        ({"source": "quantize_append", "head_dim": 128, "page_size": 64, "min_ctas": 2}, "min_ctas"),
        ({"source": "decode_attention", "head_dim": 128, "page_size": 64, "min_ctas": 0}, "min_ctas"),
        ({"source": "decode_attention", "head_dim": 128, "page_size": 64, "min_ctas": 9}, "min_ctas"),
        ({"source": "decode_attention", "head_dim": 128, "page_size": 64, "min_ctas": True}, "min_ctas"),
    ],
)
def test_spec_rejects_unsupported_configurations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KernelSpec(**kwargs)


def test_arch_must_be_ampere_or_newer():
    with pytest.raises(ValueError, match="sm_80 or newer"):
        loader.compile_cubin(SPECS[0], "sm_75")


@pytest.mark.skipif(loader.find_nvcc() is None, reason="nvcc is not installed")
def test_simt_selftest_kernels_are_cuda(tmp_path):
    """tests/simt/selftest.cu (the SIMT runtime's own test kernels) is CUDA that nvcc accepts: the
    emulation is tested against what the GPU compiler takes, not a dialect of its own."""
    src = Path(__file__).parent / "simt" / "selftest.cu"
    out = tmp_path / "selftest.cubin"
    cmd = [loader.find_nvcc(), "-cubin", "-arch=sm_80", "-std=c++17", f"-I{loader.CUDA_DIR}", "-o", str(out)]
    cmd.append(str(src))
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.read_bytes()[:4] == b"\x7fELF"


def test_compile_keeps_the_ptxas_report():
    """Every cubin has its ``ptxas -v`` report beside it (registers, spills: the static cost model)."""
    spec = KernelSpec("decode_attention", 64, 64, dtype="float16")
    path, log = loader.ptxas_log(spec, "sm_90a")
    assert path.is_file() and loader.ptxas_log_path(path).is_file()
    assert "Function properties for kivi_decode" in log and "registers" in log
    counting = loader.cubin_path(
        KernelSpec("decode_attention", 64, 64, dtype="float16", count_build=True), "sm_90a"
    )
    assert counting != path  # the counting build is its own cache entry


def test_decode_stages_default_per_configuration():
    """One cp.async stage at D = 128, P = 256 with 8-row tiles (shared memory capped the CTAs there: measured
    on an H200), two elsewhere; an explicit choice is kept, and it is part of the cache key."""
    assert KernelSpec("decode_attention", 128, 256).stages == 1
    assert KernelSpec("decode_attention", 128, 256, rows16=True).stages == 2
    assert KernelSpec("decode_attention", 256, 128).stages == 2
    assert KernelSpec("decode_attention", 128, 128).stages == 2
    assert KernelSpec("decode_attention", 128, 256, stages=2).stages == 2
    one, two = KernelSpec("decode_attention", 128, 128, stages=1), KernelSpec("decode_attention", 128, 128)
    assert loader.cubin_path(one, "sm_90a") != loader.cubin_path(two, "sm_90a")
    # the shared memory formula follows the ring's depth (one page per warp and stage)
    assert loader.smem_bytes(KernelSpec("decode_attention", 128, 256, stages=2)) > loader.smem_bytes(
        KernelSpec("decode_attention", 128, 256)
    )


def test_min_ctas_is_a_define_only_when_chosen():
    spec = KernelSpec("decode_attention", 128, 128)
    assert not any("KIVI_MIN_CTAS" in d for d in spec.defines())
    capped = KernelSpec("decode_attention", 128, 128, min_ctas=3)
    assert "-DKIVI_MIN_CTAS=3" in capped.defines()
    assert loader.cubin_path(capped, "sm_90a") != loader.cubin_path(spec, "sm_90a")


@pytest.mark.skipif(loader.find_nvcc() is None, reason="nvcc is not installed")
def test_min_ctas_caps_the_registers():
    """KIVI_MIN_CTAS reaches __launch_bounds__: three 128-thread CTAs per SM leave at most 170 registers a
    thread (65536 / 384; ptxas -v), where the default build of D = 128, P = 128 takes more."""
    from kivi_serve.kernels import static_model

    regs = {}
    for mc in (None, 3):
        _, log = loader.ptxas_log(KernelSpec("decode_attention", 128, 128, stages=1, min_ctas=mc), "sm_90a")
        regs[mc] = static_model.ptxas_usage(log)["regs"]
    assert regs[3] <= 65536 // (3 * 128) < regs[None], regs
