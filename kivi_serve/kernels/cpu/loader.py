"""Build the CPU kernels once per machine, cache the shared library on disk, load it with ctypes.

The kernels (``quantize.cpp``, ``decode.cpp``, ``kivi_cpu.h`` next to this file) are plain C++ with
an ``extern "C"`` interface: no Python or torch headers, so a build is two ``g++`` runs of a few
seconds (the two files in parallel), and a library works with any torch. One library per ISA:

=========  =====================================================  ===============================
ISA        flags                                                  needs (``/proc/cpuinfo``)
=========  =====================================================  ===============================
avx512     ``-mavx512f -mavx512bw -mavx512vl -mavx512dq``         avx512f, avx512bw, avx512vl,
           ``-mfma -mf16c``                                       avx512dq, fma, f16c
avx2       ``-mavx2 -mfma -mf16c``                                avx2, fma, f16c
scalar     (none: the compiler's baseline, any architecture)      —
=========  =====================================================  ===============================

``KIVI_SERVE_CPU_ISA`` (``auto`` by default, else one of the names above) picks the path; ``auto``
takes the best one the CPU runs. Forcing an ISA the CPU lacks is a ``ValueError``.

Cache: ``cache_dir()/kernels/cpu/kivi_cpu-<isa>-<hash>.so``; the hash covers the three sources,
the flags, the ISA and the compiler's version line, so an edited kernel is never served stale.
Compiler: ``$KIVI_SERVE_CXX``, ``$CXX``, then ``g++``, ``c++``, ``clang++`` on ``PATH``. Every build
uses ``-ffp-contract=off`` (the quantizer is bit-exact with the PyTorch reference only if no
``a * b + c`` is fused; the decode kernel calls FMA intrinsics explicitly), ``-fno-trapping-math``
and ``-fno-math-errno`` (no FP exception flags or errno are read, so loops with divisions and
selects vectorize; the values are unchanged) and ``-fopenmp``; never ``-ffast-math``. The
library's ``libgomp.so.1`` resolves to the one torch has already loaded (same soname), so both
share one OpenMP runtime and thread pool; the wrappers pass ``torch.get_num_threads()``.

If no compiler is found, :func:`build` loads a *prebuilt* copy instead: :func:`precompile` (run by
``deploy/precompile_kernels.py --cpu`` in the CPU image's build stage) copies every library it builds
to a name whose hash has ``prebuilt`` in place of the compiler's version line, for a runtime stage
with the same sources, flags, torch and Python but no compiler. If there is neither, or the build
fails, :func:`library` returns None and the wrappers run the PyTorch reference after one
``RuntimeWarning`` saying why (:func:`unavailable_reason`).

One more file, ``binding.cpp``, is a CPython extension over torch's C++ tensors (torch's and
Python's headers): :class:`~kivi_serve.kernels.cpu.DecodeBatch`'s per-layer call read in C++.
:func:`binding` builds it once per machine and torch version (~15 s of CPU; one file, any ISA: it
calls the library's ``kivi_decode_run`` through a pointer) into
``cache_dir()/kernels/cpu/kivi_cpu_binding-<hash><extension suffix>``; where it cannot be built
it returns None after one ``RuntimeWarning`` and the batch prepares each call in Python instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kivi_serve.config import cache_dir
from kivi_serve.quant.layout import PageLayout

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ("quantize.cpp", "decode.cpp")
HEADER = "kivi_cpu.h"
ISAS = ("avx512", "avx2", "scalar")
ENV_ISA = "KIVI_SERVE_CPU_ISA"
ENV_CXX = "KIVI_SERVE_CXX"
ISA_FLAGS = {
    "avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"),
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "scalar": (),
}
ISA_CPU_FLAGS = {
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"),
    "avx2": ("avx2", "fma", "f16c"),
    "scalar": (),
}
FLAGS = (
    "-O3",
    "-std=c++17",
    "-fPIC",
    "-fopenmp",
    "-ffp-contract=off",
    "-fno-trapping-math",
    "-fno-math-errno",
    "-fvisibility=hidden",
    "-DNDEBUG",
)
#: Model dtypes the kernels read and write, and their codes in kivi_cpu.h (``DType``).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: Code of compact int8 staging rows (kivi_cpu.h ``kI8``; a uint8 staging tensor, quant/staging.py).
STAGING_I8 = 3


def staging_code(staging: torch.Tensor, model_dtype: torch.dtype) -> int:
    """The C code of a staging tensor's rows: :data:`STAGING_I8` for uint8, else the model dtype's."""
    return STAGING_I8 if staging.dtype == torch.uint8 else DTYPE_CODES[model_dtype]


def staging_ok(staging: torch.Tensor, model_dtype: torch.dtype, H: int, P: int, D: int) -> bool:
    """A staging tensor of the right dtype and shape: model dtype ``(S, 2, H, P, D)``, or uint8
    ``(S, 2, H, P, D + 4)``. (Element by element: slicing a ``torch.Size`` costs more than this.)"""
    s = staging.shape
    if len(s) != 5 or s[1] != 2 or s[2] != H or s[3] != P:
        return False
    dt = staging.dtype
    if dt is torch.uint8:
        return s[4] == D + 4
    return dt is model_dtype and s[4] == D


#: Status codes of the C entry points (kivi_cpu.h ``Status``).
STATUS = {
    1: "a block id outside [0, num_blocks)",
    2: "a staging slot outside [0, num_slots)",
    3: "an in-page offset, fill or prefix outside the page",
    4: "a sequence length inconsistent with its query length or block table",
    5: "query_start_loc not non-decreasing within [0, T]",
    6: "an unsupported argument",
    7: "out of memory",
    8: "stale decode metadata: the block tables, lengths, query_start_loc or tail slots changed since "
    "this DecodeBatch checked them (a batch is valid for one step: make a new one)",
}


class BuildError(RuntimeError):
    """No C++ compiler, or the build failed."""


# ----------------------------------------------------------------------------------- the ISA
@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def supported_isas() -> tuple[str, ...]:
    """The ISAs this CPU can run, best first (always ends with ``scalar``)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return ("scalar",)
    flags = _cpu_flags()
    if not flags:  # not Linux: ask torch (which follows the same AVX-512 / AVX2 split)
        cap = torch.backends.cpu.get_cpu_capability().lower()
        return {"avx512": ("avx512", "avx2", "scalar"), "avx2": ("avx2", "scalar")}.get(cap, ("scalar",))
    return tuple(isa for isa in ISAS if all(f in flags for f in ISA_CPU_FLAGS[isa]))


