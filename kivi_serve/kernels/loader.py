"""Compile ``cuda/*.cu`` once per configuration, cache the cubin on disk, load it with CuPy.

A configuration (:class:`KernelSpec`) is one source file plus the ``-D`` defines that fix its
templates: head_dim, page size, code bits, exact token / K outliers / wide K channels, model
dtype, and for the decode kernel the query heads per MMA tile. Each configuration compiles to
one cubin per GPU architecture, stored as ``cache_dir()/kernels/<source>-<arch>-<hash>.cubin``;
the hash covers the sources (``.cu``, ``kivi_layout.cuh``, ``kivi_ptx.cuh``), the defines, the flags and the
compiler, so an edited kernel is never served stale. Compilation needs no GPU (CI compiles for
sm_80 and sm_90a).

Compilers, in order (``backend="auto"``): ``nvcc`` (``$KIVI_SERVE_NVCC``, ``$CUDA_PATH/bin``,
``PATH``, ``/usr/local/cuda/bin``), then NVRTC through ``cupy.cuda.nvrtc`` (PyPI
``nvidia-cuda-nvrtc``), which needs the CUDA headers (``cuda_fp16.h``): ``$KIVI_SERVE_CUDA_INCLUDE``,
``$CUDA_PATH/include`` or ``/usr/local/cuda/include``.

Importing this module needs neither CuPy nor a GPU; :func:`module` (loading onto a device) needs
both. Inside :func:`emulate`, the wrappers take CPU tensors and the kernels run emulated on CPU
(``tests/support/simt.py``, test-only: the same source compiled with g++ and the SIMT runtime of
tests/simt). Load kernels before capturing a CUDA graph: the first load launches a one-thread
kernel and reads its result back (the shared-memory size the kernel was compiled for).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import kivi_serve
from kivi_serve.config import cache_dir
from kivi_serve.quant.layout import PageLayout, align_up, default_wide_channels

CUDA_DIR = Path(kivi_serve.__file__).resolve().parents[1] / "cuda"
#: Headers the kernel sources include (the page layout; all inline PTX).
HEADERS = ("kivi_layout.cuh", "kivi_ptx.cuh")
SOURCES = ("quantize_append", "decode_attention")
#: Kernel names in each source (what a cubin must contain).
KERNELS = {
    "quantize_append": ("kivi_append", "kivi_dequantize", "kivi_append_smem_bytes", "kivi_reopen"),
    "decode_attention": ("kivi_decode", "kivi_decode_combine", "kivi_decode_smem_bytes"),
}
HEAD_DIMS = (64, 128, 256)
PAGE_SIZES = (64, 128, 256)
#: ``sharedMemPerBlockOptin`` (bytes per block) by architecture: NVIDIA's CUDA C++ Programming Guide,
#: "Technical Specifications per Compute Capability" (docs.nvidia.com/cuda/cuda-programming-guide/
#: 05-appendices/compute-capabilities.html), row "Maximum amount of shared memory per thread block".
#: Not monotonic in the arch: consumer Blackwell (sm_120 / sm_121) has the 128 KB unified L1 of
#: sm_86 / sm_89, so 99 KiB, like them and unlike the data-centre sm_90 / sm_100 / sm_103. An ``a``
#: suffix (sm_90a) is the same silicon. The loader checks the device's own figure again when it
#: loads a kernel (:func:`finish_module`); this table lets the backend refuse at engine build.
SMEM_OPTIN = {
    "sm_80": 163 * 1024,  # A100, A30
    "sm_86": 99 * 1024,  # RTX 30xx, A10, A40
    "sm_87": 163 * 1024,  # Jetson Orin
    "sm_89": 99 * 1024,  # RTX 40xx, L4, L40
    "sm_90": 227 * 1024,  # H100, H200, GH200
    "sm_100": 227 * 1024,  # B200, GB200
    "sm_103": 227 * 1024,  # B300, GB300
    "sm_120": 99 * 1024,  # RTX 50xx, RTX PRO Blackwell
    "sm_121": 99 * 1024,  # DGX Spark (GB10)
}
#: What an arch missing from :data:`SMEM_OPTIN` is assumed to allow: the smallest figure of any arch
#: the kernels support. Conservative on purpose: a figure too small only refuses, at engine build and
#: with a reason naming the table, a configuration that might have fitted, while one too large would
#: let the engine build and then fail at the first kernel load; an error instead would refuse every
#: configuration on a new GPU, even those that fit any GPU (most do: docs/deploy.md).
SMEM_OPTIN_UNKNOWN = min(SMEM_OPTIN.values())
BITS = (2, 3, 4)
DTYPES = {"float16": 0, "bfloat16": 1}
BACKENDS = ("auto", "nvcc", "nvrtc")
#: Compile flags. No fast math anywhere; the quantizer is bit-exact with the PyTorch reference only
#: if no multiply-add is contracted into an FMA.
#: ``--ptxas-options=-v``: the register / spill / stack report is kept beside each cubin (:func:`ptxas_log`).
FLAGS = {"nvcc": ("-O3", "-std=c++17", "--ptxas-options=-v"), "nvrtc": ("-std=c++17", "--ptxas-options=-v")}
SOURCE_FLAGS = {"quantize_append": ("--fmad=false",), "decode_attention": ()}


class CompilerNotFound(RuntimeError):
    """Neither nvcc nor NVRTC (with the CUDA headers) is available."""


def default_stages(head_dim: int, page_size: int, rows16: bool) -> int:
    """The decode kernel's default cp.async depth: 2, or 1 at head_dim 128 x page 256 with 8-row tiles.
    There two stages (95 KiB of shared memory a CTA) held 2 CTAs of 2 warps per SM, one stage holds 4:
    measured on an H200 (docs/performance.md, ninth session), 10-21 % faster at batch 8 / 32K-128K, the
    same at batch 1 / 128K. D = 128, P = 128 gained nothing from one stage (its registers cap it at 2
    CTAs either way). The other two-warp configurations (head_dim 256) would likely gain too; unmeasured,
    they keep two stages."""
    return 1 if (head_dim, page_size, rows16) == (128, 256, False) else 2


@dataclass(frozen=True)
class KernelSpec:
    """One compiled configuration of one ``cuda/<source>.cu``.

    Parameters
    ----------
    source : str
        ``"quantize_append"`` or ``"decode_attention"``.
    head_dim, page_size : int
        ``D`` in :data:`HEAD_DIMS`, ``P`` in :data:`PAGE_SIZES`.
    k_bits, v_bits : int
        Code widths (2, 3, 4); the decode kernel reads 2-bit codes only.
    exact_tokens, k_outliers : int
        0 or 1, as in :class:`~kivi_serve.quant.layout.PageLayout`.
    wide_channels : int or None
        Wide K channels per page (``KIVI_HI``), as in :class:`~kivi_serve.quant.layout.PageLayout`:
        a multiple of 4 below ``head_dim``, needing ``k_bits < 4``; ``None`` is the layout's
        default (``3 * head_dim // 16`` for 2- and 3-bit keys, 0 for 4-bit keys).
    dtype : str
        The model dtype of queries, keys, values and staging: ``"float16"`` or ``"bfloat16"``.
    rows16 : bool
        Decode only: up to 16 query heads per KV head in one MMA tile (else up to 8).
    stages : int or None
        Decode only: cp.async pipeline depth per warp; ``None`` is :func:`default_stages`.
    min_ctas : int or None
        Decode only: ``__launch_bounds__``'s minimum CTAs per SM (``KIVI_MIN_CTAS``: ptxas caps the
        registers so that many fit); ``None`` is the kernel's own per-configuration choice.
    count_build : bool
        Decode only: the static cost model's counting build (``KIVI_COUNT_BUILD=1``: every loop in
        the per-page loop unrolled; same results, compiled to be read, never launched).
    v_rotate, v_pin_ends : bool
        As in :class:`~kivi_serve.quant.layout.PageLayout` (``KIVI_V_ROTATE``, ``KIVI_V_PIN_ENDS``):
        values quantized after the signed-Hadamard rotation, and the V codebook's end levels pinned.
    staging : int
        The staging rows' format (``KIVI_STAGING``, :mod:`kivi_serve.quant.staging`): 0 = the model
        dtype, 1 = int8 rows with a per-(token, head) fp32 scale (the backend's default staging; the
        wrappers pick it from the staging tensor's dtype).
    """

    source: str
    head_dim: int
    page_size: int
    k_bits: int = 2
    v_bits: int = 2
    exact_tokens: int = 1
    k_outliers: int = 0
    dtype: str = "bfloat16"
    rows16: bool = False
    stages: int | None = None
    wide_channels: int | None = None
    count_build: bool = False
    staging: int = 0
    v_rotate: bool = False
    v_pin_ends: bool = True
    min_ctas: int | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {HEAD_DIMS} for the CUDA kernels, got {self.head_dim}")
        if self.page_size not in PAGE_SIZES:
            raise ValueError(
                f"page_size must be one of {PAGE_SIZES} for the CUDA kernels, got {self.page_size}"
            )
        for name in ("k_bits", "v_bits"):
            if getattr(self, name) not in BITS:
                raise ValueError(f"{name} must be one of {BITS}, got {getattr(self, name)}")
        if self.source == "decode_attention" and (self.k_bits, self.v_bits) != (2, 2):
            raise ValueError(
                f"the decode kernel reads 2-bit codes only, got k_bits={self.k_bits} v_bits={self.v_bits}"
            )
        for name in ("exact_tokens", "k_outliers"):
            if getattr(self, name) not in (0, 1):
                raise ValueError(f"{name} must be 0 or 1, got {getattr(self, name)}")
        if self.wide_channels is None:
            object.__setattr__(self, "wide_channels", default_wide_channels(self.head_dim, self.k_bits))
        hi = self.wide_channels
        if isinstance(hi, bool) or not isinstance(hi, int) or hi < 0 or hi >= self.head_dim or hi % 4:
            raise ValueError(f"wide_channels must be a multiple of 4 in [0, {self.head_dim}), got {hi!r}")
        if hi and self.k_bits == 4:
            raise ValueError("wide_channels needs k_bits < 4 (wide channels use k_bits + 1 bits)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.stages is None:
            object.__setattr__(self, "stages", default_stages(self.head_dim, self.page_size, self.rows16))
        if self.stages not in (1, 2, 3, 4):
            raise ValueError(f"stages must be 1..4, got {self.stages}")
        mc = self.min_ctas
        bad_mc = isinstance(mc, bool) or mc not in range(1, 9)
        if mc is not None and (self.source != "decode_attention" or bad_mc):
            raise ValueError(f"min_ctas is the decode kernel's, 1..8 or None; got {mc!r} for {self.source}")
        if self.staging not in (0, 1):
            raise ValueError(f"staging must be 0 (model dtype) or 1 (int8 rows), got {self.staging!r}")
        if self.count_build and self.source != "decode_attention":
            raise ValueError("count_build is the decode kernel's counting build (decode_attention only)")
        for name in ("v_rotate", "v_pin_ends"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        need, most = smem_bytes(self), max(SMEM_OPTIN.values())
        if need > most:  # (the kernels' static_asserts refuse to compile these)
            why = " (the quantizer holds the page's rotated values in fp32)" if self.v_rotate else ""
            use = self._smaller_pages(most) or "smaller pages"
            raise ValueError(
                f"{self._what()} {need / 1024:.1f} KiB of shared memory per block, more than any GPU "
                f"allows a block ({most // 1024} KiB){why}: use {use}"
            )

    def _what(self) -> str:
        """The kernel and configuration, as a refusal names them, and the verb."""
        if self.v_rotate and self.source == "quantize_append":  # (the wording the backend's tests know)
            return f"rotated values at head_dim {self.head_dim} x page {self.page_size} need"
        kernel = {"quantize_append": "the quantizer", "decode_attention": "the decode kernel"}[self.source]
        extra = [f"{self.k_bits}-bit keys"] if self.k_bits != 2 else []
        extra += ["rotated values"] if self.v_rotate else []
        extra += ["16 query heads per KV head"] if self.rows16 else []
        more = f" ({', '.join(extra)})" if extra else ""
        return f"{kernel} at head_dim {self.head_dim} x page {self.page_size}{more} needs"

    def _smaller_pages(self, limit: int) -> str | None:
        """``"pages of at most N tokens"`` for the largest smaller page size whose configuration fits
        ``limit`` bytes of shared memory, or None."""
        for p in sorted((p for p in PAGE_SIZES if p < self.page_size), reverse=True):
            if smem_bytes(replace(self, page_size=p)) <= limit:
                return f"pages of at most {p} tokens at head_dim {self.head_dim}"
        return None

    def check_arch(self, arch: str) -> None:
        """``ValueError`` if this configuration needs more shared memory per block (:func:`smem_bytes`,
        the kernel's own formula) than ``arch`` allows (:func:`smem_optin`), naming the GPUs and page
        sizes that fit. Needs no GPU: the backend refuses such a layer when the engine is built."""
        need, limit = smem_bytes(self), smem_optin(arch)
        if need <= limit:
            return
        key = _arch_key(arch)
        unknown = "" if key in SMEM_OPTIN else " (not in kivi-serve's table of GPUs: assumed the smallest)"
        fit = [a for a, kib in SMEM_OPTIN.items() if kib >= need]
        gpus = f"{' / '.join(fit)} ({min(SMEM_OPTIN[a] for a in fit) // 1024} KiB or more)" if fit else None
        advice = " or ".join(x for x in (gpus, self._smaller_pages(limit)) if x)
        raise ValueError(
            f"{self._what()} {need / 1024:.1f} KiB of shared memory per block, more than the "
            f"{limit // 1024} KiB of shared memory a block may use on {arch}{unknown}: use {advice}"
        )

    @classmethod
    def for_layout(cls, source: str, layout, dtype, **kwargs) -> KernelSpec:
        """The spec of ``source`` for a :class:`~kivi_serve.quant.layout.PageLayout` and a dtype."""
        name = str(dtype).removeprefix("torch.")
        return cls(
            source,
            layout.head_dim,
            layout.page_size,
            layout.k_bits,
            layout.v_bits,
            layout.exact_tokens,
            layout.k_outliers,
            name,
            wide_channels=layout.wide_channels,
            v_rotate=layout.v_rotate,
            v_pin_ends=layout.v_pin_ends,
            **kwargs,
        )

    def defines(self) -> list[str]:
        d = {
            "KIVI_HEAD_DIM": self.head_dim,
            "KIVI_PAGE": self.page_size,
            "KIVI_K_BITS": self.k_bits,
            "KIVI_V_BITS": self.v_bits,
            "KIVI_EXACT": self.exact_tokens,
            "KIVI_OUTLIERS": self.k_outliers,
            "KIVI_HI": self.wide_channels,
            "KIVI_DTYPE": DTYPES[self.dtype],
            "KIVI_STAGING": self.staging,
        }
        # (absent: the defaults, so the other formats' cubins keep their hash; the decode kernel never
        # reads the V codebook's pinning, so its cubin does not depend on it)
        if self.v_rotate:
            d["KIVI_V_ROTATE"] = 1
        if not self.v_pin_ends and self.source == "quantize_append":
            d["KIVI_V_PIN_ENDS"] = 0
        if self.source == "decode_attention":
            d["KIVI_ROWS16"] = int(self.rows16)
            d["KIVI_STAGES"] = self.stages
            if self.count_build:
                d["KIVI_COUNT_BUILD"] = 1
            if self.min_ctas is not None:
                d["KIVI_MIN_CTAS"] = self.min_ctas
        return [f"-D{k}={v}" for k, v in d.items()]

    def flags(self, backend: str) -> tuple[str, ...]:
        return FLAGS[backend] + SOURCE_FLAGS[self.source]


# ----------------------------------------------------------------------------------- compilers
def find_nvcc() -> str | None:
    """Path of nvcc, or None."""
    candidates = [os.environ.get("KIVI_SERVE_NVCC")]
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def cuda_include_dir() -> Path | None:
    """A directory with ``cuda_fp16.h`` for NVRTC, or None."""
    candidates = [os.environ.get("KIVI_SERVE_CUDA_INCLUDE")]
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "include"))
    nvcc = find_nvcc()
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1] / "include"))
    candidates.append("/usr/local/cuda/include")
    for c in candidates:
        if c and (Path(c) / "cuda_fp16.h").is_file():
            return Path(c)
    return None


@functools.cache
def nvrtc_version() -> tuple[int, int] | None:
    """NVRTC's version through CuPy, or None when CuPy or libnvrtc is missing."""
    try:
        from cupy.cuda import nvrtc

        return tuple(nvrtc.getVersion())
    except Exception:  # noqa: BLE001 — ImportError, missing libnvrtc, ...: all mean "not available"
        return None


def available_backends() -> list[str]:
    """The compilers that can build the kernels here, preferred first."""
    found = []
    if find_nvcc():
        found.append("nvcc")
    if nvrtc_version() is not None and cuda_include_dir() is not None:
        found.append("nvrtc")
    return found


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    found = available_backends()
    if backend == "auto":
        if not found:
            raise CompilerNotFound(
                "no CUDA compiler: install the CUDA toolkit's nvcc (or set KIVI_SERVE_NVCC), or NVRTC "
                "(pip install nvidia-cuda-nvrtc) together with the CUDA headers (KIVI_SERVE_CUDA_INCLUDE)"
            )
        return found[0]
    if backend not in found:
        raise CompilerNotFound(
            f"compiler backend {backend!r} is not available here (found: {found or 'none'})"
        )
    return backend


@functools.cache
def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def _compiler_id(backend: str) -> str:
    if backend == "nvcc":
        nvcc = find_nvcc()
        return f"nvcc {_nvcc_version(nvcc)}"
    return f"nvrtc {nvrtc_version()}"


def _check_arch(arch: str) -> str:
    digits = arch.removeprefix("sm_").removesuffix("a")
    if not arch.startswith("sm_") or not digits.isdigit() or int(digits) < 80:
        raise ValueError(f"arch must be sm_80 or newer (e.g. sm_80, sm_86, sm_90a), got {arch!r}")
    return arch


def _arch_key(arch: str) -> str:
    """``arch`` as :data:`SMEM_OPTIN` names it (sm_90a is sm_90)."""
    return _check_arch(arch).removesuffix("a")


def smem_optin(arch: str) -> int:
    """Shared memory one block may opt into on ``arch`` (:data:`SMEM_OPTIN`; an arch not there:
    :data:`SMEM_OPTIN_UNKNOWN`)."""
    return SMEM_OPTIN.get(_arch_key(arch), SMEM_OPTIN_UNKNOWN)


# ------------------------------------------------------------------------------ shared memory
# The dynamic shared memory each kernel asks for (``kSmemBytes`` of its .cu, what its
# ``*_smem_bytes`` probe reports at load), mirrored here so that a configuration too large for a GPU
# is refused without a GPU and without compiling. The one Python copy of the two formulas:
# tests/test_kernels_compile.py holds it equal to the kernels' own figure (the decode cubin's
# ``kivi_decode_launch_info``, the quantizer's probe run emulated), so an edit of either .cu that
# changes its shared memory fails there until this follows.
#: quantize_append.cu's kSmemBudget: it keeps the page's fixed-point values in shared memory only
#: where the whole fits an A100's 163 KiB (else it recomputes them where they are read).
_QUANT_FIXED_BUDGET = 163 * 1024
_QUANT_MAX_LEVELS = 16  # quantize_append.cu's kMaxLevels


@functools.cache
def _quantizer_state_bytes(head_dim: int, page_size: int, wide: int) -> int:
    """``sizeof(Smem)`` of quantize_append.cu, laid out by the C ABI (ctypes follows the platform's
    rules, which the CUDA compilers share for these plain types), rounded to 16 bytes (kStateBytes)."""
    f32, f64, i32 = ctypes.c_float, ctypes.c_double, ctypes.c_int32
    u32, u64 = ctypes.c_uint32, ctypes.c_uint64
    d, p, levels = head_dim, page_size, _QUANT_MAX_LEVELS

    class Ex(ctypes.Structure):
        _fields_ = [("ch_mid", f64 * d), ("ch_half", f64 * d), ("score", f64 * p)]

    class W(ctypes.Structure):
        _fields_ = [("k_weight", u32 * d), ("hi_rank", i32 * d)]

    class U(ctypes.Union):
        _fields_ = [("old_hi_pos", i32 * d), ("ex", Ex), ("w", W)]

    class Smem(ctypes.Structure):
        _fields_ = [
            ("ch_lo", f32 * d), ("ch_scale", f32 * d), ("tk_lo", f32 * p), ("tk_scale", f32 * p), ("u", U),
            ("kout_idx", i32 * d), ("kout_drop", i32 * d), ("hi_pos", i32 * d),
            ("hi_list", i32 * max(wide, 1)),  # hi_list[HI > 0 ? HI : 1]
            ("levels", f32 * levels), ("hlevels", f32 * levels),
            ("sum_w", u64 * levels), ("sum_wu", u64 * levels), ("dist", u64 * 2), ("exact_idx", i32),
        ]  # fmt: skip

    return align_up(ctypes.sizeof(Smem))


@functools.cache
def smem_bytes(spec: KernelSpec) -> int:
    """Dynamic shared memory per block that ``spec``'s main kernel (``kivi_append`` /
    ``kivi_decode``) launches with, in bytes: its .cu's ``kSmemBytes`` (see above). Needs no GPU."""
    d, p, wide = spec.head_dim, spec.page_size, spec.wide_channels
    if spec.source == "quantize_append":
        # the tile (P x D, 2-byte model dtype; rotated values: fp32), the fixed-point values (P x D u16)
        # where the whole fits _QUANT_FIXED_BUDGET, then Smem
        tile = p * d * (4 if spec.v_rotate else 2)
        state = _quantizer_state_bytes(d, p, wide)
        fixed = p * d * 2 if tile + p * d * 2 + state <= _QUANT_FIXED_BUDGET else 0
        return tile + fixed + state
    layout = PageLayout(d, p, 2, 2, spec.exact_tokens, spec.k_outliers, wide)
    rows = 16 if spec.rows16 else 8
    pair = spec.rows16 and d == 256  # kPair: two warps share a page pair
    warps = 2 if pair or d * p >= 256 * 128 else 4
    out = spec.k_outliers == 1
    copy = align_up(layout.content_bytes)  # one page, as the cp.async ring holds it
    ring = warps * spec.stages * copy
    merge = warps * rows * (d + (3 if pair else 2)) * 4
    tail = rows * (p + 1) * 4 + 2 * rows * 4
    work = align_up(max(ring, merge, tail))  # the ring, then the merge of the warps, share one area
    corr = warps * rows * p * 4 if out else 0
    scratch = warps * rows * 32 * 4 if out else 0
    wide_warp = 48 + 16 * ((wide + 15) // 16) * 4 + (24 * 4 + d if out else 0)  # wtab, wmeta[, dtab, wslot]
    wide_tables = warps * align_up(wide_warp) if wide else 0
    exchange = warps * 20 * 32 * 4 if pair else 0
    rotated = warps * d * 4 if spec.v_rotate and spec.exact_tokens else 0
    # the K offset MMA's fp16 q fragments (kQhBytes: D/16 k-tiles x 32 lanes x 2 or 4 words, row exponents)
    qh = align_up((d // 16) * 32 * (4 if rows == 16 else 2) * 4 + 2 * rows * 4)
    qfold = rows == 16 and d <= 128  # kQFold: q and k_scale in fold order (16-row tiles up to D = 128)
    # each warp's fp32 copies of its page's metadata (kF32Words; none for the D = 256 warp pair)
    f32 = 0 if pair else warps * (2 * p + 2 * d + (d if qfold else 0)) * 4
    return rows * d * 4 + work + corr + scratch + wide_tables + exchange + rotated + qh + f32 + (
        rows * d * 4 if qfold else 0
    )


def cubin_path(spec: KernelSpec, arch: str, backend: str = "auto") -> Path:
    """Where the cubin of ``spec`` for ``arch`` lives in the on-disk cache (it may not exist yet)."""
    backend = _resolve_backend(backend)
    h = hashlib.sha256()
    for part in (
        (CUDA_DIR / f"{spec.source}.cu").read_bytes(),
        *((CUDA_DIR / name).read_bytes() for name in HEADERS),
        " ".join(spec.defines()).encode(),
        " ".join(spec.flags(backend)).encode(),
        arch.encode(),
        _compiler_id(backend).encode(),
    ):
        h.update(part)
        h.update(b"\0")
    return cache_dir() / "kernels" / f"{spec.source}-{arch}-{backend}-{h.hexdigest()[:20]}.cubin"


def compile_cubin(spec: KernelSpec, arch: str = "sm_80", backend: str = "auto") -> Path:
    """Compile ``spec`` for ``arch`` (no GPU needed) unless the cache has it; return the cubin's path."""
    arch = _check_arch(arch)
    spec.check_arch(arch)
    backend = _resolve_backend(backend)
    path = cubin_path(spec, arch, backend)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    src = CUDA_DIR / f"{spec.source}.cu"
    if backend == "nvcc":
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            out = Path(tmp) / "out.cubin"
            cmd = [
                find_nvcc(),
                "-cubin",
                f"-arch={arch}",
                *spec.flags(backend),
                *spec.defines(),
                f"-I{CUDA_DIR}",
                "-o",
                str(out),
                str(src),
            ]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"nvcc failed for {spec} ({arch}):\n{' '.join(cmd)}\n{run.stderr}")
            log = Path(tmp) / "ptxas.txt"
            log.write_text(run.stdout + run.stderr)
            os.replace(log, ptxas_log_path(path))  # before the cubin: a cached cubin has its log
            os.replace(out, path)  # atomic: concurrent compilers of the same spec are harmless
    else:
        from cupy.cuda import nvrtc

        prog = nvrtc.createProgram(
            src.read_text(),
            src.name,
            [(CUDA_DIR / name).read_bytes() for name in HEADERS],
            [name.encode() for name in HEADERS],
        )
        opts = [f"-arch={arch}", *spec.flags(backend), *spec.defines(), f"-I{cuda_include_dir()}"]
        try:
            nvrtc.compileProgram(prog, opts)
        except Exception as exc:
            raise RuntimeError(f"NVRTC failed for {spec} ({arch}):\n{nvrtc.getProgramLog(prog)}") from exc
        cubin = nvrtc.getCUBIN(prog)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(nvrtc.getProgramLog(prog))
        os.replace(tmp, ptxas_log_path(path))
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".cubin")
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        os.replace(tmp, path)
    return path


def ptxas_log_path(cubin: Path) -> Path:
    """Where :func:`compile_cubin` keeps the ``ptxas -v`` report of a cubin."""
    return Path(cubin).with_suffix(".ptxas.txt")


def ptxas_log(spec: KernelSpec, arch: str = "sm_90a", backend: str = "auto") -> tuple[Path, str]:
    """The cubin of ``spec`` (compiled unless cached) and its ``ptxas -v`` report."""
    path = compile_cubin(spec, arch, backend)
    log = ptxas_log_path(path)
    if not log.is_file():  # a cubin cached by a loader that kept no log: compile it again
        path.unlink(missing_ok=True)
        path = compile_cubin(spec, arch, backend)
    return path, log.read_text()


def default_specs(
    head_dims: Iterable[int] = HEAD_DIMS,
    page_sizes: Iterable[int] = PAGE_SIZES,
    dtypes: Iterable[str] = tuple(DTYPES),
) -> list[KernelSpec]:
    """The configurations of the default page formats (:func:`kivi_serve.quant.schemes.page_format`:
    2-bit, exact token, wide K channels: 3D/16 at pages 64 and 128, 7D/16 at page 256,
    kivi-serve-2bit-p256)."""
    from kivi_serve.quant.schemes import page_format

    specs = []
    for d in head_dims:
        for p in page_sizes:
            layout = page_format(p).layout(d, p)
            for dt in dtypes:
                # staging 1 (int8 rows) is the backend's default; staging 0 also serves dequantize
                for staging in (0, 1):
                    specs.append(KernelSpec.for_layout("quantize_append", layout, dt, staging=staging))
                for rows16 in (False, True):
                    spec = KernelSpec.for_layout("decode_attention", layout, dt, rows16=rows16, staging=1)
                    specs.append(spec)
    return specs


def fits(spec: KernelSpec, arch: str) -> bool:
    """Whether ``spec`` fits ``arch``'s shared memory (:meth:`KernelSpec.check_arch`)."""
    try:
        spec.check_arch(arch)
    except ValueError:
        return False
    return True


def precompile(
    archs: Iterable[str] = ("sm_80", "sm_90a"),
    specs: Iterable[KernelSpec] | None = None,
    backend: str = "auto",
    jobs: int | None = None,
) -> list[Path]:
    """Compile ``specs`` (default: :func:`default_specs`) for every arch into the cache (no GPU needed),
    each where it fits (:func:`fits`: the decode kernel at head_dim 256 x page 256 needs sm_90)."""
    from concurrent.futures import ThreadPoolExecutor

    work = [(s, a) for a in archs for s in (default_specs() if specs is None else list(specs)) if fits(s, a)]
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda sa: compile_cubin(sa[0], sa[1], backend), work))


# ----------------------------------------------------------------------------------- loading
def capability_arch(capability) -> str:
    """The arch to compile for on a GPU of compute capability ``(major, minor)``: ``sm_90a`` on
    Hopper, else ``sm_<major><minor>``; ``ValueError`` below 8.0. Needs no GPU."""
    major, minor = (int(x) for x in capability)
    if major < 8:
        raise ValueError(
            f"kivi-serve's CUDA kernels need compute capability 8.0 or newer, got {major}.{minor}"
        )
    return "sm_90a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"


def device_arch(device) -> str:
    """:func:`capability_arch` of a torch CUDA device."""
    import torch

    return capability_arch(torch.cuda.get_device_capability(device))


#: Resident CTAs per SM an emulated module reports (what an H100 holds of the default decode
#: configuration at D = 128, P = 128); a GPU's module asks the occupancy calculator instead.
ASSUMED_CTAS_PER_SM = 2


@dataclass(frozen=True)
class Module:
    """A loaded cubin: its functions and the launch facts its kernels were compiled with."""

    spec: KernelSpec
    functions: dict
    smem_bytes: int
    threads: int
    #: CTAs of the source's main kernel resident per SM (the CUDA occupancy calculator on a GPU: its
    #: registers, shared memory and threads; :data:`ASSUMED_CTAS_PER_SM` under the emulation).
    ctas_per_sm: int = ASSUMED_CTAS_PER_SM

    def __getitem__(self, name: str):
        return self.functions[name]


def finish_module(spec: KernelSpec, functions: dict, probe, max_optin: int, occupancy=None) -> Module:
    """A :class:`Module` from loaded ``functions``: ``probe()`` launches the source's
    ``*_smem_bytes`` kernel and returns (shared-memory bytes, threads) — the kernel knows its
    shared-memory need (one source of truth); a need above 48 KiB is opted into (CUDA requires it).
    ``occupancy(function, threads, smem)``: resident CTAs per SM of the main kernel (None: assumed)."""
    smem, threads = probe()
    if smem > max_optin:
        raise ValueError(f"{spec} needs {smem} bytes of shared memory per block; this GPU allows {max_optin}")
    main = functions[KERNELS[spec.source][0]]
    if smem > 48 * 1024:
        main.max_dynamic_shared_size_bytes = smem
    ctas = ASSUMED_CTAS_PER_SM if occupancy is None else int(occupancy(main, threads, smem))
    if ctas < 1:
        raise ValueError(f"{spec}: no CTA of {threads} threads and {smem} bytes of shared memory fits an SM")
    return Module(spec, functions, smem, threads, ctas)


@functools.cache
def module(spec: KernelSpec, device_index: int) -> Module:
    """Compile (or take from the cache) and load ``spec`` on CUDA device ``device_index``."""
    import cupy

    arch = device_arch(device_index)
    path = compile_cubin(spec, arch)
    with cupy.cuda.Device(device_index):
        raw = cupy.RawModule(path=str(path))
        functions = {name: raw.get_function(name) for name in KERNELS[spec.source]}

        def probe() -> tuple[int, int]:
            out = cupy.zeros(2, dtype=cupy.int32)
            functions[KERNELS[spec.source][2]]((1,), (1,), (out,))
            return tuple(int(x) for x in out.get())

        def occupancy(fn, threads: int, smem: int) -> int:
            return cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, threads, smem)

        max_optin = cupy.cuda.runtime.getDeviceProperties(device_index)["sharedMemPerBlockOptin"]
        return finish_module(spec, functions, probe, max_optin, occupancy)


