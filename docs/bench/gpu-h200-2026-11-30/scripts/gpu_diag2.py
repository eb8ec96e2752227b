"""Throw-away GPU diagnosis 2 (session 9, not committed): decode variants (stages, min CTAs), small contexts,
host overhead. python3 gpu_diag2.py OUTDIR"""

import cProfile
import dataclasses
import io
import os
import pstats
import sys
import time
import traceback

sys.modules["vllm"] = None
import torch  # noqa: E402

import gpu_diag as g  # noqa: E402
from kivi_serve.bench import kernels as bk  # noqa: E402
from kivi_serve.kernels import decode_attention as da  # noqa: E402
from kivi_serve.kernels import loader  # noqa: E402

VARIANT = {"stages": None, "min_ctas": None}
_orig_spec_for = loader.spec_for


def spec_for(source, layout, dtype, **kw):
    spec = _orig_spec_for(source, layout, dtype, **kw)
    if source == "decode_attention":
        rep = {k: v for k, v in VARIANT.items() if v is not None}
        if VARIANT["min_ctas"] == 0:
            rep["min_ctas"] = None
        spec = dataclasses.replace(spec, **rep)
    return spec


loader.spec_for = spec_for


def main(outdir):
    os.makedirs(outdir, exist_ok=True)
    g.OUTF = os.path.join(outdir, "diag2.jsonl")
    t0 = time.time()
    variants = {
        128: [(2, None), (1, None), (1, 3), (1, 4), (2, 3)],
        64: [(2, None), (2, 3), (1, 3), (1, 4)],
        256: [(2, None), (1, None), (1, 5), (1, 6)],
    }
    scheme_of = {128: "kivi-serve-2bit", 64: "kivi-serve-2bit", 256: "kivi-serve-2bit-p256-vr"}
    specs = []
    for P, vs in variants.items():
        base = bk.kernel_specs(scheme_of[P], (P,))[1]
        specs += [dataclasses.replace(base, stages=st, min_ctas=mc) for st, mc in vs]
    loader.precompile([loader.device_arch(0)], specs, jobs=os.cpu_count())
    g.emit(section="precompile", s=round(time.time() - t0, 1))
    gen = torch.Generator().manual_seed(0)
    for P, vs in variants.items():
        for B, ctx in ((8, 32768), (8, 131072), (1, 131072), (1, 2048), (8, 2048)):
            try:
                c = g.cell(scheme_of[P], P, B, ctx, gen)
                ref = None
                res = {}
                for st, mc in vs:
                    VARIANT.update(stages=st, min_ctas=mc if mc is not None else 0)
                    out = da.paged_attention(*c["args"], out=torch.empty_like(c["q"]), workspace=c["ws"])
                    torch.cuda.synchronize()
                    same = None if ref is None else bool(torch.equal(out, ref))
                    ref = out if ref is None else ref
                    spec = loader.spec_for("decode_attention", c["args"][-1], torch.bfloat16, rows16=False)
                    mod = loader.module_for(spec, torch.device("cuda"))
                    ms = g.graph_ms(lambda: da.paged_attention(*c["args"], out=c["out"], workspace=c["ws"]), iters=10)
                    res[f"st{st}_mc{mc}"] = dict(ms=ms, tbs=c["kbytes"] / (ms * 1e-3) / 1e12, ctas=mod.ctas_per_sm,
                                                 same=same)
                VARIANT.update(stages=None, min_ctas=None)
                g.emit(section="variants", P=P, B=B, ctx=c["seq_len"], res=res)
                del c
            except Exception:
                VARIANT.update(stages=None, min_ctas=None)
                g.emit(section="variants_error", P=P, B=B, ctx=ctx, err=traceback.format_exc()[-1500:])
            torch.cuda.empty_cache()
    # small contexts: splits x min_split_pages at P = 128
    for B, ctx in ((1, 2048), (8, 2048), (1, 8192)):
        try:
            c = g.cell("kivi-serve-2bit", 128, B, ctx, gen)
            res = {}
            for ns in (1, 2, 4, 8, 16):
                for msp in (1, 2, 4, 8):
                    res[f"ns{ns}_msp{msp}"] = g.graph_ms(
                        lambda ns=ns, msp=msp: da.paged_attention(
                            *c["args"], out=c["out"], workspace=c["ws"], num_splits=ns, min_split_pages=msp),
                        iters=10)
            g.emit(section="small", B=B, ctx=c["seq_len"], ms=res)
        except Exception:
            g.emit(section="small_error", err=traceback.format_exc()[-1500:])
    # fixed cost: whole pages only (no staging tail) vs a full staging tail, 1 and 16 pages, B = 1
    try:
        layout = bk._layouts("kivi-serve-2bit", [128])[0]
        res = {}
        for n_pages in (1, 16):
            c = g.cell("kivi-serve-2bit", 128, 1, n_pages * 128, gen)
            for tail in (0, 1, 64, 127):
                seq_len = n_pages * 128 + tail + 1  # pages + tail staged tokens + the new one
                a = list(c["args"])
                tables = torch.cat([a[5], a[5][:, :1]], dim=1) if tail else a[5]
                a[5] = tables.contiguous()
                a[6] = torch.full((1,), seq_len, dtype=torch.int32, device="cuda")
                for ns in (1, n_pages):
                    res[f"pages{n_pages}_tail{tail}_ns{ns}"] = g.graph_ms(
                        lambda a=a, ns=ns: da.paged_attention(*a, out=c["out"], workspace=c["ws"], num_splits=ns,
                                                              min_split_pages=1), iters=10)
        g.emit(section="fixed", ms=res, layout=str(layout.page_size))
    except Exception:
        g.emit(section="fixed_error", err=traceback.format_exc()[-1500:])
    # host overhead of one eager call, profiled
    try:
        c = g.cell("kivi-serve-2bit", 128, 8, 32768, gen)

        def call():
            return da.paged_attention(*c["args"], out=c["out"], workspace=c["ws"])

        for _ in range(5):
            call()
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            call()
        pr.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
        with open(os.path.join(outdir, "host_profile.txt"), "w") as f:
            f.write(s.getvalue())
        g.emit(section="host", us=g.host_us(call, 200))
    except Exception:
        g.emit(section="host_error", err=traceback.format_exc()[-1500:])
    g.emit(section="done", s=round(time.time() - t0, 1))


if __name__ == "__main__":
    main(sys.argv[1])
