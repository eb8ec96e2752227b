"""Throw-away GPU diagnosis 3 (session 9, not committed): the changed kernel (tail, splits, p256 stages)
at the bench's cells, graph-timed beside SDPA (separate K, V). python3 gpu_diag3.py OUTDIR"""

import os
import sys
import time
import traceback

sys.modules["vllm"] = None
import torch  # noqa: E402

import gpu_diag as g  # noqa: E402
from kivi_serve.bench import kernels as bk  # noqa: E402
from kivi_serve.kernels import decode_attention as da  # noqa: E402
from kivi_serve.kernels import loader  # noqa: E402


def main(outdir):
    os.makedirs(outdir, exist_ok=True)
    g.OUTF = os.path.join(outdir, "diag3.jsonl")
    t0 = time.time()
    specs = bk.kernel_specs("kivi-serve-2bit", (128, 64)) + bk.kernel_specs("kivi-serve-2bit-p256-vr", (256,))
    loader.precompile([loader.device_arch(0)], specs, jobs=os.cpu_count())
    g.emit(section="precompile", s=round(time.time() - t0, 1), specs=[str(s) for s in specs])
    gen = torch.Generator().manual_seed(0)
    for scheme, P in (("kivi-serve-2bit", 128), ("kivi-serve-2bit", 64), ("kivi-serve-2bit-p256-vr", 256)):
        for B in (1, 8):
            for ctx in (2048, 8192, 32768, 131072):
                try:
                    c = g.cell(scheme, P, B, ctx, gen)
                    ms = g.graph_ms(lambda: da.paged_attention(*c["args"], out=c["out"], workspace=c["ws"]))
                    q = c["q"]
                    del c["pages"]
                    c["args"] = None
                    qs = q.view(B, bk.HQ, 1, bk.HEAD_DIM)
                    kc = torch.randn(B, bk.HKV, c["seq_len"], bk.HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                    vc = torch.randn_like(kc)
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    def sdpa(kc=kc, vc=vc, qs=qs):
                        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                            return torch.nn.functional.scaled_dot_product_attention(qs, kc, vc, enable_gqa=True)

                    sd = g.graph_ms(sdpa)
                    del kc, vc
                    g.emit(section="cell", P=P, B=B, ctx=c["seq_len"], kivi_ms=ms, sdpa_ms=sd, speedup=sd / ms,
                           tbs=c["kbytes"] / (ms * 1e-3) / 1e12)
                except Exception:
                    g.emit(section="cell_error", P=P, B=B, ctx=ctx, err=traceback.format_exc()[-1500:])
                torch.cuda.empty_cache()
    g.emit(section="done", s=round(time.time() - t0, 1))


if __name__ == "__main__":
    main(sys.argv[1])