# ----------------------------------------------------------------------------------- emulation
_emulation: tuple[str, Path | None] | None = None


@contextlib.contextmanager
def emulate(mode: str = "plain", source_dir: Path | None = None):
    """Inside this block the kernel wrappers accept CPU tensors and run the kernels emulated on CPU
    (``tests/support/simt.py``, test-only: the same ``.cu`` source built with g++ and a SIMT runtime).
    ``mode``: ``"plain"``, ``"race"`` (shared-memory race check) or ``"asan"`` (AddressSanitizer;
    needs a process started with :func:`tests.support.simt.sanitizer_env`). ``source_dir``
    replaces ``cuda/`` (a modified copy of the kernels). For tests and debugging: an emulated run
    is never a GPU result."""
    global _emulation
    from tests.support import simt

    simt._check_mode(mode)
    previous, _emulation = _emulation, (mode, Path(source_dir) if source_dir else None)
    try:
        yield
    finally:
        _emulation = previous


def emulation_mode() -> str | None:
    """The mode of the enclosing :func:`emulate` block, or None."""
    return _emulation[0] if _emulation else None


def module_for(spec: KernelSpec, device) -> Module:
    """:func:`module` for a torch device: a CUDA device, or the CPU inside :func:`emulate`."""
    if device.type == "cpu":
        if _emulation is None:
            raise ValueError("CPU tensors need the kernel emulation (kivi_serve.kernels.loader.emulate())")
        from tests.support import simt

        return simt.module(spec, *_emulation)
    import torch

    return module(spec, device.index if device.index is not None else torch.cuda.current_device())


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (an emulated CPU "device" reports an H100's 132)."""
    if device.type == "cpu":
        from tests.support import simt

        return simt.SM_COUNT
    return _cuda_sm_count(device.index if device.index is not None else 0)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def ptr(t) -> object:
    """A kernel pointer argument for a torch tensor (or None → null)."""
    import numpy as np

    return np.uint64(0 if t is None else t.data_ptr())


def launch(fn, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, smem: int, device) -> None:
    """Launch ``fn`` on torch's current stream of ``device`` (no host sync: graph-capture safe); on
    the CPU (emulation) synchronously, with the same calling convention."""
    if device.type == "cpu":
        fn(grid, block, args, shared_mem=smem, stream=None)
        return
    import cupy
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index)
    with cupy.cuda.Device(index):
        fn(grid, block, args, shared_mem=smem, stream=cupy_stream(stream.cuda_stream))


