"""``kivi-serve bench kernels``: our 2-bit paged decode against bf16 baselines, side by side.

    kivi-serve bench kernels [--scheme kivi-serve-2bit] [--page-sizes 64,128] [--batches 1,2,4,8]
                             [--contexts 1024,...,131072] [--iters 20] [--warmup 5]
                             [--out docs/bench/kernels] [--list]
    kivi-serve bench kernels --static [--json] [--configs 128:128:8,...]     (no GPU: predicted)
    kivi-serve bench kernels --device cpu [...]     (the C++ CPU kernels vs vLLM's CPU attention:
                                                     kivi_serve/bench/kernels_cpu.py, its own options)
    (or: python -m kivi_serve.bench.kernels ...)

``--static`` runs the static cost model of :mod:`kivi_serve.kernels.static_model` instead: it
compiles the decode kernel for sm_90a, counts its per-page SASS and predicts H100 figures, with no
GPU; its output is a prediction and says so. ``--list`` prints the cells a GPU run would measure.

Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head_dim 128), bf16, pages in the format
of ``--scheme`` (:func:`kivi_serve.quant.schemes.get_scheme`; default ``kivi-serve-2bit`` at pages 64
and 128; a scheme defined for one page size, as ``kivi-serve-2bit-p256`` and ``-p256-vr``, runs at
that page by default and refuses any other). For every (page size, batch, context) it times, with
CUDA events, after warm-up, with L2 flushed (a 256 MiB write) before every timed iteration, each
call captured in a CUDA graph and the replay timed (what vLLM's decode step pays: GPU time, not the
Python wrapper's host time; ``*_eager_ms`` columns time plain calls too):

* ``kivi``: :func:`kivi_serve.kernels.decode_attention.paged_attention` (split-KV kernel + combine)
  over quantized pages in randomly permuted blocks, with a half-full staging tail;
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with the flash backend over
  contiguous bf16 K and V (two tensors; GQA);
* ``paged_bf16``: vLLM's ``flash_attn_with_kvcache`` over a bf16 paged cache, when vLLM is installed.

It also measures a device-to-device copy (the bandwidth roofline), reports the bandwidth our
kernel achieves on the bytes it reads, and times the append of one decode step (tokens to
staging) and of a step that finalises one page per sequence. Writes ``<out>.json`` (GPU name,
shapes, every timing) and ``<out>.png``. Needs an NVIDIA GPU and CuPy.
"""

# The timed lambdas close over loop variables on purpose: each is run (and dropped) inside its iteration.
# ruff: noqa: B023
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path

from kivi_serve.quant.schemes import DEFAULT_SCHEME, SCHEMES, get_scheme

HQ, HKV, HEAD_DIM = 32, 8, 128
#: The schemes the decode kernels read (2-bit codes only; the CPU and CUDA kernels alike).
TWO_BIT_SCHEMES = [name for name, s in SCHEMES.items() if (s.k_bits, s.v_bits) == (2, 2)]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _timer(fn, iters: int, warmup: int, flush) -> float:
    """Median milliseconds of ``fn`` over ``iters`` runs, L2 flushed before each."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def _graph_timer(fn, iters: int, warmup: int, flush) -> float:
    """Median milliseconds of one replay of a CUDA graph of ``fn``, L2 flushed before each replay.

    What a serving step pays: vLLM replays decode in CUDA graphs, so the GPU time counts and the
    Python wrapper's host time (argument checks, launches: ~0.1 ms a call, measured on an H200) does
    not. ``fn`` runs ``warmup`` times on a side stream first (capture needs a warmed-up allocator)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = _timer(graph.replay, iters, warmup, flush)
    del graph
    return ms


