"""Run the CUDA kernels on the CPU ("emulated on CPU") — the emulation mode of :mod:`loader`.

A kernel configuration (:class:`~kivi_serve.kernels.loader.KernelSpec`) is compiled with ``g++``
from the same ``cuda/*.cu`` file nvcc compiles, with ``-DKIVI_SIMT`` and the SIMT runtime in
``tests/simt/`` (header-only C++20: fibers for threads, barriers and warp collectives with real
semantics, the emulated PTX of ``cuda/kivi_ptx.cuh``), into a shared object cached next to the
cubins (``cache_dir()/kernels/simt-<source>-<mode>-<hash>.so``; the hash covers the kernel
source, its headers, the runtime, the defines, the flags and the compiler). Its kernels are
called exactly like CuPy's ``RawKernel``: ``kernel(grid, block, args, shared_mem=..., stream=...)``
with numpy scalars as arguments (pointers as ``np.uint64``: on CPU tensors they are host
addresses). The emulation is stricter than CuPy: every argument's dtype must be the kernel
parameter's (``np.int32`` for ``int``, ``np.int64`` for ``long long``, ``np.float32`` for ``float``,
``np.uint64`` for pointers), and a launch with more than 48 KiB of dynamic shared memory needs
``max_dynamic_shared_size_bytes`` set first, as on a GPU.

Modes:

* ``plain`` — ``-O2``: results, divergent barriers and collectives, deadlocks, faults, time limit;
* ``race`` — shared-memory race check (``-fsanitize=thread`` instrumentation, hooks implemented by
  the runtime: see ``tests/simt/simt_race.h``);
* ``asan`` — AddressSanitizer + UndefinedBehaviorSanitizer (out-of-bounds global and shared
  accesses, misaligned vector accesses). The process must preload the sanitizer runtimes:
  :func:`sanitizer_env` gives the environment for a subprocess.

Use it through :func:`kivi_serve.kernels.loader.emulate` (which imports this module lazily as
``tests.support.simt``: the repository root must be on ``sys.path``, as pyproject's pytest
``pythonpath`` puts it); it is test-only and not part of the package.
Environment: ``KIVI_SERVE_CXX`` (compiler, default ``g++``),
``KIVI_SERVE_SIMT_TIMEOUT`` (seconds per launch, default 300), ``KIVI_SERVE_SIMT_SEED`` (block and
thread scheduling order; 0 runs them in index order), ``KIVI_SERVE_SIMT_SOURCES`` (a directory that
replaces ``cuda/``: scripts/mutate_kernels.py runs the tests on modified kernels with it).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from kivi_serve.config import cache_dir
from kivi_serve.kernels import loader

RUNTIME_DIR = Path(__file__).resolve().parents[1] / "simt"
MODES = ("plain", "race", "asan")
#: What an emulated device reports: an H100 SXM's SM count and shared memory per block (opt-in).
SM_COUNT = 132
MAX_SMEM_OPTIN = 232448
DEFAULT_SMEM = 48 * 1024  # dynamic shared memory allowed without the opt-in attribute

_BASE_FLAGS = (
    "-std=c++20",
    "-fPIC",
    "-shared",
    "-g1",
    "-fvisibility=hidden",
    "-fvisibility-inlines-hidden",
    "-ffp-contract=off",  # no FMA contraction (the quantizer is bit-exact only without it)
    "-fno-strict-aliasing",  # the kernels type-pun through reinterpret_cast, as CUDA code does
    "-fno-fast-math",
    "-Wno-unknown-pragmas",  # #pragma unroll
    "-DKIVI_SIMT=1",
)
_MODE_FLAGS = {
    "plain": ("-O2",),
    "race": ("-O1", "-fsanitize=thread", "-DKIVI_SIMT_RACE=1"),
    "asan": ("-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"),
}
#: Parameter codes of tests/simt/simt_core.h → the numpy dtype an argument must have.
_PARAM_DTYPES = {
    "p": np.dtype(np.uint64),
    "i": np.dtype(np.int32),
    "u": np.dtype(np.uint32),
    "l": np.dtype(np.int64),
    "L": np.dtype(np.uint64),
    "f": np.dtype(np.float32),
    "d": np.dtype(np.float64),
}
_PARAM_NAMES = {
    "p": "pointer",
    "i": "int",
    "u": "unsigned",
    "l": "long long",
    "L": "unsigned long long",
    "f": "float",
    "d": "double",
}
_seeds = itertools.count(1)
_launch_lock = threading.Lock()


class SimtError(RuntimeError):
    """An emulated kernel failed: a fault, a divergent barrier or collective, a deadlock, a race
    (race mode), a time-out. The message names the kernel, the block, the thread and the place."""


class SimtUnavailable(RuntimeError):
    """No C++20 compiler, no CUDA headers, or no SIMT runtime (tests/simt) here."""


# ----------------------------------------------------------------------------------- toolchain
def compiler() -> str | None:
    """Path of the C++ compiler (``$KIVI_SERVE_CXX`` or ``g++``), or None."""
    return shutil.which(os.environ.get("KIVI_SERVE_CXX", "g++"))


@functools.cache
def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[
        0
    ]


def unavailable_reason() -> str | None:
    """Why the emulation cannot build here, or None if it can."""
    cxx = compiler()
    if cxx is None:
        return "no C++ compiler (g++ >= 12; or set KIVI_SERVE_CXX)"
    version = re.search(r"(\d+)\.\d+", _compiler_version(cxx))
    if "g++" in Path(cxx).name and version and int(version.group(1)) < 12:
        return f"g++ {version.group(1)} is too old: the SIMT runtime needs C++20 (g++ >= 12)"
    if loader.cuda_include_dir() is None:
        return "no CUDA headers (cuda_fp16.h): install the CUDA toolkit or set KIVI_SERVE_CUDA_INCLUDE"
    if not (RUNTIME_DIR / "kivi_simt.h").is_file():
        return f"the SIMT runtime is not here ({RUNTIME_DIR}: it ships with the repository's tests/)"
    return None


def _runtime_files() -> list[Path]:
    return sorted(RUNTIME_DIR.glob("*.h"))


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"emulation mode must be one of {MODES}, got {mode!r}")
    return mode


def so_path(spec: loader.KernelSpec, mode: str = "plain", source_dir: Path | None = None) -> Path:
    """Where the emulation object of ``spec`` lives in the cache (it may not exist yet)."""
    src_dir = Path(source_dir or loader.CUDA_DIR)
    return _so_path(src_dir / f"{spec.source}.cu", spec.defines(), mode)


def _so_path(source: Path, defines: list[str], mode: str) -> Path:
    _check_mode(mode)
    h = hashlib.sha256()
    parts = [source.read_bytes()]
    for name in loader.HEADERS:  # the source's own copy of a header first (-I order below)
        parts.append(
            (
                source.parent / name if (source.parent / name).is_file() else loader.CUDA_DIR / name
            ).read_bytes()
        )
    parts += [p.read_bytes() for p in _runtime_files()]
    parts += [" ".join(defines).encode(), " ".join(_BASE_FLAGS + _MODE_FLAGS[mode]).encode()]
    parts.append(_compiler_version(compiler() or "g++").encode())
    for part in parts:
        h.update(part)
        h.update(b"\0")
    return cache_dir() / "kernels" / f"simt-{source.stem}-{mode}-{h.hexdigest()[:20]}.so"


def _glue(source: Path, kernels: tuple[str, ...]) -> str:
    text = source.read_text()
    # `extern __shared__ [__align__(n)] TYPE NAME[];` — one array, aliased by every kernel of the file
    decls = set(
        re.findall(
            r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;", text
        )
    )
    if len({name for _, name in decls}) > 1:
        raise SimtUnavailable(
            f"{source.name}: the emulation supports one dynamic shared array name, found {decls}"
        )
    elem, smem = next(iter(decls)) if decls else ("unsigned char", "kivi_simt_no_dynamic_smem")
    table = ",\n    ".join(f'kivi_simt::make_kernel("{k}", &::{k})' for k in kernels)
    return f"""// generated by tests/support/simt.py