def selected_isa() -> str:
    """The ISA the wrappers use now: ``$KIVI_SERVE_CPU_ISA``, or the best one the CPU runs."""
    want = os.environ.get(ENV_ISA, "auto").strip().lower() or "auto"
    if want == "auto":
        return supported_isas()[0]
    if want not in ISAS:
        raise ValueError(f"{ENV_ISA} must be auto or one of {ISAS}, got {want!r}")
    if want not in supported_isas():
        raise ValueError(f"{ENV_ISA}={want}: this CPU cannot run it (it runs {', '.join(supported_isas())})")
    return want


# ----------------------------------------------------------------------------------- the build
def find_compiler() -> str | None:
    """Path of a C++ compiler, or None."""
    for c in (os.environ.get(ENV_CXX), os.environ.get("CXX"), "g++", "c++", "clang++"):
        if not c:
            continue
        path = shutil.which(c)
        if path:
            return path
    return None


@functools.cache
def _compiler_id(cxx: str) -> str:
    run = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
    return run.stdout.strip().splitlines()[0]


#: The compiler id in the cache key of a prebuilt copy (:func:`precompile`): what a machine without
#: a compiler (a container's runtime stage) loads.
PREBUILT = "prebuilt"


def _compiler_key(cxx: str | None) -> str:
    """The compiler's part of a cache key: its version line, or :data:`PREBUILT` for ``cxx=None``."""
    return _compiler_id(cxx) if cxx else PREBUILT


def library_path(isa: str, cxx: str | None) -> Path:
    """Where the library of ``isa`` built by ``cxx`` lives in the on-disk cache (may not exist yet);
    ``cxx=None``: the name of its prebuilt copy (same sources, flags and ISA, any compiler)."""
    h = hashlib.sha256()
    for name in (HEADER, *SOURCES):
        h.update((SOURCE_DIR / name).read_bytes())
    h.update(" ".join((*FLAGS, *ISA_FLAGS[isa], isa, _compiler_key(cxx))).encode())
    return cache_dir() / "kernels" / "cpu" / f"kivi_cpu-{isa}-{h.hexdigest()[:16]}.so"


def build(isa: str) -> Path:
    """Compile the library of ``isa`` into the cache (if not there yet) and return its path; with no
    compiler on this machine, the path of its prebuilt copy if :func:`precompile` left one."""
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    cxx = find_compiler()
    if cxx is None:
        return _prebuilt(library_path(isa, None))
    path = library_path(isa, cxx)
    return _build(path, cxx, SOURCES, [*FLAGS, *ISA_FLAGS[isa]], [], f"the CPU kernels ({isa})")


