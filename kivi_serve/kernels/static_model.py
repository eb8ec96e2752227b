"""A static cost model of the decode kernel on an H100, computed without a GPU.

For one configuration (head_dim, page size, query rows per MMA tile; the default page format in
bf16 — at page 256 the long-context format kivi-serve-2bit-p256, 7D/16 wide K channels) it compiles
``cuda/decode_attention.cu`` for sm_90a twice, with nvcc or NVRTC:

* the **production build** (what the loader launches): registers and spill bytes from ``ptxas -v``,
  dynamic shared memory and threads per CTA from the cubin's ``kivi_decode_launch_info`` symbol;
* the **counting build** (``KIVI_COUNT_BUILD=1``: every loop inside the per-page loop unrolled):
  the per-page loop's SASS instruction count, counted by :mod:`kivi_serve.kernels.sass`.

and combines them with H100 figures (:data:`H100`) into a predicted time per page — the largest of
the issue time (``sass_per_page`` warp-instructions over the SMs' issue slots), the tensor-pipe
time (``HMMA`` count at the dense bf16 rate) and the byte time (the page's bytes at the measured
copy bandwidth) — and the predicted fraction of copy bandwidth at batch 8 / 32K context
(Llama-3.1-8B: 8 KV heads). **A prediction, not a measurement**: ``predicted_bw_fraction_h100``
assumes every issue slot is used (no latency, no stalls) and is a ceiling — on an H200 it said 0.91
where 0.21 was measured; ``predicted_bw_fraction_latency`` lets each resident warp issue only once per
``Gpu.warp_cycles_per_issue`` cycles, a figure measured with ncu on one configuration (docs/performance.md,
"The static cost model" and the ninth session's GPU results).
"""

from __future__ import annotations

import dataclasses
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from kivi_serve.kernels import loader, sass
from kivi_serve.quant.layout import PageLayout
from kivi_serve.quant.schemes import page_format

ARCH = "sm_90a"
KERNEL = "kivi_decode"


@dataclass(frozen=True)
class Gpu:
    """The figures the model uses (NVIDIA H100 SXM5 datasheet and whitepaper; the copy bandwidth
    is what a device-to-device copy reaches, as `kivi-serve bench kernels` measures it)."""

    name: str = "H100 SXM5 (datasheet figures)"
    sms: int = 132
    clock_hz: float = 1.755e9  # sustained SM clock assumed under a memory-bound load (boost: 1.98 GHz)
    issue_per_sm_clk: int = 4  # four schedulers, one warp-instruction each per clock
    mma_per_sm_clk: float = 0.5  # mma.m16n8k16 (4096 MACs) per SM per clock: 2048 dense bf16 MACs/clk
    hbm_bytes_s: float = 3.35e12
    copy_bytes_s: float = 3.0e12
    max_regs_per_sm: int = 65536
    max_smem_per_sm: int = 228 * 1024
    max_smem_per_cta: int = 227 * 1024
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    reserved_smem_per_cta: int = 1024  # the driver's per-CTA reservation
    # Measured, not datasheet: cycles between a warp's issued instructions in the decode kernel's page
    # loop (ncu "Warp Cycles Per Issued Instruction", NVIDIA H200, D = 128, P = 128, 8-row tiles, 8 warps
    # per SM, batch 8 / 32K; docs/performance.md, ninth session). One configuration's figure, applied to
    # all: the latency-bound prediction below is a calibrated estimate, not a measurement of each one.
    warp_cycles_per_issue: float = 4.58


H100 = Gpu()
#: Default configurations: head_dim x page size x query rows per MMA tile (page 256: the p256 format).
CONFIGS = [(d, p, r) for d in loader.HEAD_DIMS for p in loader.PAGE_SIZES for r in (8, 16)]

#: The shape of the bandwidth prediction: Llama-3.1-8B attention (8 KV heads, GQA group 4) at
#: batch 8 and 32K context.
KV_HEADS, BATCH, CONTEXT = 8, 8, 32768

_PTXAS = re.compile(
    r"Function properties for (\w+)\s*\n[^\n]*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads\s*\n.*?Used (\d+) registers",
    re.S,
)


