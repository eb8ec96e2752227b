"""``kivi-serve bench {kernels,serve} [options]``: route to the benchmark that was asked for.

Each benchmark owns its options (``kivi-serve bench kernels --help``); this module only picks one
and imports it lazily, so ``bench serve`` never needs CuPy and ``bench kernels`` never needs vLLM.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "kernels": (
        "kivi_serve.bench.kernels",
        "decode attention and quantize-append vs bf16 baselines (GPU; --device cpu: vs vLLM CPU)",
    ),
    "serve": (
        "kivi_serve.bench.serve",
        "HTTP throughput, TTFT/TPOT, capacity: our backend vs vLLM's default",
    ),
}


def _usage() -> str:
    rows = "\n".join(f"  {name:<8} {help_}" for name, (_, help_) in BENCHMARKS.items())
    return f"usage: kivi-serve bench {{{','.join(BENCHMARKS)}}} [options]\n\nbenchmarks:\n{rows}\n"


def run_cli(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        sys.stderr.write(f"kivi-serve bench: unknown benchmark {name!r}\n{_usage()}")
        return 2
    module = importlib.import_module(BENCHMARKS[name][0])
    return int(module.run_cli(rest) or 0)