def _compiler() -> str:
    cxx = find_compiler()
    if cxx is None:
        raise BuildError(f"no C++ compiler found (set {ENV_CXX}, or install g++)")
    return cxx


def _prebuilt(path: Path) -> Path:
    """``path`` (a prebuilt copy) if it exists; BuildError saying there is neither a compiler nor it."""
    if path.is_file():
        return path
    where = f"no prebuilt {path.name} in {path.parent}"
    raise BuildError(f"no C++ compiler found (set {ENV_CXX}, or install g++), and {where}")


def precompile(isas: tuple[str, ...] = ISAS) -> list[Path]:
    """Build the libraries of ``isas`` and the torch binding with this machine's compiler, and copy
    each to its prebuilt name, so that a machine with the same sources, flags, torch and Python but
    no compiler loads them: ``deploy/precompile_kernels.py --cpu`` in the CPU image's build stage,
    whose cache the compiler-free runtime stage copies. Building an ISA needs only the compiler, not
    a CPU that runs it. Returns the prebuilt paths."""
    cxx = _compiler()
    pairs = [(build(isa), library_path(isa, None)) for isa in isas]
    pairs.append((_build_binding(cxx), binding_path(None)))
    for built, prebuilt in pairs:
        tmp = prebuilt.with_name(prebuilt.name + ".tmp")
        shutil.copy2(built, tmp)
        os.replace(tmp, prebuilt)  # atomic, as _build's own writes
    return [prebuilt for _, prebuilt in pairs]