def page_layout(head_dim: int, page_size: int) -> PageLayout:
    """The default format's page at a page size (:func:`kivi_serve.quant.schemes.page_format`, as
    :func:`loader.default_specs` builds it)."""
    return page_format(page_size).layout(head_dim, page_size)


def spec_for(
    head_dim: int, page_size: int, rows: int, count_build: bool = False, v_rotate: bool = False
) -> loader.KernelSpec:
    """The default-format bf16 decode spec of a configuration (``count_build``: the counting build;
    ``v_rotate``: the vr page, kivi-serve-2bit-p256-vr, whose V codebook ends change nothing here)."""
    spec = loader.KernelSpec.for_layout(
        "decode_attention", page_layout(head_dim, page_size), "bfloat16", rows16=rows == 16,
        count_build=count_build,
    )  # fmt: skip
    return dataclasses.replace(spec, v_rotate=v_rotate, v_pin_ends=not v_rotate)


def ptxas_usage(log: str, kernel: str = KERNEL) -> dict:
    """Registers and spill bytes of ``kernel`` from a ``ptxas -v`` log."""
    for m in _PTXAS.finditer(log):
        if m.group(1) == kernel:
            stack, st, ld, regs = (int(m.group(i)) for i in (2, 3, 4, 5))
            return {"regs": regs, "spill_bytes": st + ld, "stack_bytes": stack}
    raise ValueError(f"ptxas -v printed nothing for {kernel}:\n{log[-2000:]}")


