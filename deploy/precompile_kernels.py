#!/usr/bin/env python3
"""Compile kivi-serve's CUDA kernels at image build time, so a container starts without compiling.

    python deploy/precompile_kernels.py --arch sm_80 --arch sm_90a [--backend nvrtc]
                                        [--mode required|auto|off] [--dry-run]

The build stage has no GPU; the kernels are compiled for the named architectures (NVRTC / nvcc
need no device for that) into kivi-serve's on-disk kernel cache (under ``$KIVI_SERVE_CACHE``,
and CuPy's under ``$CUPY_CACHE_DIR``), which the Dockerfile copies into the runtime image.

It uses the first entry point that exists, in this order, and says which:

1. the command ``kivi-serve kernels build --arch A [--arch B ...] [--backend X]``;
2. the function ``kivi_serve.kernels.loader.precompile(archs=[...], backend=X)``.

``--backend`` names the compiler (``auto``, ``nvcc``, ``nvrtc``). The loader keys its cache on the
compiler, and at run time it picks the compiler the container has: the GPU image compiles with
``nvrtc`` here because its runtime stage has NVRTC (and the CUDA headers) but no nvcc, so the
cubins built here are the ones the server looks up.

If neither exists, ``--mode required`` (the Dockerfile's default) fails the build with that
message, ``--mode auto`` prints it and succeeds (kernels then compile on first use and are cached
in the container), ``--mode off`` skips the step. ``--dry-run`` only prints what it would run.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import time
from collections.abc import Callable

CLI = [sys.executable, "-m", "kivi_serve.cli", "kernels", "build"]
LOADER = "kivi_serve.kernels.loader"
ARCH_RE = re.compile(r"^sm_[0-9]{2,3}a?$")


def say(message: str) -> None:
    print(f"[precompile_kernels] {message}", flush=True)


def cli_command(archs: list[str], backend: str) -> list[str] | None:
    """The ``kivi-serve kernels build`` command line, or None when the CLI has no such command."""
    probe = subprocess.run([*CLI, "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None
    extra = [] if backend == "auto" else ["--backend", backend]
    return [*CLI, *[arg for arch in archs for arg in ("--arch", arch)], *extra]


def loader_function() -> Callable[..., object] | None:
    """``kivi_serve.kernels.loader.precompile``, or None when the loader (or the function) is absent."""
    try:
        module = importlib.import_module(LOADER)
    except ModuleNotFoundError as exc:
        parts = LOADER.split(".")
        if exc.name in {".".join(parts[: i + 1]) for i in range(len(parts))}:
            return None
        raise  # the loader exists but needs something that is not installed: a real build error
    func = getattr(module, "precompile", None)
    return func if callable(func) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", required=True, help="target, e.g. sm_80 or sm_90a")
    parser.add_argument("--backend", choices=("auto", "nvcc", "nvrtc"), default="auto", help="compiler")
    parser.add_argument("--mode", choices=("required", "auto", "off"), default="required")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, compile nothing")
    args = parser.parse_args(argv)
    bad = [a for a in args.arch if not ARCH_RE.match(a)]
    if bad:
        parser.error(f"not a CUDA architecture: {', '.join(bad)} (expected e.g. sm_80, sm_90a)")
    if args.mode == "off":
        say("skipped (--mode off): kernels will compile on first use inside the container")
        return 0

    command = cli_command(args.arch, args.backend)
    if command is not None:
        say(f"compiling for {', '.join(args.arch)} with: {' '.join(command[1:])}")
        return 0 if args.dry_run else subprocess.run(command).returncode

    func = loader_function()
    if func is not None:
        call = f"{LOADER}.precompile(archs={args.arch!r}, backend={args.backend!r})"
        say(f"compiling for {', '.join(args.arch)} with: {call}")
        if not args.dry_run:
            start = time.monotonic()
            cubins = func(archs=list(args.arch), backend=args.backend)
            say(f"{len(cubins)} cubins in {time.monotonic() - start:.0f} s")
        return 0

    message = (
        "kivi-serve has no kernel precompilation entry point yet (neither `kivi-serve kernels build` "
        f"nor `{LOADER}.precompile`)"
    )
    if args.mode == "auto":
        say(f"{message}: continuing (--mode auto); kernels will compile on first use in the container")
        return 0
    say(f"{message}: failing (--mode required; build with --build-arg KIVI_SERVE_PRECOMPILE=auto to go on)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
