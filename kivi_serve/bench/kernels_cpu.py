"""``kivi-serve bench kernels --device cpu``: our C++ decode attention vs vLLM's own CPU attention.

    kivi-serve bench kernels --device cpu [--shapes smollm2-135m,llama-3.1-8b] [--batches 1,8,32]
                             [--contexts 1024,4096,16384] [--threads 2] [--iters 20] [--warmup 3]
                             [--scheme kivi-serve-2bit] [--page-size 128] [--staging int8]
                             [--prefill 2048:0,1024:2048] [--no-decode] [--out docs/bench/kernels-cpu]
                             [--json]

Pages in the format of ``--scheme`` (a 2-bit scheme of :mod:`kivi_serve.quant.schemes`; default
``kivi-serve-2bit`` at page 128, ``kivi-serve-2bit-p256`` and ``-p256-vr`` at their 256-token pages).
For every (model shape, batch, context), side by side in one process, on the same block tables:

* ``kivi``: one layer's decode as the backend runs it (:meth:`KernelExecutor.decode_step
  <kivi_serve.backend.executors.KernelExecutor.decode_step>`: the step's
  :class:`~kivi_serve.kernels.cpu.DecodeBatch`, made by the first call, then that layer's checks and
  the C++ kernel — the checks in C++ where the torch binding is built, ``kivi_binding`` in the JSON;
  query/key/value as row-strided views of one fused qkv tensor, as vLLM hands them over) over 2-bit
  pages (quantized by our CPU append kernel from LLM-like random K/V, in randomly permuted blocks)
  with a half-full staging tail (``--staging``: the backend's default ``int8`` rows, or ``model``:
  bf16 rows) and the new token;
* ``baseline``: vLLM's ``cpu_attention_with_kv_cache`` (the op of its ``CPU_ATTN`` backend, through
  :func:`kivi_serve.backend.paged_bf16_decode_cpu`) over a bf16 paged cache of the same shape,
  with the scheduler metadata its metadata builder would make (built once, outside the timing).

The once-per-step parts, outside those timings on both sides, are timed on their own:
``kivi_prepare_ms`` (a new DecodeBatch: its checks and packing, shared by every layer of the step)
and ``baseline_prepare_ms`` (vLLM's ``cpu_attention_get_scheduler_metadata``).

Both attend ``seq_len = context - page_size / 2`` tokens per sequence (so our last page is a
staged tail). Timing: wall clock, the two kernels interleaved call by call (so load from other
jobs hits both alike), ``--iters`` pairs after ``--warmup``; the headline is the minimum (the
least disturbed run), ``speedup = baseline / kivi``; the medians and ``speedup_median`` are kept
too. Both run with
``--threads`` OpenMP threads (torch's pool, which both use) and with denormals flushed in every
thread: vLLM's kernel runs ~20x slower whenever its scratch memory happens to hold denormals
(measured), which would make the comparison depend on the process's history.

Append, per layer: a decode step (B tokens into staging; baseline: vLLM's ``cpu_attn_reshape_and_cache``
of B tokens), a step where every sequence's page fills (B x Hkv pages quantized), and one page
quantized by the C++ kernel vs by the PyTorch reference (``reference.append_kv``).

Prefill attention, per layer (``--prefill N:CTX,...``: a chunk of N new tokens after CTX cached ones, one
sequence; the default is a 3K-token prompt's two chunks under vLLM's 2,048-token step budget):

* ``kivi``: what the backend's prefill does on the CPU for a plain layer — the C++ dequantize of the
  context pages (plus the spare pages the own tokens open) and :func:`kivi_serve.backend.prefill_cpu.attend`
  (own tokens into the scratch, vLLM's layout, vLLM's CPU attention op);
* ``sdpa``: the path it replaced — the same dequantize, then torch SDPA over (context + own tokens) with
  an explicit mask (no mask and ``is_causal`` without context);
* ``baseline``: vLLM's CPU attention op over a bf16 paged cache already holding the context and the
  chunk (what the default backend runs; its cache write is append, as our quantize is).

Timed like decode (interleaved wall clock with ``--threads``, and one thread on its CPU clock), with
fewer rounds (each call takes tens of milliseconds).

Writes ``<out>.json`` (CPU model, load, every timing) and ``<out>.png``; ``--json`` prints
``{"results": [{"model_shape", "batch", "context", "head_dim", "kivi_ms", "baseline_ms", "speedup"}]}``
as the last line.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

from kivi_serve.quant.schemes import DEFAULT_SCHEME

#: name -> (query heads, KV heads, head_dim)
SHAPES = {"smollm2-135m": (9, 3, 64), "llama-3.1-8b": (32, 8, 128)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


#: Interleaved rounds go on past ``iters`` while a case has used less than this many seconds (up
#: to MAX_ROUNDS): short kernels get hundreds of tries, so the minimum finds an undisturbed one.
BUDGET_S = 2.0
MAX_ROUNDS = 300


def _interleaved(
    fns: dict, iters: int, warmup: int, clock=time.perf_counter, budget_s: float = BUDGET_S
) -> dict[str, dict[str, float]]:
    """Milliseconds of each function on ``clock``, called in turn (``iters`` rounds or more, while
    under ``budget_s`` seconds: see BUDGET_S) after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start, rounds = time.perf_counter(), 0
    while rounds < iters or (rounds < MAX_ROUNDS and time.perf_counter() - start < budget_s):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append((clock() - t0) * 1e3)
        rounds += 1
    return {
        n: {"min_ms": min(t), "median_ms": statistics.median(t), "runs": len(t)} for n, t in times.items()
    }


