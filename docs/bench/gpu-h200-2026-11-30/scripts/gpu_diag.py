"""Throw-away GPU diagnosis (session 9, not committed): where the decode time goes.

python3 gpu_diag.py OUTDIR      all sections, JSON lines into OUTDIR/diag.jsonl (and stdout)
python3 gpu_diag.py ncu         one cell (p128, B8, 32K) launched 6 times, for ncu to profile
"""

import json
import os
import sys
import time
import traceback

sys.modules["vllm"] = None
import torch  # noqa: E402

from kivi_serve.bench import kernels as bk  # noqa: E402
from kivi_serve.kernels import decode_attention as da  # noqa: E402
from kivi_serve.kernels import loader  # noqa: E402

OUTF = None


def emit(**kw):
    line = json.dumps(kw)
    print(line, flush=True)
    if OUTF:
        with open(OUTF, "a") as f:
            f.write(line + "\n")


flush_buf = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
flush = flush_buf.zero_


def graph_ms(fn, iters=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    ts = []
    for _ in range(iters):
        flush()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    del g
    return ts[len(ts) // 2]


def prof_us(fn, iters=10):
    """Mean GPU microseconds per kernel name over `iters` calls (each after an L2 flush)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(iters):
            flush()
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in p.key_averages():
        tot = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if e.count and tot and "zero" not in e.key.lower() and "fill" not in e.key.lower():
            out[e.key[:60]] = [round(tot / e.count, 2), e.count]
    return out


def safe(f, *a):
    try:
        return f(*a)
    except Exception as exc:  # noqa: BLE001
        return f"error: {exc!r}"[:300]


def host_us(fn, n=50):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return round(dt, 1)


def cell(scheme, P, B, ctx, gen):
    layout = bk._layouts(scheme, [P])[0]
    n_pages = -(-ctx // P)
    seq_len = ctx + 1 - P // 2
    nb = 1 + B * n_pages
    pages = bk._quantized_cache(layout, nb, gen, bk.get_scheme(scheme).codebook)
    perm = 1 + torch.randperm(nb - 1, generator=gen)
    tables = perm.view(B, n_pages).to("cuda", torch.int32)
    q = torch.randn(B, bk.HQ, bk.HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    kn = torch.randn(B, bk.HKV, bk.HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    staging = torch.randn(B, 2, bk.HKV, P, bk.HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((B,), seq_len, dtype=torch.int32, device="cuda")
    one_each = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    tails = torch.arange(B, dtype=torch.int32, device="cuda")
    args = (q, kn, kn, pages, staging, tables, lens, one_each, tails, layout)
    out_t = torch.empty_like(q)
    ws = da.make_workspace(B, bk.HQ, bk.HEAD_DIM, da.MAX_SPLITS, "cuda")
    kbytes = B * (seq_len // P) * bk.HKV * layout.page_bytes + B * bk.HKV * (seq_len % P) * bk.HEAD_DIM * 4
    return dict(args=args, out=out_t, ws=ws, seq_len=seq_len, kbytes=kbytes, n_pages=n_pages, q=q, pages=pages)


def main_all(outdir):
    global OUTF
    os.makedirs(outdir, exist_ok=True)
    OUTF = os.path.join(outdir, "diag.jsonl")
    t0 = time.time()
    specs = bk.kernel_specs("kivi-serve-2bit", (128, 64)) + bk.kernel_specs("kivi-serve-2bit-p256-vr", (256,))
    loader.precompile([loader.device_arch(0)], specs, jobs=os.cpu_count())
    emit(section="precompile", s=round(time.time() - t0, 1))
    copy = bk._copy_bandwidth(flush, 10)
    emit(section="copy", copy_gbs=copy)
    gen = torch.Generator().manual_seed(0)
    sms = loader.sm_count(torch.device("cuda"))
    cells = [("kivi-serve-2bit", 128, B, c) for B in (1, 8) for c in (2048, 32768, 131072)]
    cells += [("kivi-serve-2bit", 64, 8, 32768), ("kivi-serve-2bit", 64, 1, 131072)]
    cells += [("kivi-serve-2bit-p256-vr", 256, 8, 32768), ("kivi-serve-2bit-p256-vr", 256, 1, 131072)]
    sweeps = {
        ("kivi-serve-2bit", 128, 8, 32768): [1, 2, 3, 4, 6, 8, 12, 16, 32],
        ("kivi-serve-2bit", 128, 8, 131072): [2, 4, 5, 8, 16, 32, 64],
        ("kivi-serve-2bit", 128, 1, 131072): [8, 16, 33, 64, 128],
        ("kivi-serve-2bit", 128, 1, 32768): [4, 8, 16, 33, 64, 128],
        ("kivi-serve-2bit-p256-vr", 256, 8, 32768): [1, 2, 4, 8, 16],
    }
    for key in cells:
        scheme, P, B, ctx = key
        try:
            c = cell(scheme, P, B, ctx, gen)
            ns = da.choose_num_splits(B, bk.HKV, bk.HQ // bk.HKV, c["n_pages"], sms)

            def call(ns_=None, c=c):
                return da.paged_attention(*c["args"], out=c["out"], workspace=c["ws"], num_splits=ns_)

            row = dict(section="cell", scheme=scheme, P=P, B=B, ctx=c["seq_len"], kbytes=c["kbytes"],
                       default_splits=ns)
            row["eager_ms"] = bk._timer(call, 10, 3, flush)
            row["host_us"] = host_us(call)
            row["graph_ms"] = graph_ms(call)
            row["graph_tbs"] = c["kbytes"] / (row["graph_ms"] * 1e-3) / 1e12
            row["prof"] = safe(prof_us, call)
            del c["pages"]
            c["args"] = None
            torch.cuda.empty_cache()
            # bf16 baselines: K = V (the bench's) and separate K, V
            qs = c["q"].view(B, bk.HQ, 1, bk.HEAD_DIM)
            kc = torch.randn(B, bk.HKV, c["seq_len"], bk.HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def sdpa(k, v):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(qs, k, v, enable_gqa=True)

            row["sdpa_same_eager_ms"] = bk._timer(lambda: sdpa(kc, kc), 10, 3, flush)
            row["sdpa_sep_eager_ms"] = bk._timer(lambda: sdpa(kc, vc), 10, 3, flush)
            row["sdpa_sep_graph_ms"] = graph_ms(lambda: sdpa(kc, vc))
            row["sdpa_same_graph_ms"] = graph_ms(lambda: sdpa(kc, kc))
            bf16_bytes = 2 * kc.numel() * 2
            row["sdpa_sep_tbs"] = bf16_bytes / (row["sdpa_sep_graph_ms"] * 1e-3) / 1e12
            row["sdpa_prof"] = safe(prof_us, lambda: sdpa(kc, vc))
            row["speedup_graph_vs_sep"] = row["sdpa_sep_graph_ms"] / row["graph_ms"]
            del kc, vc
            emit(**row)
        except Exception:
            emit(section="cell_error", key=key, err=traceback.format_exc()[-2000:])
        torch.cuda.empty_cache()
    for key, splits in sweeps.items():
        scheme, P, B, ctx = key
        try:
            c = cell(scheme, P, B, ctx, gen)
            res = {}
            for s in splits:
                res[s] = graph_ms(
                    lambda s=s: da.paged_attention(*c["args"], out=c["out"], workspace=c["ws"], num_splits=s),
                    iters=10,
                )
            for msp in (1, 2, 4):
                res[f"msp{msp}"] = graph_ms(
                    lambda m=msp: da.paged_attention(*c["args"], out=c["out"], workspace=c["ws"], min_split_pages=m),
                    iters=10,
                )
            emit(section="sweep", key=key, kbytes=c["kbytes"], ms=res)
            del c
        except Exception:
            emit(section="sweep_error", key=key, err=traceback.format_exc()[-2000:])
        torch.cuda.empty_cache()
    emit(section="done", s=round(time.time() - t0, 1))


def main_ncu():
    gen = torch.Generator().manual_seed(0)
    c = cell("kivi-serve-2bit", 128, 8, 32768, gen)
    for _ in range(6):
        da.paged_attention(*c["args"], out=c["out"], workspace=c["ws"])
    torch.cuda.synchronize()


if __name__ == "__main__":
    if sys.argv[1] == "ncu":
        main_ncu()
    else:
        main_all(sys.argv[1])