def elf_symbol(cubin: Path, name: str) -> bytes:
    """The bytes of a data symbol of an ELF64 cubin (a minimal reader: section headers, symtab)."""
    data = Path(cubin).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError(f"{cubin} is not an ELF64 file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    for sh in sections:
        if sh[1] != 2:  # SHT_SYMTAB
            continue
        strtab = sections[sh[6]]
        for off in range(sh[4], sh[4] + sh[5], 24):
            st_name, _info, _other, shndx, value, size = struct.unpack_from("<IBBHQQ", data, off)
            s0 = strtab[4] + st_name
            if data[s0 : data.index(b"\0", s0)].decode() == name:
                return data[sections[shndx][4] + value : sections[shndx][4] + value + size]
    raise ValueError(f"symbol {name!r} not in {cubin}")


def ctas_per_sm(regs: int, threads: int, smem: int, gpu: Gpu = H100) -> int:
    """Resident CTAs per SM, from registers (allocated per warp in units of 256), shared memory and
    the warp/CTA limits (the CUDA occupancy calculator's rules for sm_90)."""
    warps = -(-threads // 32)
    regs_per_warp = -(-(regs * 32) // 256) * 256
    by_regs = gpu.max_regs_per_sm // (regs_per_warp * warps) if regs else gpu.max_ctas_per_sm
    by_smem = gpu.max_smem_per_sm // (smem + gpu.reserved_smem_per_cta) if smem <= gpu.max_smem_per_cta else 0
    by_warps = gpu.max_warps_per_sm // warps
    return max(0, min(by_regs, by_smem, by_warps, gpu.max_ctas_per_sm))


def bytes_per_page(head_dim: int, page_size: int) -> int:
    """Bytes the kernel streams per page and KV head (the page's content, 16-byte aligned)."""
    content = page_layout(head_dim, page_size).content_bytes
    return -(-content // 16) * 16


def predict(config: tuple[int, int, int], gpu: Gpu = H100, v_rotate: bool = False) -> dict:
    """The cost-model row of one configuration (see the module docstring); ``v_rotate``: the vr page
    (the rows rotated back once per split are outside the page loop and not counted)."""
    d, p, rows = config
    cubin, log = loader.ptxas_log(spec_for(d, p, rows, v_rotate=v_rotate), ARCH)
    usage = ptxas_usage(log)
    smem, threads = struct.unpack("<ii", elf_symbol(cubin, "kivi_decode_launch_info"))
    count_cubin = loader.compile_cubin(spec_for(d, p, rows, count_build=True, v_rotate=v_rotate), ARCH)
    counted = sass.count_cubin(count_cubin, KERNEL)
    ctas = ctas_per_sm(usage["regs"], threads, smem, gpu)
    nbytes = bytes_per_page(d, p)
    t_issue = counted["sass_per_page"] / (gpu.sms * gpu.issue_per_sm_clk * gpu.clock_hz)
    t_mma = counted["hmma"] / (gpu.sms * gpu.mma_per_sm_clk * gpu.clock_hz)
    t_bytes = nbytes / gpu.copy_bytes_s
    t_page = max(t_issue, t_mma, t_bytes)
    # The latency-bound rate: each resident warp issues once per warp_cycles_per_issue cycles (measured),
    # so an SM with few warps issues far below its 4 per clock. On the H200 the issue-bound figure
    # (t_page) predicted 0.91 of copy bandwidth at D = 128, P = 128 where 0.21 was measured.
    warps = ctas * threads // 32
    issue_rate = min(gpu.issue_per_sm_clk, warps / gpu.warp_cycles_per_issue) if warps else 0.0
    t_latency = counted["sass_per_page"] / (gpu.sms * issue_rate * gpu.clock_hz) if warps else float("inf")
    t_page_latency = max(t_latency, t_mma, t_bytes)
    # Batch 8 / 32K: every (sequence, KV head) streams ceil(32K / P) pages once (GQA group 4 fits
    # one tile of 8 or 16 rows), so the fraction of copy bandwidth is the byte time over the page time.
    pages = BATCH * KV_HEADS * -(-CONTEXT // p)
    return {
        "head_dim": d,
        "page_size": p,
        "rows": rows,
        "wide_channels": page_layout(d, p).wide_channels,
        **({"v_rotate": True} if v_rotate else {}),
        "regs": usage["regs"],
        "spill_bytes": usage["spill_bytes"],
        "smem_bytes": smem,
        "threads": threads,
        "ctas_per_sm": ctas,
        "warps_per_sm": ctas * threads // 32,
        "sass_per_page": counted["sass_per_page"],
        # 0: the count is what a warp issues per page. Otherwise ptxas kept loops that the counting
        # build asked to unroll (the largest configurations): each is counted once, so sass_per_page
        # is a lower bound and the predicted fraction an upper bound.
        "inner_loops": counted["inner_loops"],
        # of sass_per_page, the compiler's fall-backs for warp collectives that only a diverged warp
        # reaches (sass.page_loop_count): counted in the prediction, never issued by a converged warp
        "sass_divergence_fallback": counted["divergence_fallback"],
        "hmma_per_page": counted["hmma"],
        "bytes_per_page": nbytes,
        "predicted_ns_per_page": t_page * 1e9,
        "bound": {t_issue: "issue", t_mma: "tensor", t_bytes: "bytes"}[t_page],
        "predicted_us_batch8_32k": pages * t_page * 1e6,
        "predicted_bw_fraction_h100": t_bytes / t_page,
        # with the measured issue latency (Gpu.warp_cycles_per_issue): the estimate to compare with a GPU
        "predicted_issue_per_sm_clk": issue_rate,
        "predicted_bw_fraction_latency": t_bytes / t_page_latency,
    }


def sass_budget(head_dim: int, page_size: int, gpu: Gpu = H100, fraction: float = 0.8) -> int:
    """The most warp-instructions per page that still predict ``fraction`` of copy bandwidth."""
    t_bytes = bytes_per_page(head_dim, page_size) / gpu.copy_bytes_s  # (p256 format at page 256)
    return int(t_bytes / fraction * gpu.sms * gpu.issue_per_sm_clk * gpu.clock_hz)


def available() -> str | None:
    """Why the model cannot run here (no compiler, no disassembler), or None."""
    if not loader.available_backends():
        return "no CUDA compiler (nvcc, or NVRTC with the CUDA headers)"
    if sass.find_disassembler() is None:
        return "no SASS disassembler (nvdisasm or cuobjdump; pip install nvidia-cuda-nvdisasm)"
    return None


__all__ = ["CONFIGS", "H100", "Gpu", "available", "bytes_per_page", "ctas_per_sm", "predict", "sass_budget"]