def _build(path: Path, cxx: str, sources, flags: list[str], libs: list[str], what: str) -> Path:
    """``sources`` (in this folder) compiled with ``flags`` (in parallel) and linked with ``libs`` into
    the shared object ``path``, unless it exists; written atomically (a concurrent builder ends up
    with the same file). BuildError with the compiler's message if that fails."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        objects = [Path(tmp) / f"{Path(src).stem}.o" for src in sources]

        def compile_one(src_obj: tuple[str, Path]) -> subprocess.CompletedProcess:
            src, obj = src_obj
            cmd = [cxx, *flags, "-c", str(SOURCE_DIR / src), "-o", str(obj)]
            return subprocess.run(cmd, capture_output=True, text=True)

        with ThreadPoolExecutor(max_workers=len(sources)) as pool:
            runs = list(pool.map(compile_one, zip(sources, objects)))
        link = None
        if all(r.returncode == 0 for r in runs):
            out = Path(tmp) / path.name
            cmd = [cxx, *flags, "-shared", *map(str, objects), *libs, "-o", str(out)]
            link = subprocess.run(cmd, capture_output=True, text=True)
        failed = next((r for r in (*runs, link) if r is None or r.returncode != 0), None)
        if failed is not None:
            detail = "" if failed is None else (failed.stderr or failed.stdout)[-3000:]
            raise BuildError(f"building {what} with {cxx} failed:\n{detail}")
        os.replace(out, path)
    return path


# ----------------------------------------------------------------------------------- the torch binding
BINDING = "binding.cpp"
BINDING_MODULE = "kivi_cpu_binding"  # (binding.cpp PyInit_kivi_cpu_binding)


def _binding_flags() -> tuple[list[str], list[str]]:
    """Compiler and linker flags of :data:`BINDING`: torch's and Python's headers, torch's C++ ABI,
    linked against the torch libraries it uses (already loaded in any process that imports it)."""
    from torch.utils import cpp_extension

    abi = int(torch.compiled_with_cxx11_abi())
    includes = [f"-I{d}" for d in (*cpp_extension.include_paths(), sysconfig.get_paths()["include"])]
    # (-w: torch's own headers warn under some compilers; binding.cpp is small and read by hand)
    flags = ["-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-DNDEBUG", "-w"]
    flags += [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes]
    libs = [f"-L{d}" for d in cpp_extension.library_paths()] + ["-lc10", "-ltorch_cpu", "-ltorch_python"]
    return flags, libs


def binding_path(cxx: str | None) -> Path:
    """Where the torch binding built by ``cxx`` for this torch and Python lives in the cache; the hash
    covers its source, the shared header, the flags (so torch's install path), the compiler, torch's
    version and the interpreter's ABI tag. ``cxx=None``: its prebuilt copy's name (:func:`precompile`)."""
    flags, libs = _binding_flags()
    h = hashlib.sha256()
    for name in (HEADER, BINDING):
        h.update((SOURCE_DIR / name).read_bytes())
    h.update(" ".join((*flags, *libs, _compiler_key(cxx), torch.__version__)).encode())
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return cache_dir() / "kernels" / "cpu" / f"{BINDING_MODULE}-{h.hexdigest()[:16]}{suffix}"


def _build_binding(cxx: str) -> Path:
    flags, libs = _binding_flags()
    return _build(binding_path(cxx), cxx, (BINDING,), flags, libs, "the torch binding of the CPU decode call")


@functools.cache
def _load_binding():
    cxx = find_compiler()
    path = _prebuilt(binding_path(None)) if cxx is None else _build_binding(cxx)
    spec = importlib.util.spec_from_file_location(BINDING_MODULE, path)
    if spec is None or spec.loader is None:
        raise BuildError(f"{path} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.attend


@functools.cache
def _binding_failure() -> str | None:
    try:
        _load_binding()
    except (BuildError, OSError, ImportError) as exc:
        return str(exc)
    return None


def binding():
    """binding.cpp's ``attend`` (:class:`~kivi_serve.kernels.cpu.DecodeBatch`'s per-layer call with the
    tensors read in C++), built on first use; None (after one RuntimeWarning) where it cannot be
    built (e.g. no Python headers): the batch then fills the call from Python (~3 us more per call)."""
    reason = _binding_failure()
    if reason is None:
        return _load_binding()
    _warn_binding(reason)
    return None


@functools.cache
def _warn_binding(reason: str) -> None:
    warnings.warn(
        "kivi-serve: the torch binding of the C++ CPU decode call is unavailable, so every layer's call "
        f"is prepared in Python instead (a few microseconds slower per call). Reason: {reason}",
        RuntimeWarning,
        stacklevel=4,
    )


# ----------------------------------------------------------------------------------- loading
class Layout(ctypes.Structure):
    """kivi_cpu.h ``Layout``: the page's section offsets (-1 where a section is absent)."""

    _fields_ = [
        (name, ctypes.c_int32)
        for name in (
            "head_dim",
            "page_size",
            "k_bits",
            "v_bits",
            "exact",
            "outliers",
            "hi",
            "v_rotate",
            "v_pin_ends",
            "page_bytes",
            "k_plane0",
            "k_plane1",
            "v_plane0",
            "v_plane1",
            "k_lo",
            "k_scale",
            "v_lo",
            "v_scale",
            "k_cb",
            "v_cb",
            "exact_k",
            "exact_v",
            "exact_idx",
            "kout_val",
            "kout_idx",
            "wide_plane",
            "wide_cb",
            "wide_idx",
        )
    ]


_structs: dict[int, tuple[PageLayout, Layout, tuple[int, int, int, bool]]] = {}


def layout_struct(layout: PageLayout) -> Layout:
    """The C description of ``layout``, straight from its sections (the one definition of the format).

    Cached per layout object (by identity: hashing a dataclass costs more than the kernel call
    overhead we try to keep small)."""
    return layout_info(layout)[0]


def layout_info(layout: PageLayout) -> tuple[Layout, tuple[int, int, int, bool]]:
    """:func:`layout_struct` and ``(head_dim, page_size, page_bytes, 2-bit K and V)``, cached together
    (``page_bytes`` is a computed property: reading it on every call costs a microsecond)."""
    hit = _structs.get(id(layout))
    if hit is not None and hit[0] is layout:
        return hit[1], hit[2]
    struct = _layout_struct(layout)
    dims = (layout.head_dim, layout.page_size, layout.page_bytes, layout.k_bits == 2 and layout.v_bits == 2)
    _structs[id(layout)] = (layout, struct, dims)
    return struct, dims


@functools.cache
def _layout_struct(layout: PageLayout) -> Layout:
    off = {name: s.offset for name, s in layout.sections.items()}
    return Layout(
        *layout.params,
        layout.page_bytes,
        off["k_plane0"],
        off.get("k_plane1", -1),
        off["v_plane0"],
        off.get("v_plane1", -1),
        off["k_lo"],
        off["k_scale"],
        off["v_lo"],
        off["v_scale"],
        off["k_cb"],
        off["v_cb"],
        off.get("exact_k", -1),
        off.get("exact_v", -1),
        off.get("exact_idx", -1),
        off.get("kout_val", -1),
        off.get("kout_idx", -1),
        off.get("wide_plane", -1),
        off.get("wide_cb", -1),
        off.get("wide_idx", -1),
    )