def _copy_bandwidth(flush, iters: int) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written)."""
    import torch

    src = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _timer(lambda: dst.copy_(src), iters, 3, flush)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def _quantized_cache(layout, n_blocks: int, gen, codebook: str = "fitted"):
    """``n_blocks`` pages per KV head, quantized by our append kernel from random K/V."""
    import torch

    from kivi_serve.backend.staging import PageOps
    from kivi_serve.kernels import quantize_append

    P, D = layout.page_size, layout.head_dim
    template_pages = 64
    k = torch.randn(template_pages * P, HKV, D, generator=gen).to("cuda", torch.bfloat16)
    v = torch.randn(template_pages * P, HKV, D, generator=gen).to("cuda", torch.bfloat16)
    pages = torch.zeros(template_pages, HKV, layout.page_bytes, dtype=torch.uint8, device="cuda")
    staging = torch.zeros(1, 2, HKV, P, D, dtype=torch.bfloat16, device="cuda")

    class Plan:  # an AppendPlan that finalises `template_pages` whole pages from the input
        token_slots = torch.full((k.shape[0],), -1, dtype=torch.int32, device="cuda")
        token_offsets = torch.zeros(k.shape[0], dtype=torch.int32, device="cuda")
        evict = PageOps().to("cuda")
        reopen = PageOps().to("cuda")
        finalize = PageOps.of([(i, -1, P, i == 0, i * P, 0) for i in range(template_pages)]).to("cuda")

    quantize_append.append_kv(Plan, k, v, pages, staging, layout, codebook)
    reps = -(-n_blocks // template_pages)
    return pages.repeat(reps, 1, 1)[:n_blocks].contiguous()


def run(
    page_sizes,
    batches,
    contexts,
    iters: int,
    warmup: int,
    out: Path,
    vllm_baseline: bool = True,
    scheme: str = DEFAULT_SCHEME,
) -> dict:
    import torch

    from kivi_serve.backend import paged_bf16_decode
    from kivi_serve.kernels import decode_attention

    if not torch.cuda.is_available():
        raise RuntimeError("kivi-serve bench kernels needs an NVIDIA GPU")
    props = torch.cuda.get_device_properties(0)
    flush_buf = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    flush = flush_buf.zero_
    copy_gbs = _copy_bandwidth(flush, iters)
    flash_attn_with_kvcache = paged_bf16_decode() if vllm_baseline else None
    result = {
        "gpu": props.name,
        "measured": True,
        "scheme": scheme,
        "shapes": {"q_heads": HQ, "kv_heads": HKV, "head_dim": HEAD_DIM, "dtype": "bfloat16"},
        "copy_gbs": copy_gbs,
        "baselines": ["sdpa"] + (["paged_bf16"] if flash_attn_with_kvcache is not None else []),
        "rows": [],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    codebook = get_scheme(scheme).codebook
    for layout, B, ctx, n_pages in _grid(scheme, page_sizes, batches, contexts):
        P = layout.page_size
        seq_len = ctx + 1 - P // 2  # a half-full staging tail
        nb = 1 + B * n_pages
        pages = _quantized_cache(layout, nb, gen, codebook)
        perm = 1 + torch.randperm(nb - 1, generator=gen)
        tables = perm.view(B, n_pages).to("cuda", torch.int32)
        q = torch.randn(B, HQ, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        kn = torch.randn(B, HKV, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        staging = torch.randn(B, 2, HKV, P, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((B,), seq_len, dtype=torch.int32, device="cuda")
        one_each = torch.arange(B + 1, dtype=torch.int32, device="cuda")
        tails = torch.arange(B, dtype=torch.int32, device="cuda")  # sequence b's open page in slot b
        args = (q, kn, kn, pages, staging, tables, lens, one_each, tails, layout)
        out_t = torch.empty_like(q)
        ws = decode_attention.make_workspace(B, HQ, HEAD_DIM, decode_attention.MAX_SPLITS, "cuda")

        def kivi():
            return decode_attention.paged_attention(*args, out=out_t, workspace=ws)

        kivi_ms = _graph_timer(kivi, iters, warmup, flush)
        kivi_bytes = B * (seq_len // P) * HKV * layout.page_bytes + B * HKV * (seq_len % P) * HEAD_DIM * 4
        row = {"scheme": scheme, "page_size": P, "batch": B, "context": seq_len, "kivi_ms": kivi_ms,
               "kivi_eager_ms": _timer(kivi, iters, warmup, flush),
               "kivi_bytes": kivi_bytes, "kivi_gbs": kivi_bytes / (kivi_ms * 1e-3) / 1e9}  # fmt: skip
        del pages
        # separate K and V: with one tensor as both, each tile's V read hits L2 behind its K read and
        # the baseline streams half its bytes (measured on an H200: 0.96 vs 1.00 ms at batch 8 / 128K)
        kc = torch.randn(B, HKV, seq_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        qs = q.view(B, HQ, 1, HEAD_DIM)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(kc=kc, vc=vc, qs=qs):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qs, kc, vc, enable_gqa=True)

        row["sdpa_ms"] = _graph_timer(sdpa, iters, warmup, flush)
        row["sdpa_eager_ms"] = _timer(sdpa, iters, warmup, flush)
        row["bf16_bytes"] = 2 * kc.numel() * kc.element_size()
        del kc, vc
        if flash_attn_with_kvcache is not None:
            kcache = torch.randn(nb, P, HKV, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            vcache = torch.randn_like(kcache)
            qv = q.view(B, 1, HQ, HEAD_DIM)
            row["paged_bf16_ms"] = _graph_timer(
                lambda: flash_attn_with_kvcache(qv, kcache, vcache, cache_seqlens=lens, block_table=tables),
                iters, warmup, flush,
            )  # fmt: skip
            del kcache, vcache
        base = min(v for k, v in row.items() if k in ("sdpa_ms", "paged_bf16_ms"))
        row["speedup_vs_best_bf16"] = base / kivi_ms
        row["speedup_eager_vs_sdpa_eager"] = row["sdpa_eager_ms"] / row["kivi_eager_ms"]
        row["fraction_of_copy_bw"] = row["kivi_gbs"] / copy_gbs
        rows.append(row)
        print(json.dumps(row), flush=True)
        result["rows"] = rows
        # after every cell: a run cut short by a time limit still leaves what it measured
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    result["append"] = _append_times(scheme, page_sizes, iters, warmup, flush)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    try:
        _plot(result, out.with_suffix(".png"))
    except ImportError as exc:  # matplotlib missing: the JSON is the result, the plot a convenience
        print(f"bench kernels: no plot ({exc})", flush=True)
    return result


def _append_times(scheme: str, page_sizes, iters: int, warmup: int, flush) -> list[dict]:
    """Append time per layer: a decode step (tokens → staging) and a step finalising every sequence's page."""
    import torch

    from kivi_serve.backend.staging import StagingPool
    from kivi_serve.kernels import quantize_append

    res = []
    codebook = get_scheme(scheme).codebook
    for layout in _layouts(scheme, page_sizes):
        P = layout.page_size
        for B in (1, 8):
            pool = StagingPool(num_slots=B, page_size=P)
            tables = [[1 + b] for b in range(B)]
            pages = torch.zeros(1 + B, HKV, layout.page_bytes, dtype=torch.uint8, device="cuda")
            staging = torch.zeros(B, 2, HKV, P, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
            pool.plan(tables, [P - 1] * B, [P - 1] * B)
            k = torch.randn(B, HKV, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            fill = pool.plan(tables, [P] * B, [1] * B).to("cuda")  # every page becomes full
            pool2 = StagingPool(num_slots=B, page_size=P)
            pool2.plan(tables, [5] * B, [5] * B)
            plain = pool2.plan(tables, [6] * B, [1] * B).to("cuda")  # tokens → staging only
            res.append(
                {
                    "scheme": scheme,
                    "page_size": P,
                    "batch": B,
                    # (graph replays, as decode_step_ms's decode attention; the finalising step runs
                    # once per P steps and is timed eagerly, as before: it is not replayed on its own)
                    "decode_step_ms": _graph_timer(
                        lambda: quantize_append.append_kv(plain, k, k, pages, staging, layout, codebook),
                        iters,
                        warmup,
                        flush,
                    ),
                    "finalize_step_ms": _timer(
                        lambda: quantize_append.append_kv(fill, k, k, pages, staging, layout, codebook),
                        iters,
                        warmup,
                        flush,
                    ),
                }
            )
    return res


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    scheme = result.get("scheme", DEFAULT_SCHEME)
    for P in sorted({r["page_size"] for r in result["rows"]}):
        for B in sorted({r["batch"] for r in result["rows"]}):
            pts = [
                (r["context"], r["speedup_vs_best_bf16"])
                for r in result["rows"]
                if r["page_size"] == P and r["batch"] == B
            ]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"page {P}, batch {B}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("speed-up vs best bf16 baseline")
    ax.set_title(f"{scheme} decode, {result['gpu']} (32 q / 8 kv heads, hd 128)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_static(configs, jobs: int | None = None) -> dict:
    """The static cost model (:mod:`kivi_serve.kernels.static_model`) for ``configs``: compiled for
    sm_90a here, no GPU. Predicted figures, never measured ones."""
    from concurrent.futures import ThreadPoolExecutor

    from kivi_serve.kernels import static_model

    why = static_model.available()
    if why:
        raise RuntimeError(f"kivi-serve bench kernels --static cannot run here: {why}")
    with ThreadPoolExecutor(max_workers=jobs or min(4, os.cpu_count() or 1)) as pool:
        rows = list(pool.map(static_model.predict, configs))
    return {
        "model": "static (predicted, not measured)",
        "gpu": static_model.H100.name,
        "arch": static_model.ARCH,
        "assumptions": dataclasses.asdict(static_model.H100),
        "results": rows,
    }


def _print_static(result: dict) -> None:
    cols = ("head_dim", "page_size", "rows", "regs", "spill_bytes", "smem_bytes", "ctas_per_sm",
            "warps_per_sm", "sass_per_page", "inner_loops", "hmma_per_page", "bytes_per_page", "bound",
            "predicted_bw_fraction_h100", "predicted_bw_fraction_latency")  # fmt: skip
    print(f"static cost model for {result['gpu']} ({result['arch']}): PREDICTED, not measured")
    print("  ".join(cols))
    for r in result["results"]:
        print("  ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols))


def default_page_sizes(scheme: str) -> list[int]:
    """The pages a run measures without ``--page-sizes``: the scheme's own page size, else 64 and 128."""
    own = get_scheme(scheme).page_size
    return [own] if own else [64, 128]


def _layouts(scheme: str, page_sizes) -> list:
    """The page layout of ``scheme`` at head_dim 128 for every page size (``ValueError`` for a page size
    the scheme is not defined for, and for a scheme the decode kernel cannot read)."""
    if scheme not in TWO_BIT_SCHEMES:
        raise ValueError(f"scheme {scheme!r} is not one the 2-bit decode kernels read ({TWO_BIT_SCHEMES})")
    return [get_scheme(scheme).layout(HEAD_DIM, P) for P in page_sizes]


def _check_scheme_pages(parser: argparse.ArgumentParser, scheme: str, page_sizes) -> None:
    """A usage error (exit status 2) unless ``scheme`` is a 2-bit scheme defined at every page size."""
    try:
        _layouts(scheme, page_sizes)
    except ValueError as exc:
        parser.error(f"--scheme {scheme} at page size {','.join(map(str, page_sizes))}: {exc}")


def _grid(scheme: str, page_sizes, batches, contexts):
    """``(layout, batch, context, pages per sequence)`` of every cell, in the order a run measures them."""
    for layout in _layouts(scheme, page_sizes):
        for B in batches:
            for ctx in contexts:
                yield layout, B, ctx, -(-ctx // layout.page_size)


def kernel_specs(scheme: str, page_sizes) -> list:
    """The kernel configurations a run loads, to compile them ahead (``make gpu-check``): per page
    size, the quantizer and the decode kernel as :func:`run` launches them (bf16, bf16 staging rows,
    ``HQ / HKV`` query heads per KV head)."""
    from kivi_serve.kernels import loader

    return [
        loader.KernelSpec.for_layout(source, layout, "bfloat16", **extra)
        for layout in _layouts(scheme, page_sizes)
        for source, extra in (("quantize_append", {}), ("decode_attention", {"rows16": HQ // HKV > 8}))
    ]


def plan(page_sizes, batches, contexts, scheme: str = DEFAULT_SCHEME) -> list[dict]:
    """The (page size, batch, context) cells a run measures, in order, with the bytes each streams."""
    cells = []
    for layout, B, ctx, n_pages in _grid(scheme, page_sizes, batches, contexts):
        P = layout.page_size
        cells.append(
            {
                "scheme": scheme,
                "page_size": P,
                "batch": B,
                "context": ctx + 1 - P // 2,
                "pages": B * HKV * n_pages,
                "kivi_pool_mib": (1 + B * n_pages) * HKV * layout.page_bytes / 2**20,
                "bf16_kv_mib": 2 * B * HKV * ctx * HEAD_DIM * 2 / 2**20,
            }
        )
    return cells


def run_cli(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    device = "cuda"
    for i, a in enumerate(argv):
        if a == "--device" and i + 1 < len(argv):
            device = argv[i + 1]
            del argv[i : i + 2]
            break
        if a.startswith("--device="):
            device = a.split("=", 1)[1]
            del argv[i]
            break
    if device == "cpu":
        return _run_cpu_cli(argv)
    if device != "cuda":
        sys.stderr.write(f"kivi-serve bench kernels: --device must be cuda or cpu, got {device!r}\n")
        return 2
    parser = argparse.ArgumentParser(prog="kivi-serve bench kernels", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda", help="cpu: see --device cpu --help"
    )
    parser.add_argument(
        "--scheme", default=DEFAULT_SCHEME, choices=TWO_BIT_SCHEMES, help="page format (default %(default)s)"
    )
    parser.add_argument(
        "--page-sizes", type=_ints, default=None,
        help="default: the scheme's own page size (the p256 formats: 256), else 64,128",
    )  # fmt: skip
    parser.add_argument("--batches", type=_ints, default=[1, 2, 4, 8])
    parser.add_argument(
        "--contexts",
        type=_ints,
        default=[2**i for i in range(int(math.log2(1024)), int(math.log2(131072)) + 1)],
    )
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/kernels"))
    parser.add_argument(
        "--static",
        action="store_true",
        help="no GPU: the static cost model (compile for sm_90a, count SASS, predict H100 figures)",
    )
    parser.add_argument(
        "--json", action="store_true", help="--static: print one JSON object on the last line"
    )
    parser.add_argument(
        "--configs",
        default=None,
        help="--static: head_dim:page:rows,... (default: every default configuration)",
    )
    parser.add_argument("--jobs", type=int, default=None, help="--static: parallel compiles")
    parser.add_argument(
        "--no-vllm", action="store_true", help="skip vLLM's paged bf16 baseline (never import vLLM)"
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="print the cells a GPU run would measure (shapes, bytes) as JSON and exit; needs no GPU",
    )
    args = parser.parse_args(argv)
    if args.page_sizes is None:
        args.page_sizes = default_page_sizes(args.scheme)
    _check_scheme_pages(parser, args.scheme, args.page_sizes)
    if args.list:
        print(json.dumps({"cells": plan(args.page_sizes, args.batches, args.contexts, args.scheme)}))
        return 0
    if args.static:
        from kivi_serve.kernels import static_model

        configs = static_model.CONFIGS
        if args.configs:
            configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
            bad = [c for c in configs if c not in static_model.CONFIGS]
            if bad:
                parser.error(f"--configs: {bad} are not default configurations {static_model.CONFIGS}")
        result = run_static(configs, args.jobs)
        if args.json:
            print(json.dumps(result))
        else:
            _print_static(result)
        return 0
    run(
        args.page_sizes, args.batches, args.contexts, args.iters, args.warmup, args.out, not args.no_vllm,
        args.scheme,
    )  # fmt: skip
    return 0


def _chunks(text: str) -> list[tuple[int, int]]:
    """``"2048:0,1024:2048"`` → ``[(2048, 0), (1024, 2048)]`` (new tokens, context)."""
    out = []
    for part in filter(None, text.split(",")):
        n, _, ctx = part.partition(":")
        out.append((int(n), int(ctx or 0)))
    return out


def _run_cpu_cli(argv: list[str]) -> int:
    from kivi_serve.bench import kernels_cpu
    from kivi_serve.quant.staging import DEFAULT_STAGING_DTYPE, STAGING_DTYPES

    parser = argparse.ArgumentParser(
        prog="kivi-serve bench kernels --device cpu", description=kernels_cpu.__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--shapes", default=",".join(kernels_cpu.SHAPES), help="model shapes (comma separated)"
    )
    parser.add_argument("--batches", type=_ints, default=[1, 8, 32])
    parser.add_argument("--contexts", type=_ints, default=[1024, 4096, 16384])
    parser.add_argument("--threads", type=int, default=2, help="OpenMP threads for both kernels")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--scheme", default=DEFAULT_SCHEME, choices=TWO_BIT_SCHEMES, help="page format")
    parser.add_argument(
        "--page-size", type=int, default=None, help="default: the scheme's own page size (256), else 128"
    )
    parser.add_argument(
        "--staging", choices=STAGING_DTYPES, default=DEFAULT_STAGING_DTYPE,
        help="staging rows of the decode tail and of append (default: the backend's, int8)",
    )  # fmt: skip
    parser.add_argument("--reference-iters", type=int, default=3, help="timed runs of the PyTorch reference")
    parser.add_argument(
        "--prefill", type=_chunks, default=[(2048, 0), (1024, 2048)],
        help="prefill chunks N:CTX (N new tokens after CTX cached ones), comma separated; '' for none",
    )  # fmt: skip
    parser.add_argument("--no-decode", action="store_true", help="prefill rows only (no decode, no append)")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/kernels-cpu"))
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object, last line")
    args = parser.parse_args(argv)
    if args.page_size is None:
        args.page_size = get_scheme(args.scheme).default_page_size
    _check_scheme_pages(parser, args.scheme, [args.page_size])
    shapes = [s for s in args.shapes.split(",") if s]
    result = kernels_cpu.run(
        shapes, args.batches, args.contexts, args.threads, args.iters, args.warmup, args.page_size, args.out,
        args.reference_iters, prefill=args.prefill, decode=not args.no_decode, staging_dtype=args.staging,
        scheme=args.scheme,
    )  # fmt: skip
    if args.json:
        print(kernels_cpu.json_line(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli())