#include "kivi_simt.h"
#include "{source}"
alignas(16) thread_local {elem} {smem}[kivi_simt::kSmemCapacity / sizeof({elem})];
namespace kivi_simt {{
unsigned char* kivi_simt_dynamic_smem() {{ return reinterpret_cast<unsigned char*>(::{smem}); }}
const Kernel kivi_simt_kernel_table[] = {{
    {table}}};
const int kivi_simt_kernel_count = {len(kernels)};
}}  // namespace kivi_simt
"""


def build(spec: loader.KernelSpec, mode: str = "plain", source_dir: Path | None = None) -> Path:
    """Compile ``spec`` for the CPU (unless the cache has it); return the shared object's path.

    ``source_dir`` replaces ``cuda/`` (the mutation script and the tests that show a check fails
    build modified copies of the kernels).
    """
    src_dir = Path(source_dir or loader.CUDA_DIR)
    return build_source(src_dir / f"{spec.source}.cu", loader.KERNELS[spec.source], spec.defines(), mode)


def build_source(
    source: Path, kernels: tuple[str, ...], defines: list[str] = (), mode: str = "plain"
) -> Path:
    """Compile the ``extern "C"`` kernels ``kernels`` of any ``.cu`` file for the CPU (cached)."""
    reason = unavailable_reason()
    if reason:
        raise SimtUnavailable(reason)
    source = Path(source).resolve()
    defines = list(defines)
    path = _so_path(source, defines, mode)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    cxx = compiler()
    common = [
        *_BASE_FLAGS,
        *_MODE_FLAGS[mode],
        *defines,
        f"-I{RUNTIME_DIR}",
        f"-I{source.parent}",
        f"-I{loader.CUDA_DIR}",
        f"-I{loader.cuda_include_dir()}",
    ]
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        glue = Path(tmp) / "glue.cpp"
        glue.write_text(_glue(source, tuple(kernels)))
        out = Path(tmp) / "out.so"
        if mode == "race":  # instrument, but link without the ThreadSanitizer runtime (the hooks are ours)
            obj = Path(tmp) / "glue.o"
            steps = [
                [cxx, *[f for f in common if f != "-shared"], "-c", str(glue), "-o", str(obj)],
                [cxx, "-shared", "-Wl,-z,defs", str(obj), "-o", str(out)],
            ]
        else:
            steps = [[cxx, *common, str(glue), "-o", str(out)]]
        for cmd in steps:
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(
                    f"g++ failed for {source.name} {defines} ({mode}):\n{' '.join(cmd)}\n{run.stderr[-6000:]}"
                )
        os.replace(out, path)
    return path


# ----------------------------------------------------------------------------------- running
def _sanitizer_libs() -> list[str]:
    cxx = compiler() or "g++"
    libs = []
    for name in ("libasan.so", "libubsan.so"):
        p = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if p and Path(p).exists():
            libs.append(str(Path(p).resolve()))
    return libs


def sanitizer_env(base: dict | None = None) -> dict:
    """Environment for a subprocess that loads ``asan`` objects: the sanitizer runtimes preloaded,
    leak detection off (the Python interpreter is not leak-free), the first error fatal."""
    env = dict(os.environ if base is None else base)
    env["LD_PRELOAD"] = " ".join(_sanitizer_libs() + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86"
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1:exitcode=87"
    return env


_ASAN_MSG = (
    "asan mode needs the sanitizer runtimes preloaded: run the code in a subprocess started with "
    "tests.support.simt.sanitizer_env()"
)


def _asan_loaded() -> bool:
    try:
        return "libasan" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _dims(name: str, value) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) and int(d) >= 1 for d in dims):
        raise ValueError(f"{name} must be 1 to 3 positive ints, got {value!r}")
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


class EmulatedKernel:
    """One kernel of an emulation object, called like ``cupy.RawKernel`` (see the module doc)."""

    def __init__(self, lib: ctypes.CDLL, index: int, name: str, signature: str, path: Path) -> None:
        self._lib, self._index, self.name, self.signature, self._path = lib, index, name, signature, path
        #: CuPy's attribute: launches above 48 KiB of dynamic shared memory need it raised first.
        self.max_dynamic_shared_size_bytes = DEFAULT_SMEM

    def __repr__(self) -> str:
        return f"<EmulatedKernel {self.name}({self.signature}) from {self._path.name}>"

    def __call__(self, grid, block, args, *, shared_mem: int = 0, stream=None) -> None:
        dims = _dims("grid", grid) + _dims("block", block)
        if not isinstance(args, tuple):
            raise TypeError(f"{self.name}: args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self.signature):
            raise TypeError(f"{self.name} takes {len(self.signature)} arguments, got {len(args)}")
        values = []
        for i, (code, arg) in enumerate(zip(self.signature, args)):
            want = _PARAM_DTYPES[code]
            if not isinstance(arg, np.generic) or arg.dtype != want:
                got = f"{type(arg).__name__}" + (f" ({arg.dtype})" if hasattr(arg, "dtype") else "")
                raise TypeError(
                    f"{self.name} argument {i} is a {_PARAM_NAMES[code]}: pass np.{want.name}, got {got}"
                )
            values.append(ctypes.create_string_buffer(arg.tobytes(), want.itemsize))
        shared_mem = int(shared_mem)
        if shared_mem < 0 or shared_mem > self.max_dynamic_shared_size_bytes:
            raise SimtError(
                f"{self.name}: {shared_mem} bytes of dynamic shared memory exceed the kernel's limit of "
                f"{self.max_dynamic_shared_size_bytes} (raise max_dynamic_shared_size_bytes, at most "
                f"{MAX_SMEM_OPTIN}) — CUDA_ERROR_INVALID_VALUE on a GPU"
            )
        if stream not in (None, 0) and getattr(stream, "ptr", 0) != 0:
            raise ValueError(f"{self.name}: an emulated launch has no CUDA stream, got {stream!r}")
        argv = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.addressof(v) for v in values])
        err = ctypes.create_string_buffer(4096)
        seed = int(os.environ.get("KIVI_SERVE_SIMT_SEED", "-1"))
        seed = next(_seeds) if seed < 0 else seed
        timeout = float(os.environ.get("KIVI_SERVE_SIMT_TIMEOUT", "300"))
        with _launch_lock:  # one launch at a time per process (signal handlers are process-wide)
            rc = self._lib.kivi_simt_launch(
                self._index, (ctypes.c_uint * 6)(*dims), shared_mem, argv, seed, timeout, err, len(err)
            )
        if rc:
            message = _resolve_pcs(err.value.decode(errors="replace"), self._path)
            raise SimtError(f"{message} [scheduling seed {seed}]")


def _resolve_pcs(message: str, so: Path) -> str:
    """Replace "pc +0x..." in a message by its source line (addr2line; through inlined helpers, the
    innermost line and the first line in a kernel source file)."""
    pcs = re.findall(r"pc \+(0x[0-9a-f]+)", message)
    tool = shutil.which("addr2line")
    if not pcs or tool is None:
        return message
    run = subprocess.run([tool, "-a", "-i", "-e", str(so), *pcs], capture_output=True, text=True)
    chains: list[list[str]] = []
    for line in run.stdout.splitlines():
        if re.fullmatch(r"0x[0-9a-f]+", line.strip()):
            chains.append([])
        elif chains and not line.startswith("??"):
            chains[-1].append(Path(line.split(" ")[0]).name)
    for pc, chain in zip(pcs, chains):
        if not chain:
            continue
        where = chain[0]
        kernel = next((c for c in chain if re.search(r"\.cu(h)?:", c)), None)
        if kernel and kernel != where:
            where += f" in {kernel}"
        message = message.replace(f"pc +{pc}", f"{where} (pc +{pc})", 1)
    return message


def load_source(source: Path, kernels: tuple[str, ...], defines: list[str] = (), mode: str = "plain"):
    """Build and load the kernels of any ``.cu`` file: ``{name: EmulatedKernel}``."""
    _check_mode(mode)
    if mode == "asan" and not _asan_loaded():
        raise SimtUnavailable(_ASAN_MSG)
    return _load(build_source(source, kernels, defines, mode))


def _load(path: Path) -> dict[str, EmulatedKernel]:
    lib = ctypes.CDLL(str(path), mode=os.RTLD_NOW | os.RTLD_LOCAL)
    lib.kivi_simt_launch.restype = ctypes.c_int
    lib.kivi_simt_launch.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_uint),
        ctypes.c_uint,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_ulonglong,
        ctypes.c_double,
        ctypes.c_char_p,
        ctypes.c_int,
    ]
    lib.kivi_simt_kernel_name.restype = ctypes.c_char_p
    lib.kivi_simt_kernel_signature.restype = ctypes.c_char_p
    out = {}
    for i in range(lib.kivi_simt_num_kernels()):
        name = lib.kivi_simt_kernel_name(i).decode()
        out[name] = EmulatedKernel(lib, i, name, lib.kivi_simt_kernel_signature(i).decode(), path)
    return out


def module(spec: loader.KernelSpec, mode: str = "plain", source_dir: Path | None = None) -> loader.Module:
    """Build (or take from the cache) and load the emulation of ``spec``: a :class:`loader.Module`
    whose functions are :class:`EmulatedKernel` objects. ``source_dir`` (default:
    ``$KIVI_SERVE_SIMT_SOURCES``, else ``cuda/``) replaces the kernel sources."""
    source_dir = source_dir or os.environ.get("KIVI_SERVE_SIMT_SOURCES") or None
    return _module(spec, mode, Path(source_dir).resolve() if source_dir else None)


@functools.cache
def _module(spec: loader.KernelSpec, mode: str, source_dir: Path | None) -> loader.Module:
    import torch

    _check_mode(mode)
    if mode == "asan" and not _asan_loaded():
        raise SimtUnavailable(_ASAN_MSG)
    functions = _load(build(spec, mode, source_dir))

    def probe() -> tuple[int, int]:
        out = torch.zeros(2, dtype=torch.int32)
        functions[loader.KERNELS[spec.source][2]]((1,), (1,), (loader.ptr(out),))
        return int(out[0]), int(out[1])

    return loader.finish_module(spec, functions, probe, MAX_SMEM_OPTIN)


__all__ = [
    "MODES",
    "RUNTIME_DIR",
    "SM_COUNT",
    "EmulatedKernel",
    "SimtError",
    "SimtUnavailable",
    "build",
    "build_source",
    "compiler",
    "load_source",
    "module",
    "sanitizer_env",
    "so_path",
    "unavailable_reason",
]
