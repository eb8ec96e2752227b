"""``make gpu-check OUT=dir``: everything a short GPU loan should run, in one command, in <= 8 minutes.

    python scripts/gpu_check.py OUT [--dry-run] [--tests-timeout 180] [--iters 10]

For a machine with an NVIDIA GPU, torch, CuPy and a CUDA compiler (nvcc, or NVRTC with the CUDA
headers) — **vLLM is not needed and is never imported**: every step runs with ``import vllm``
made to fail (``sys.modules["vllm"] = None``), so a step that would need it fails loudly instead of
quietly measuring something else. Steps, each bounded in time, each writing into ``OUT``:

1. ``preflight.json``: GPU name and compute capability, torch/CuPy versions, compilers, nvdisasm;
   then the kernel configurations the benchmarks load and the default ones are compiled for the
   GPU's arch on every core;
2. the GPU kernel tests (``pytest -m cuda tests/test_kernels_cuda.py``): ``gpu_tests.log``,
   ``gpu_tests.xml``;
3. ``kivi-serve bench kernels`` at the bar's shapes (Llama-3.1-8B attention: 32 query / 8 KV heads,
   head_dim 128, bf16; pages 128 and 64; batch 1 and 8; contexts 2K, 32K, 128K): CUDA events,
   warm-up, L2 flushed before every timed run, our kernel and the bf16 baseline (PyTorch's flash
   SDPA over contiguous K/V) timed side by side: ``kernels.json``, ``kernels.png``;
4. the same at page 256 in the long-context format with rotated values (``kivi-serve-2bit-p256-vr``,
   same batches and contexts): ``kernels-p256-vr.json``, ``kernels-p256-vr.png``;
5. when a compiler and nvdisasm are present, the static prediction (``static.json``) beside the
   measurement (pages 128, 64 and 256, 8 query rows);
6. ``summary.json``: what passed, and the bar of the decode-roofline issue checked against the
   measured ratios (``bar``: the default format; ``bar_p256_vr``: the same criteria on the p256-vr
   rows, for information), each line saying measured or not run.

``--dry-run`` does step 1 and prints the plan without touching a GPU (it runs anywhere: the tests of
this module use it). Exit status 0 only when every step that ran passed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The default format's pages (the bar's), then the long-context format at its 256-token page.
PAGE_SIZES = (128, 64)
LONG_SCHEME, LONG_PAGE_SIZES = "kivi-serve-2bit-p256-vr", (256,)
BATCHES = (1, 8)
CONTEXTS = (2048, 32768, 131072)
#: Seconds for the whole check (the loan has ~15 minutes in all, machine start included).
TOTAL_BUDGET_S = 480
#: Seconds per step (on an H200, 2026-11-30: precompile 26-34 s, GPU tests 160-173 s, each benchmark
#: 7 s, static model 12 s; docs/performance.md): the default format's benchmark gets what the others leave.
STEP_TIMEOUT_S = {"precompile": 90, "bench_kernels_p256_vr": 60, "static_model": 40}
#: ``import vllm`` fails in every step (a stand-in module set to None blocks the import).
NO_VLLM = "import sys; sys.modules['vllm'] = None; "


def preflight() -> dict:
    """What this machine has, without importing vLLM or touching a GPU beyond torch's query."""
    info: dict = {"python": platform.python_version(), "host": platform.node()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_available"] = bool(torch.cuda.is_available())
        if info["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = props.name
            info["capability"] = f"{props.major}.{props.minor}"
            info["sms"] = props.multi_processor_count
            info["memory_gib"] = round(props.total_memory / 2**30, 1)
    except Exception as exc:  # noqa: BLE001 — reported, not raised: preflight says what is missing
        info["torch"] = f"unavailable: {exc}"
        info["cuda_available"] = False
    info["cupy"] = _version("cupy-cuda13x") or _version("cupy-cuda12x") or _version("cupy")
    info["pytest"] = _version("pytest")
    info["matplotlib"] = _version("matplotlib")
    info["vllm_installed"] = importlib.util.find_spec("vllm") is not None  # find_spec does not import it
    missing = []
    try:
        from kivi_serve.kernels import loader, sass

        info["compilers"] = loader.available_backends()
        include = loader.cuda_include_dir()
        info["cuda_include"] = str(include) if include else None
        found = sass.find_disassembler()
        info["disassembler"] = found[1] if found else None
    except ImportError as exc:  # torch or numpy missing: kivi_serve itself cannot load
        info["compilers"], info["cuda_include"], info["disassembler"] = [], None, None
        missing.append(f"kivi_serve's imports ({exc})")
    if not info["cuda_available"]:
        missing.append("an NVIDIA GPU visible to torch")
    if not info["cupy"]:
        missing.append("CuPy (pip install cupy-cuda13x)")
    if not info["compilers"]:
        missing.append(
            "a CUDA compiler: nvcc (CUDA toolkit), or NVRTC (pip install nvidia-cuda-nvrtc) with the "
            "CUDA headers (KIVI_SERVE_CUDA_INCLUDE, or pip install nvidia-cuda-runtime)"
        )
    if not info["pytest"]:
        missing.append("pytest")
    info["missing"] = missing
    return info


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def bar(rows: list[dict]) -> list[dict]:
    """The decode-roofline bar checked against measured bench rows (``kernels.json`` "rows").

    Each item: the criterion, the cells it applies to, the worst measured value, and ``met``
    (None when no measured row applies). Contexts are matched by their nominal size (the bench
    runs ``context + 1 - P/2`` tokens: a half-full staging tail).
    """

    def nominal(r):
        return min(CONTEXTS + (1024, 4096, 8192, 16384, 65536), key=lambda c: abs(c - r["context"]))

    checks = [
        ("speed-up vs best bf16 >= 5.0 at batch 8, 32K", "speedup_vs_best_bf16", 5.0,
         lambda r: r["batch"] == 8 and nominal(r) == 32768),
        ("speed-up vs best bf16 >= 3.5 at batch 1, 128K", "speedup_vs_best_bf16", 3.5,
         lambda r: r["batch"] == 1 and nominal(r) == 131072),
        ("speed-up vs best bf16 >= 1.0 at every context <= 2K", "speedup_vs_best_bf16", 1.0,
         lambda r: nominal(r) <= 2048),
        ("fraction of copy bandwidth >= 0.8 at batch 8, 32K", "fraction_of_copy_bw", 0.8,
         lambda r: r["batch"] == 8 and nominal(r) == 32768),
    ]  # fmt: skip
    out = []
    for what, key, need, applies in checks:
        cells = [r for r in rows if applies(r) and key in r]
        worst = min((r[key] for r in cells), default=None)
        out.append(
            {
                "criterion": what,
                "cells": [
                    {"page_size": r["page_size"], "batch": r["batch"], "context": r["context"], key: r[key]}
                    for r in cells
                ],  # fmt: skip
                "worst": worst,
                "met": None if worst is None else worst >= need,
                "source": "measured" if cells else "not run",
            }
        )
    return out


def _run(cmd: list[str], log: Path, timeout: float) -> dict:
    start = time.monotonic()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        with log.open("w") as f:
            rc = subprocess.run(
                cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env
            ).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    return {"cmd": cmd, "rc": rc, "seconds": round(time.monotonic() - start, 1), "log": log.name}


def precompile_specs() -> list:
    """What the precompile step compiles, in order: the configurations the two benchmarks load, then
    the default ones (the GPU tests'), each once."""
    from kivi_serve.bench.kernels import DEFAULT_SCHEME, kernel_specs
    from kivi_serve.kernels import loader

    specs = kernel_specs(DEFAULT_SCHEME, PAGE_SIZES) + kernel_specs(LONG_SCHEME, LONG_PAGE_SIZES)
    return list(dict.fromkeys(specs + loader.default_specs()))


def plan(
    out: Path, iters: int, warmup: int, tests_timeout: float
) -> list[tuple[str, list[str], Path, float]]:
    """The steps after preflight: (name, command, log file, timeout in seconds)."""
    py = sys.executable
    cells = ["--batches", ",".join(map(str, BATCHES)), "--contexts", ",".join(map(str, CONTEXTS))]
    shapes = ["--page-sizes", ",".join(map(str, PAGE_SIZES)), *cells]
    long_shapes = ["--scheme", LONG_SCHEME, "--page-sizes", ",".join(map(str, LONG_PAGE_SIZES)), *cells]
    tests = [py, "-c", NO_VLLM + "import pytest; sys.exit(pytest.main(sys.argv[1:]))",
             "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_kernels_cuda.py",
             f"--junitxml={out / 'gpu_tests.xml'}"]  # fmt: skip
    bench_cli = NO_VLLM + "from kivi_serve.bench.kernels import run_cli; sys.exit(run_cli(sys.argv[1:]))"
    timing = ["--iters", str(iters), "--warmup", str(warmup), "--no-vllm"]
    bench = [py, "-c", bench_cli, *shapes, *timing, "--out", str(out / "kernels")]
    long_bench = [py, "-c", bench_cli, *long_shapes, *timing, "--out", str(out / "kernels-p256-vr")]
    configs = ",".join(f"128:{p}:8" for p in PAGE_SIZES + LONG_PAGE_SIZES)
    static = [py, "-c", bench_cli, "--static", "--json", "--configs", configs]
    # what the benchmarks load, then the default configurations (the tests'), for this GPU's arch,
    # compiled in parallel before anything needs them
    precompile = [py, "-c", NO_VLLM + "import os; from kivi_serve.kernels import loader; "
                  "from scripts.gpu_check import precompile_specs as specs; "
                  "loader.precompile([loader.device_arch(0)], specs(), jobs=os.cpu_count())"]  # fmt: skip
    t = STEP_TIMEOUT_S
    bench_timeout = TOTAL_BUDGET_S - tests_timeout - sum(t.values())
    return [
        ("precompile", precompile, out / "precompile.log", t["precompile"]),
        ("gpu_tests", tests, out / "gpu_tests.log", tests_timeout),
        ("bench_kernels", bench, out / "bench_kernels.log", bench_timeout),
        ("bench_kernels_p256_vr", long_bench, out / "bench_kernels_p256_vr.log", t["bench_kernels_p256_vr"]),
        ("static_model", static, out / "static_model.log", t["static_model"]),
    ]


def _rows(path: Path) -> list[dict]:
    """The measured rows of a benchmark's JSON (none when the step did not get to write it)."""
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make gpu-check OUT=dir", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the JSON, PNG and logs (created)")
    parser.add_argument("--dry-run", action="store_true", help="preflight and plan only; no GPU needed")
    parser.add_argument("--tests-timeout", type=float, default=180)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    info = preflight()
    (out / "preflight.json").write_text(json.dumps(info, indent=2))
    steps = plan(out, args.iters, args.warmup, args.tests_timeout)
    print(json.dumps({"preflight": info}, indent=2))
    if args.dry_run:
        print(
            json.dumps(
                {"dry_run": True, "steps": [{"name": n, "cmd": c, "timeout_s": t} for n, c, _, t in steps]}
            )
        )
        return 0
    if info["missing"]:
        print(f"gpu-check: cannot run here, missing: {'; '.join(info['missing'])}", file=sys.stderr)
        return 2
    summary: dict = {"gpu": info.get("gpu"), "preflight": "preflight.json", "steps": {}}
    for name, cmd, log, timeout in steps:
        if name == "static_model" and (not info["compilers"] or not info["disassembler"]):
            summary["steps"][name] = {"rc": "skipped", "why": "no compiler or no nvdisasm"}
            continue
        print(f"gpu-check: {name} (at most {timeout:.0f} s) ...", flush=True)
        res = _run(cmd, log, timeout)
        summary["steps"][name] = res
        print(f"gpu-check: {name} rc={res['rc']} in {res['seconds']} s (log: {log})", flush=True)
        if name == "static_model" and res["rc"] == 0:
            lines = log.read_text().strip().splitlines()
            (out / "static.json").write_text(lines[-1] if lines else "{}")
    summary["bar"] = bar(_rows(out / "kernels.json"))
    summary["bar_p256_vr"] = bar(_rows(out / "kernels-p256-vr.json"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({"bar": summary["bar"], "bar_p256_vr": summary["bar_p256_vr"]}, indent=2))
    ok = all(s["rc"] in (0, "skipped") for s in summary["steps"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