def _one_thread_cpu(fns: dict, iters: int, warmup: int, budget_s: float = BUDGET_S) -> dict[str, dict]:
    """The same on one thread, timed with the calling thread's CPU clock: time the thread spent
    descheduled by other jobs does not count, so this ratio is the load-independent cross-check."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _interleaved(fns, iters, warmup, clock=time.thread_time, budget_s=budget_s)
    finally:
        torch.set_num_threads(threads)


def _kv_tokens(n: int, heads: int, dim: int, gen):
    """Keys and values with LLM-like structure (channel offsets, outlier channels), bf16."""
    import torch

    k = torch.randn(n, heads, dim, generator=gen) + torch.randn(1, heads, dim, generator=gen) * 2
    k[:, :, :: max(1, dim // 8)] *= 6.0
    v = torch.randn(n, heads, dim, generator=gen)
    return k.to(torch.bfloat16), v.to(torch.bfloat16)


def _template_pages(layout, heads: int, n: int, gen, codebook: str = "fitted"):
    """``n`` pages per KV head quantized by the CPU append kernel: (n, heads, page_bytes) uint8."""
    import torch

    from kivi_serve.backend.staging import AppendPlan, PageOps
    from kivi_serve.kernels import cpu

    P = layout.page_size
    k, v = _kv_tokens(n * P, heads, layout.head_dim, gen)
    pages = torch.zeros(n, heads, layout.page_bytes, dtype=torch.uint8)
    staging = torch.zeros(1, 2, heads, P, layout.head_dim, dtype=torch.bfloat16)
    none = torch.full((n * P,), -1, dtype=torch.int32)
    fin = PageOps.of([(i, -1, P, i == 0, i * P, 0) for i in range(n)])
    plan = AppendPlan(
        none, torch.zeros_like(none), PageOps(), fin, PageOps(), torch.zeros(0, dtype=torch.int32)
    )
    cpu.append_kv(plan, k, v, pages, staging, layout, codebook)
    return pages


def bench_decode(
    name: str,
    B: int,
    context: int,
    P: int,
    iters: int,
    warmup: int,
    baseline,
    gen,
    staging_dtype: str = "int8",
    scheme: str = DEFAULT_SCHEME,
) -> dict:
    import torch

    from kivi_serve.backend.executors import KernelExecutor
    from kivi_serve.kernels import cpu
    from kivi_serve.quant import staging as staging_format
    from kivi_serve.quant.codec import make_codec

    Hq, H, D = SHAPES[name]
    codec = make_codec(D, P, torch.bfloat16, scheme=scheme)  # the scheme's pages, as the backend's
    layout, codebook = codec.layout, codec.codebook
    seq_len = context - P // 2
    n_pages = -(-seq_len // P)
    NB = 1 + B * n_pages
    tmpl = _template_pages(layout, H, 32, gen, codebook)
    pages = tmpl.repeat(-(-NB // tmpl.shape[0]), 1, 1)[:NB].contiguous()
    tables = (1 + torch.randperm(NB - 1, generator=gen)).view(B, n_pages).to(torch.int32)
    q = torch.randn(B, Hq, D, generator=gen).to(torch.bfloat16)
    kn, vn = _kv_tokens(B, H, D, gen)
    # what the backend gets from vLLM: row-strided views of one fused (T, (Hq + 2 Hkv) * D) tensor
    qkv = torch.cat([q.view(B, -1), kn.view(B, -1), vn.view(B, -1)], dim=1)
    qv, kv, vv = (x.view(B, -1, D) for x in qkv.split([Hq * D, H * D, H * D], dim=1))
    staging = staging_format.new_staging(B, H, P, D, torch.bfloat16, staging_dtype)
    tail = seq_len - 1 - (n_pages - 1) * P
    tk, tv = _kv_tokens(B * tail, H, D, gen)
    rows = slice(None), slice(None), slice(None), slice(0, tail)  # (slot, K/V, head, token)
    staging_format.store(staging, rows, torch.stack([tk, tv]).view(2, B, tail, H, D).permute(1, 0, 3, 2, 4))
    seq_lens = torch.full((B,), seq_len, dtype=torch.int32)
    qsl = torch.arange(B + 1, dtype=torch.int32)
    tails = torch.arange(B, dtype=torch.int32)
    out = torch.empty_like(q)
    executor = KernelExecutor(codec, cpu)
    step = SimpleNamespace(  # the fields of the step's KiviMetadata that decode reads
        num_decodes=B, block_table=tables, seq_lens=seq_lens, query_start_loc=qsl, tail_slots=tails,
        decode_batch=None,
    )  # fmt: skip
    scale = D**-0.5
    fns = {"kivi": lambda: executor.decode_step(step, qv, kv, vv, pages, staging, scale, out)}
    row = {
        "model_shape": name,
        "batch": B,
        "context": context,
        "seq_len": seq_len,
        "head_dim": D,
        "q_heads": Hq,
        "kv_heads": H,
        "page_size": P,
        "scheme": scheme,
        "staging_dtype": staging_dtype,
    }
    cache = None
    if baseline is not None:
        cache = torch.empty(NB, H, P, 2 * D, dtype=torch.bfloat16)
        cache.copy_(torch.randn(1, H, P, 2 * D, generator=gen).to(torch.bfloat16).expand_as(cache))
        key_cache, value_cache = cache.view(NB, H, 2 * P, D).chunk(2, dim=2)
        isa = baseline.isa(torch.bfloat16, P, D)
        metas = {}  # vLLM's scheduler metadata is made for one thread count (built in the warm-up)

        def baseline_prepare():
            return baseline.scheduler_metadata(
                num_reqs=B, num_heads=Hq, num_kv_heads=H, head_dim=D, seq_lens=seq_lens, dtype=torch.bfloat16,
                query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=True,
            )  # fmt: skip

        def run_baseline():
            n = torch.get_num_threads()
            if n not in metas:
                metas[n] = baseline_prepare()
            baseline.attention(
                query=q, key_cache=key_cache, value_cache=value_cache, output=out_b, query_start_loc=qsl,
                seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
                block_table=tables, softcap=0.0, scheduler_metadata=metas[n], s_aux=None,
            )  # fmt: skip

        out_b = torch.empty_like(q)
        fns["baseline"] = run_baseline
        row["baseline_isa"] = isa
    t = _interleaved(fns, iters, warmup)
    assert isinstance(step.decode_batch, cpu.DecodeBatch)  # made once, by the first call
    row["kivi_binding"] = step.decode_batch.via_binding  # the layer's call read in C++ (else Python)
    prep = {"kivi": lambda: cpu.DecodeBatch(tables, seq_lens, qsl, tails, layout, pages, staging)}
    if baseline is not None:
        prep["baseline"] = baseline_prepare
    for name_, timing in _interleaved(prep, iters, warmup, budget_s=0.2).items():
        row[f"{name_}_prepare_ms"] = timing["min_ms"]
    row["kivi_ms"], row["kivi_median_ms"] = t["kivi"]["min_ms"], t["kivi"]["median_ms"]
    row["runs"] = t["kivi"]["runs"]
    step.decode_batch = None  # made again by the warm-up, for one thread (its splits)
    t1 = _one_thread_cpu(fns, max(3, iters // 4), 1)
    row["kivi_cpu1_ms"], row["kivi_cpu1_median_ms"] = t1["kivi"]["min_ms"], t1["kivi"]["median_ms"]
    row_bytes = staging_format.slot_bytes(staging_dtype, D, P, 1, torch.bfloat16) // (2 * P)
    row["kivi_bytes"] = B * H * ((n_pages - 1) * layout.page_bytes + tail * 2 * row_bytes)
    if "baseline" in t:
        row["baseline_ms"], row["baseline_median_ms"] = t["baseline"]["min_ms"], t["baseline"]["median_ms"]
        row["baseline_bytes"] = B * H * seq_len * 2 * D * 2
        row["speedup"] = row["baseline_ms"] / row["kivi_ms"]
        row["speedup_median"] = row["baseline_median_ms"] / row["kivi_median_ms"]
        row["baseline_cpu1_ms"] = t1["baseline"]["min_ms"]
        row["baseline_cpu1_median_ms"] = t1["baseline"]["median_ms"]
        row["speedup_cpu1"] = row["baseline_cpu1_ms"] / row["kivi_cpu1_ms"]
        row["speedup_cpu1_median"] = row["baseline_cpu1_median_ms"] / row["kivi_cpu1_median_ms"]
    return row


def bench_prefill(
    name: str, n: int, ctx: int, P: int, iters: int, baseline, gen, scheme: str = DEFAULT_SCHEME
) -> dict:
    """Per layer: one sequence's chunk of ``n`` tokens after ``ctx`` cached ones (bf16), three ways."""
    import torch
    import torch.nn.functional as F

    from kivi_serve.backend import prefill_cpu
    from kivi_serve.kernels import cpu
    from kivi_serve.quant.codec import make_codec

    Hq, H, D = SHAPES[name]
    codec = make_codec(D, P, torch.bfloat16, scheme=scheme)  # the scheme's pages, as the backend's
    layout, codebook = codec.layout, codec.codebook
    dt = torch.bfloat16
    n_ctx = -(-ctx // P)
    tmpl = _template_pages(layout, H, 32, gen, codebook)
    pages = tmpl.repeat(-(-(1 + n_ctx) // tmpl.shape[0]), 1, 1)[: 1 + n_ctx].contiguous()
    blocks = (1 + torch.randperm(n_ctx, generator=gen)).to(torch.int32)
    q = torch.randn(n, Hq, D, generator=gen).to(dt)
    k, v = _kv_tokens(n, H, D, gen)
    pp = prefill_cpu.plan_paged_prefill([(0, n, ctx, 0, 0)], n_ctx, P)
    scratch_blocks = torch.cat([blocks, blocks.new_full((pp.num_spare,), -1)])
    out = torch.empty_like(q)
    scale = D**-0.5

    def kivi():
        kc, vc = cpu.dequantize_blocks(pages, scratch_blocks, layout, dt)
        prefill_cpu.attend(pp, q, k, v, kc, vc, scale, out)

    def sdpa():
        kc, vc = cpu.dequantize_blocks(pages, blocks, layout, dt)
        keys = torch.cat([kc.transpose(1, 2).reshape(-1, H, D)[:ctx], k])
        values = torch.cat([vc.transpose(1, 2).reshape(-1, H, D)[:ctx], v])
        mask = torch.arange(ctx + n).unsqueeze(0) <= (ctx + torch.arange(n)).unsqueeze(1)
        heads_first = [x.transpose(0, 1).unsqueeze(0) for x in (q, keys, values)]
        o = F.scaled_dot_product_attention(
            *heads_first, attn_mask=mask if ctx else None, is_causal=not ctx, scale=scale, enable_gqa=True
        )
        out.copy_(o[0].transpose(0, 1))

    fns = {"kivi": kivi, "sdpa": sdpa}
    row = {"model_shape": name, "new_tokens": n, "context": ctx, "head_dim": D, "q_heads": Hq, "kv_heads": H}
    if baseline is not None:
        NB = 1 + -(-(ctx + n) // P)
        key_cache = torch.zeros(NB, H, P, D, dtype=dt)
        value_cache = torch.zeros_like(key_cache)
        isa = baseline.isa(dt, P, D)
        ck, cv = _kv_tokens(ctx, H, D, gen)
        baseline.reshape_and_cache(
            torch.cat([ck, k]), torch.cat([cv, v]), key_cache, value_cache, torch.arange(P, P + ctx + n), isa
        )
        table = torch.arange(1, NB, dtype=torch.int32).unsqueeze(0)
        seq_lens = torch.tensor([ctx + n], dtype=torch.int32)
        qsl = torch.tensor([0, n], dtype=torch.int32)
        metas = {}
        out_b = torch.empty_like(q)

        def run_baseline():
            t = torch.get_num_threads()
            if t not in metas:
                metas[t] = baseline.scheduler_metadata(
                    num_reqs=1, num_heads=Hq, num_kv_heads=H, head_dim=D, seq_lens=seq_lens, dtype=dt,
                    query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=True,
                )  # fmt: skip
            baseline.attention(
                query=q, key_cache=key_cache, value_cache=value_cache, output=out_b, query_start_loc=qsl,
                seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
                block_table=table, softcap=0.0, scheduler_metadata=metas[t], s_aux=None,
            )  # fmt: skip

        fns["baseline"] = run_baseline
        row["baseline_isa"] = isa
    wall = _interleaved(fns, iters, 1, budget_s=0.0)
    cpu1 = _one_thread_cpu(fns, iters, 1, budget_s=0.0)
    for name_, t in wall.items():
        row[f"{name_}_ms"] = t["min_ms"]
        row[f"{name_}_cpu1_ms"] = cpu1[name_]["min_ms"]
    if baseline is not None:
        row["speedup"] = row["baseline_ms"] / row["kivi_ms"]
        row["speedup_cpu1"] = row["baseline_cpu1_ms"] / row["kivi_cpu1_ms"]
    row["speedup_vs_sdpa_cpu1"] = row["sdpa_cpu1_ms"] / row["kivi_cpu1_ms"]
    return row


def bench_append(
    name: str,
    B: int,
    P: int,
    iters: int,
    warmup: int,
    baseline,
    gen,
    ref_iters: int,
    staging_dtype: str = "int8",
    scheme: str = DEFAULT_SCHEME,
) -> dict:
    """Per layer: a decode step (B tokens to staging), a step where B pages fill, one page vs the
    PyTorch reference."""
    import torch

    from kivi_serve.backend.staging import StagingPool
    from kivi_serve.kernels import cpu, reference
    from kivi_serve.quant import staging as staging_format
    from kivi_serve.quant.codec import make_codec

    Hq, H, D = SHAPES[name]
    codec = make_codec(D, P, torch.bfloat16, scheme=scheme)  # the scheme's pages, as the backend's
    layout, codebook = codec.layout, codec.codebook
    tables = [[1 + b] for b in range(B)]
    pages = torch.zeros(1 + B, H, layout.page_bytes, dtype=torch.uint8)
    staging = staging_format.new_staging(B, H, P, D, torch.bfloat16, staging_dtype)
    k, v = _kv_tokens(B * (P - 1), H, D, gen)
    pool = StagingPool(num_slots=B, page_size=P)
    cpu.append_kv(pool.plan(tables, [P - 1] * B, [P - 1] * B), k, v, pages, staging, layout, codebook)
    kn, vn = _kv_tokens(B, H, D, gen)
    fill = pool.plan(tables, [P] * B, [1] * B)  # every page becomes full: B * H pages quantized
    pool2 = StagingPool(num_slots=B, page_size=P)
    pool2.plan(tables, [5] * B, [5] * B)
    plain = pool2.plan(tables, [6] * B, [1] * B)  # tokens -> staging only
    fns = {
        "decode_step": lambda: cpu.append_kv(plain, kn, vn, pages, staging, layout, codebook),
        "finalize_step": lambda: cpu.append_kv(fill, kn, vn, pages, staging, layout, codebook),
    }
    if baseline is not None:
        cache = torch.zeros(1 + B, H, P, 2 * D, dtype=torch.bfloat16)
        key_cache, value_cache = cache.view(1 + B, H, 2 * P, D).chunk(2, dim=2)
        slots = torch.tensor([(1 + b) * P + 5 for b in range(B)], dtype=torch.int64)
        isa = baseline.isa(torch.bfloat16, P, D)
        fns["baseline_decode_step"] = lambda: baseline.reshape_and_cache(
            kn, vn, key_cache, value_cache, slots, isa
        )
    t = _interleaved(fns, iters, warmup)
    row = {"model_shape": name, "batch": B, "head_dim": D, "kv_heads": H, "page_size": P, "scheme": scheme}
    row["staging_dtype"] = staging_dtype
    for k_, v_ in t.items():
        row[f"{k_}_ms"] = v_["min_ms"]
    row["finalize_per_page_ms"] = row["finalize_step_ms"] / (B * H)
    if ref_iters:  # one page of every KV head, C++ vs the PyTorch reference (same plan, same threads)
        one = StagingPool(num_slots=1, page_size=P)
        one.plan([[1]], [P - 1], [P - 1])
        plan1 = one.plan([[1]], [P], [1])
        pages1, staging1 = pages[:2].clone(), staging[:1].clone()
        page_fns = {
            "cpp": lambda: cpu.append_kv(plan1, kn[:1], vn[:1], pages1, staging1, layout, codebook),
            "reference": lambda: reference.append_kv(plan1, kn[:1], vn[:1], pages1, staging1, codec),
        }
        # (re-finalising the same page each time: the plan only reads the slot and the input)
        for label, timing in (("", _interleaved(page_fns, ref_iters, 1)),
                              ("_cpu1", _one_thread_cpu(page_fns, ref_iters, 1))):  # fmt: skip
            row[f"page_cpp{label}_ms"] = timing["cpp"]["min_ms"] / H
            row[f"page_reference{label}_ms"] = timing["reference"]["min_ms"] / H
            row[f"page_speedup_vs_reference{label}"] = (
                row[f"page_reference{label}_ms"] / row[f"page_cpp{label}_ms"]
            )
    return row


def run(
    shapes,
    batches,
    contexts,
    threads: int,
    iters: int,
    warmup: int,
    page_size: int,
    out: Path,
    ref_iters: int = 3,
    prefill: tuple = ((2048, 0), (1024, 2048)),
    decode: bool = True,
    staging_dtype: str = "int8",
    scheme: str = DEFAULT_SCHEME,
) -> dict:
    import torch

    from kivi_serve.backend import paged_bf16_decode_cpu
    from kivi_serve.kernels.cpu import loader

    for name in shapes:
        if name not in SHAPES:
            raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    lib = loader.library()
    if lib is None:
        raise RuntimeError(f"the C++ CPU kernels are unavailable: {loader.unavailable_reason()}")
    torch.set_num_threads(threads)
    baseline = paged_bf16_decode_cpu()
    gen = torch.Generator().manual_seed(0)
    load_start = _load()
    lib.kivi_flush_denormals(1, threads)
    try:
        rows = []
        for name in shapes if decode else ():
            for B in batches:
                for ctx in contexts:
                    row = bench_decode(
                        name, B, ctx, page_size, iters, warmup, baseline, gen, staging_dtype, scheme
                    )
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        prefill_rows = []
        for name in shapes:
            for n, ctx in prefill:
                row = bench_prefill(name, n, ctx, page_size, max(3, iters // 5), baseline, gen, scheme)
                prefill_rows.append(row)
                print(json.dumps(row), flush=True)
        append = []
        for name in shapes if decode else ():
            for B in (1, 8):
                refs = ref_iters if B == 1 else 0
                row = bench_append(
                    name, B, page_size, iters, warmup, baseline, gen, refs, staging_dtype, scheme
                )
                append.append(row)
                print(json.dumps(row), flush=True)
    finally:
        lib.kivi_flush_denormals(0, threads)
    result = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "isa": loader.selected_isa(),
        "load_average_start": load_start,
        "load_average_end": _load(),
        "staging_dtype": staging_dtype,
        "scheme": scheme,
        "page_size": page_size,
        "torch": torch.__version__,
        "baseline": "vllm cpu_attention_with_kv_cache (bf16 cache)" if baseline is not None else None,
        "timing": (
            f"wall clock with {threads} threads, the kernels interleaved, min (and median) of >= {iters} "
            f"runs (more while a case is under {BUDGET_S} s, up to {MAX_ROUNDS}) after {warmup} warm-up "
            "runs; "
            "*_cpu1_ms: the same on one thread, timed with the thread's CPU clock (load-independent); "
            "speedup: min / min, speedup_median: median / median"
        ),
        "rows": rows,
        "prefill": prefill_rows,
        "append": append,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    if rows:
        plot(result, out.with_suffix(".png"))
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "speedup" in r]
    shapes = sorted({r["model_shape"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(shapes)), figsize=(6 * max(1, len(shapes)), 4.5), squeeze=False)
    for ax, name in zip(axes[0], shapes):
        for B in sorted({r["batch"] for r in rows if r["model_shape"] == name}):
            mine = sorted((r["context"], r) for r in rows if r["model_shape"] == name and r["batch"] == B)
            xs = [c for c, _ in mine]
            line = ax.plot(xs, [r["speedup"] for _, r in mine], marker="o", label=f"batch {B}, wall")[0]
            if all("speedup_cpu1" in r for _, r in mine):  # the load-independent column, dotted
                ax.plot(xs, [r["speedup_cpu1"] for _, r in mine], marker=".", ls=":", color=line.get_color(),
                        label=f"batch {B}, 1-thread CPU clock")  # fmt: skip
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(1.5, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("speed-up vs vLLM CPU attention (bf16)")
        ax.set_title(name)
        ax.legend(fontsize=8)
    load = (result.get("load_average_start"), result.get("load_average_end"))
    busy = f", load average {load[0]:.1f} → {load[1]:.1f}" if None not in load else ""
    scheme = result.get("scheme", DEFAULT_SCHEME)
    title = f"{scheme} decode on CPU: {result['cpu']}, {result['threads']} threads{busy}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def json_line(result: dict) -> str:
    """The ``--json`` summary: one object, the keys the issue asks for."""
    keys = ("model_shape", "batch", "context", "head_dim", "kivi_ms", "baseline_ms", "speedup")
    return json.dumps({"results": [{k: r.get(k) for k in keys} for r in result["rows"]]})
