#!/usr/bin/env python3
"""Compile kivi-serve's kernels at image build time, so a container starts without compiling.

    python deploy/precompile_kernels.py --arch sm_80 --arch sm_90a [--backend nvrtc] [--dry-run]
    python deploy/precompile_kernels.py --cpu [--dry-run]

CUDA (``--arch``): the build stage has no GPU; :func:`kivi_serve.kernels.loader.precompile`
compiles the kernels for the named architectures (NVRTC / nvcc need no device for that) into
kivi-serve's on-disk kernel cache (under ``$KIVI_SERVE_CACHE``), which the Dockerfile copies into
the runtime image. ``--backend`` names the compiler (``auto``, ``nvcc``, ``nvrtc``). The loader keys
its cache on the compiler, and at run time it picks the compiler the container has: the GPU image
compiles with ``nvrtc`` here because its runtime stage has NVRTC (and the CUDA headers) but no
nvcc, so the cubins built here are the ones the server looks up.

CPU (``--cpu``): :func:`kivi_serve.kernels.cpu.loader.precompile` builds the C++ CPU kernels for
every ISA (AVX-512, AVX2, scalar: the host that runs the image may differ from the one that builds
it) and the torch binding of the decode call with the build stage's g++, and stores them under
compiler-independent names, which the compiler-free runtime stage loads (without them it would
fall back to the much slower PyTorch reference). ``--dry-run`` only prints the calls.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

ARCH_RE = re.compile(r"^sm_[0-9]{2,3}a?$")


def say(message: str) -> None:
    print(f"[precompile_kernels] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", default=[], help="CUDA target, e.g. sm_80 or sm_90a")
    parser.add_argument("--backend", choices=("auto", "nvcc", "nvrtc"), default="auto", help="CUDA compiler")
    parser.add_argument("--cpu", action="store_true", help="the C++ CPU kernels (every ISA)")
    parser.add_argument("--dry-run", action="store_true", help="print the calls, compile nothing")
    args = parser.parse_args(argv)
    if not args.arch and not args.cpu:
        parser.error("nothing to compile: give --arch (CUDA) and/or --cpu")
    bad = [a for a in args.arch if not ARCH_RE.match(a)]
    if bad:
        parser.error(f"not a CUDA architecture: {', '.join(bad)} (expected e.g. sm_80, sm_90a)")

    if args.arch:
        from kivi_serve.kernels.loader import precompile

        say(f"{precompile.__module__}.precompile(archs={args.arch!r}, backend={args.backend!r})")
        if not args.dry_run:
            start = time.monotonic()
            cubins = precompile(archs=list(args.arch), backend=args.backend)
            say(f"{len(cubins)} cubins in {time.monotonic() - start:.0f} s")
    if args.cpu:
        from kivi_serve.kernels.cpu import loader

        say(f"{loader.__name__}.precompile(isas={loader.ISAS!r})")
        if not args.dry_run:
            start = time.monotonic()
            paths = loader.precompile(loader.ISAS)
            names = ", ".join(p.name for p in paths)
            say(f"{len(paths)} CPU libraries in {time.monotonic() - start:.0f} s: {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