class _StreamHandle:
    """A raw ``cudaStream_t`` behind the CUDA stream protocol (``__cuda_stream__``)."""

    def __init__(self, handle: int) -> None:
        self.handle = int(handle)

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


def cupy_stream(handle: int):
    """A CuPy stream for a raw ``cudaStream_t`` (torch's ``Stream.cuda_stream``), through
    ``cupy.cuda.Stream.from_external`` (``cupy.cuda.ExternalStream`` is deprecated in CuPy 14 and
    would warn on every launch). Needs no GPU to build."""
    import cupy

    return cupy.cuda.Stream.from_external(_StreamHandle(handle))


def spec_for(source: str, layout, dtype, **kwargs) -> KernelSpec:
    """:meth:`KernelSpec.for_layout` that raises ValueError naming ``layout`` for unsupported formats."""
    try:
        return KernelSpec.for_layout(source, layout, dtype, **kwargs)
    except ValueError as exc:
        raise ValueError(f"layout: {exc}") from None


__all__ = [
    "ASSUMED_CTAS_PER_SM",
    "default_stages",
    "CUDA_DIR",
    "CompilerNotFound",
    "KernelSpec",
    "Module",
    "available_backends",
    "capability_arch",
    "compile_cubin",
    "cubin_path",
    "cuda_include_dir",
    "cupy_stream",
    "default_specs",
    "device_arch",
    "emulate",
    "emulation_mode",
    "find_nvcc",
    "finish_module",
    "fits",
    "launch",
    "module",
    "module_for",
    "nvrtc_version",
    "precompile",
    "ptr",
    "ptxas_log",
    "ptxas_log_path",
    "sm_count",
    "smem_bytes",
    "smem_optin",
    "spec_for",
]