#: Argument and result types of the C entry points, one letter per argument: L = ``Layout*``,
#: i = int, q = int64, f = float, p = pointer (a tensor's ``data_ptr()``); result "" = void.
_CTYPES = {
    "L": ctypes.POINTER(Layout),
    "i": ctypes.c_int,
    "q": ctypes.c_int64,
    "f": ctypes.c_float,
    "p": ctypes.c_void_p,
    "s": ctypes.c_char_p,
}
_SIGNATURES = {  # name: (arguments, result) — kept in step with the KIVI_API functions' declarations
    "kivi_isa": ("", "s"),
    "kivi_flush_denormals": ("ii", ""),
    "kivi_quantize_pages": ("Liipppppii", "i"),
    "kivi_dequantize_pages": ("Lipppii", "i"),
    # layout dtype key value T H staging S staging_dtype pages NB token_slots token_offsets |
    # evict: 4 p + n | finalize: 6 p + n | reopen: 2 p + n | uniform nthreads err
    "kivi_append": ("Lippiipiipqppppppippppppippiiip", "i"),
    # layout, argument blocks (decode.cpp PrepareArg: the step's metadata; RunArg: one layer's tensors),
    # scale / the plan (an opaque pointer) kivi_decode_prepare returns
    "kivi_decode": ("Lppf", "i"),
    "kivi_decode_prepare": ("Lpp", "p"),
    "kivi_decode_run": ("ppf", "i"),
    "kivi_decode_free": ("p", ""),
}


@functools.cache
def _load(isa: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build(isa)))
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = [_CTYPES[c] for c in args]
        fn.restype = _CTYPES[res] if res else None
    built = lib.kivi_isa().decode()
    if built != isa:
        raise BuildError(f"the {isa} library reports ISA {built!r}: the compiler ignored the ISA flags")
    return lib


@functools.cache
def _failure(isa: str) -> str | None:
    try:
        _load(isa)
    except (BuildError, OSError) as exc:
        return str(exc)
    return None


def unavailable_reason(isa: str | None = None) -> str | None:
    """Why the library of ``isa`` (default: the selected one) cannot be used, or None if it can."""
    return _failure(isa or selected_isa())


_MISSING = object()
_by_env: dict[str | bytes | None, ctypes.CDLL | None] = {}


def _isa_env() -> str | bytes | None:
    """``$KIVI_SERVE_CPU_ISA`` as a cache key, read on every kernel call (so a change takes effect
    at once): straight from ``os.environ``'s own dict where CPython has one (``os.environ.get``
    costs ~1 us, a noticeable share of a small decode call), else through ``os.environ.get``."""
    try:
        return os.environ._data.get(_ISA_KEY)  # type: ignore[attr-defined]
    except AttributeError:
        return os.environ.get(ENV_ISA)


try:
    _ISA_KEY = os.environ.encodekey(ENV_ISA)  # type: ignore[attr-defined]
except AttributeError:
    _ISA_KEY = ENV_ISA


def library(isa: str | None = None) -> ctypes.CDLL | None:
    """The loaded library of ``isa`` (default: :func:`selected_isa`), built on first use; None
    (after one RuntimeWarning) when it cannot be built here."""
    if isa is None:  # the per-call path: one dict lookup while KIVI_SERVE_CPU_ISA is unchanged
        env = _isa_env()
        lib = _by_env.get(env, _MISSING)
        if lib is _MISSING:
            lib = _by_env[env] = library(selected_isa())
        return lib
    reason = _failure(isa)
    if reason is not None:
        _warn_once(isa, reason)
        return None
    return _load(isa)


@functools.cache
def _warn_once(isa: str, reason: str) -> None:
    warnings.warn(
        f"kivi-serve: the C++ CPU kernels ({isa}) are unavailable, running the PyTorch reference "
        f"instead (much slower). Reason: {reason}",
        RuntimeWarning,
        stacklevel=4,
    )


def check(status: int, what: str, err: tuple[int, int] | None = None) -> None:
    """Raise a ValueError for a non-zero status of a C entry point."""
    if status == 0:
        return
    where = f" (sequence {err[0]}: {err[1]})" if err is not None and err[0] >= 0 else ""
    raise ValueError(f"{what}: {STATUS.get(status, f'error {status}')}{where}")


def num_threads() -> int:
    return max(1, torch.get_num_threads())
