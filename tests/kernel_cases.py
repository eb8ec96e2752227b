"""The kernel test cases and checks, shared by the GPU tests (tests/test_kernels_cuda.py, ``cuda``)
and the tests emulated on CPU (tests/test_kernels_simt.py, ``simt``).

Each ``check_*`` function runs one case through the public kernel wrappers on ``device`` (a CUDA
device, or the CPU inside ``loader.emulate()``) and compares with the PyTorch reference
(``kivi_serve.kernels.reference`` and ``kivi_serve.quant.page``, the spec): bit-exact for pages,
staging and dequantized values; for attention, within ``K_TOL`` times the error that attention
in the query dtype itself makes against fp64 on the same cached values (FlashAttention-3 style),
computed on the CPU so that the bound does not depend on the machine.
"""

from __future__ import annotations

import functools
import math

import torch

from kivi_serve.backend.staging import AppendPlan, PageOps, StagingPool
from kivi_serve.kernels import reference
from kivi_serve.quant import page
from kivi_serve.quant import staging as staging_format
from kivi_serve.quant.codec import QuantCodec
from kivi_serve.quant.layout import PageLayout

#: Kernel error bound, in multiples of the query-dtype attention's own error vs fp64. The kernel
#: rounds q * k_scale and p * v_scale to the query dtype where a plain low-precision attention
#: rounds k and v, so its error is of the same order; 4x leaves room, not luck.
K_TOL = 4.0
LOG2E = 1.4426950408889634


def to(device: torch.device, x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` on ``device`` — always a new tensor: on the CPU (emulation) ``x.to(cpu)`` would
    be ``x`` itself, and a kernel writing it would be compared with the reference's own writes."""
    return x.to(device, copy=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layout_id(layout: PageLayout) -> str:
    return (
        f"d{layout.head_dim}p{layout.page_size}k{layout.k_bits}v{layout.v_bits}"
        f"x{layout.exact_tokens}o{layout.k_outliers}h{layout.wide_channels}"
        + ("r" if layout.v_rotate else "") + ("" if layout.v_pin_ends else "f")
    )


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- data
def kv_tokens(n: int, H: int, D: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values with LLM-like structure: channel offsets, a few outlier channels, a massive token."""
    k = torch.randn(n, H, D, generator=gen) + torch.randn(1, H, D, generator=gen) * 2
    k[:, :, :: max(1, D // 8)] *= 6.0  # outlier channels
    v = torch.randn(n, H, D, generator=gen)
    if n > 3:
        k[n // 3] *= 8.0  # an outlier token
    return k, v


# ----------------------------------------------------------------------------- quantize-append
APPEND_LAYOUTS = [
    # the default page format (24 / 12 / 48 wide K channels)
    (PageLayout(128, 64), torch.bfloat16, "fitted"),
    (PageLayout(64, 128), torch.float16, "fitted"),
    (PageLayout(256, 128), torch.bfloat16, "fitted"),
    # 3-bit keys with 4-bit wide channels, together with K outliers
    (PageLayout(64, 128, k_bits=3, v_bits=2, k_outliers=1, wide_channels=8), torch.float16, "fitted"),
    # no wide channels: the first format (K outliers), and 4-bit codes
    (PageLayout(128, 64, k_outliers=1, wide_channels=0), torch.bfloat16, "fitted"),
    (PageLayout(256, 64, k_bits=4, v_bits=4, exact_tokens=0, k_outliers=0), torch.bfloat16, "fitted"),
    (PageLayout(128, 128, exact_tokens=1, k_outliers=0), torch.float16, "uniform"),
]
APPEND_IDS = [f"{layout_id(lay)}-{dtype_id(dt)}-{cb}" for lay, dt, cb in APPEND_LAYOUTS]


def schedule(P: int, short: bool = False) -> list[list[tuple[int, int]]]:
    """Steps of (sequence, new tokens): prefill chunks, then decode with one sequence left out in
    turn, so that a 3-slot pool must evict and later re-open pages. The long schedule decodes until
    every sequence's open page has filled; the short one (emulated on CPU) starts sequence 2 three
    tokens short of a full page, so that within 8 decode steps a page fills from its slot, one
    finalised early is completed from its own block, and pages are evicted and re-opened."""
    if short:
        steps = [[(0, P + P // 2), (1, P), (2, P - 3)], [(3, 2 * P + 3), (0, 1)]]
        decode = 8
    else:
        steps = [[(0, P + P // 2), (1, P), (2, 5)], [(3, 2 * P + 3), (0, 1)]]
        decode = P + 6
    for i in range(decode):
        steps.append([(s, 1) for s in range(4) if s != i % 4])
    return steps


def assert_pages_equal(got: torch.Tensor, want: torch.Tensor, layout: PageLayout, where: str) -> None:
    if torch.equal(got, want):
        return
    bad = (got != want).any(-1).nonzero().tolist()
    b, h = bad[0]
    diffs = [
        name
        for name, s in layout.sections.items()
        if not torch.equal(
            got[b, h, s.offset : s.offset + s.nbytes], want[b, h, s.offset : s.offset + s.nbytes]
        )
    ]
    raise AssertionError(
        f"{where}: {len(bad)} pages differ; first block {b} head {h}, sections {diffs or ['padding']}"
    )


def check_append_schedule(
    layout: PageLayout, dtype, codebook: str, device, short: bool = False, append_kv=None,
    staging_dtype: str = "model",
) -> None:
    """A real StagingPool schedule, step after step: every page byte and staging element bit-exact.
    ``short``: the short schedule, and one KV head for the largest pages (emulated on CPU, where the
    reference quantizer dominates; the early-finalisation cases keep two heads at that size).
    ``append_kv``: the kernel under test (default: the CUDA wrapper's). ``staging_dtype``: the
    staging format (:mod:`kivi_serve.quant.staging`)."""
    if append_kv is None:
        from kivi_serve.kernels.quantize_append import append_kv

    gen = torch.Generator().manual_seed(0)
    H, D, P = 2, layout.head_dim, layout.page_size
    if short and D * P >= 128 * 128:
        H = 1
    n_seqs, max_pages = 4, 8
    NB = 1 + n_seqs * max_pages
    perm = (1 + torch.randperm(NB - 1, generator=gen)).tolist()  # block 0 stays the null block
    tables = [perm[s * max_pages : (s + 1) * max_pages] for s in range(n_seqs)]
    pool = StagingPool(num_slots=3, page_size=P)
    pages_ref = torch.randint(0, 256, (NB, H, layout.page_bytes), dtype=torch.uint8, generator=gen)
    staging_ref = staging_format.new_staging(3, H, P, D, dtype, staging_dtype)
    pages_dev, staging_dev = to(device, pages_ref), to(device, staging_ref)
    lens = [0] * n_seqs
    completed_from_block = 0
    for step, work in enumerate(schedule(P, short)):
        seqs = [s for s, _ in work]
        q_lens = [n for _, n in work]
        for s, n in work:
            lens[s] += n
        plan = pool.plan([tables[s] for s in seqs], [lens[s] for s in seqs], q_lens)
        completed_from_block += int(((plan.finalize.slots < 0) & (plan.finalize.prefix > 0)).sum())
        k, v = kv_tokens(sum(q_lens), H, D, gen)
        k, v = k.to(dtype), v.to(dtype)
        reference.append_kv(plan, k, v, pages_ref, staging_ref, QuantCodec(layout, codebook))
        append_kv(plan.to(device), to(device, k), to(device, v), pages_dev, staging_dev, layout, codebook)
        sync(device)
        assert_pages_equal(pages_dev.cpu(), pages_ref, layout, f"step {step}")
        assert torch.equal(staging_dev.cpu(), staging_ref), f"step {step}: staging differs"
    assert pool.stats.early_finalisations > 0 and pool.stats.reopened > 0, (
        "schedule did not exercise evict/reopen"
    )
    if short:
        assert completed_from_block > 0, "schedule did not complete a page finalised early"


EARLY_LAYOUTS = [
    (PageLayout(128, 64), torch.bfloat16),
    (PageLayout(64, 128), torch.float16),
    (PageLayout(256, 128), torch.float16),
    (PageLayout(128, 128, k_bits=3, k_outliers=1, wide_channels=24), torch.bfloat16),
    (PageLayout(64, 64, k_outliers=1, wide_channels=0), torch.bfloat16),
]
EARLY_IDS = [f"{layout_id(lay)}-{dtype_id(dt)}" for lay, dt in EARLY_LAYOUTS]


def check_early_finalisation(layout: PageLayout, dtype, codebook: str, device) -> None:
    """Evict ops alone (pages quantized from staging with fill <= P), against the reference: fills
    1, 2, 3, 17, P - 1, garbage past each fill, tied and all-zero channel scales."""
    from kivi_serve.kernels import quantize_append

    gen = torch.Generator().manual_seed(3)
    H, D, P = 2, layout.head_dim, layout.page_size
    fills = [P, 1, 2, 3, 17, P - 1, P, P // 2 + 5]
    sinks = [False, True, False, False, True, False, False, False]
    n = len(fills)
    staging = (torch.randn(n, 2, H, P, D, generator=gen) * 50).to(dtype)  # garbage past each fill
    for i, f in enumerate(fills):
        k, v = kv_tokens(f, H, D, gen)
        if i == 0:  # no massive token: the exact token is decided by the fine statistics
            k = torch.randn(f, H, D, generator=gen)
        staging[i, 0, :, :f] = k.transpose(0, 1).to(dtype)
        staging[i, 1, :, :f] = v.transpose(0, 1).to(dtype)
    # equal scales across the wide/narrow boundary (ties go to the lower channel): one column
    # repeated over every channel; and a page of constants (every scale 0: all Lloyd weights 0).
    staging[6, 0, 0, :P] = staging[6, 0, 0, :P, :1]
    staging[6, 0, 1, :P] = 0.5
    staging[7, 0, :, : fills[7], 1::2] = staging[7, 0, :, : fills[7], 0::2]  # pairs of equal channels
    blocks = (1 + torch.randperm(n, generator=gen)).tolist()
    evict = PageOps.of([(blocks[i], i, fills[i], sinks[i], 0, 0) for i in range(n)])
    empty = torch.zeros(0, dtype=torch.int32)
    plan = AppendPlan(empty, empty, evict, PageOps(), PageOps(), empty)
    pages_ref = torch.randint(0, 256, (n + 1, H, layout.page_bytes), dtype=torch.uint8, generator=gen)
    pages_dev = to(device, pages_ref)
    staging_dev = to(device, staging)
    none = torch.zeros(0, H, D, dtype=dtype)
    reference.append_kv(plan, none, none, pages_ref, staging.clone(), QuantCodec(layout, codebook))
    quantize_append.append_kv(
        plan.to(device), to(device, none), to(device, none), pages_dev, staging_dev, layout, codebook
    )
    sync(device)
    assert_pages_equal(pages_dev.cpu(), pages_ref, layout, "evict")
    assert torch.equal(staging_dev.cpu(), staging), "evict must not write staging"
    if layout.wide_channels:  # the wide channels are really in use: some wide codes use their top bit
        top = layout.raw(pages_ref[1:].reshape(n * H, -1), "wide_plane")
        assert top.any()
        # the repeated-column page: every scale ties, so the wide channels are 0 .. H-1
        idx = layout.view(pages_ref[blocks[6], 0:1], "wide_idx")[0].long()
        assert idx.tolist() == list(range(layout.wide_channels))


#: (layout, dtype) pairs of the dequantize test: wide channels read wide_cb with their full code.
DEQUANT_CASES = [
    (PageLayout(128, 64), torch.bfloat16),
    (PageLayout(128, 64), torch.float16),
    (PageLayout(256, 128), torch.bfloat16),
    (PageLayout(64, 128, k_bits=4, v_bits=3, exact_tokens=0), torch.float16),
    (PageLayout(64, 128, k_bits=3, k_outliers=1, wide_channels=8), torch.float16),
    (PageLayout(64, 128, k_bits=3, k_outliers=1, wide_channels=8), torch.bfloat16),
]
DEQUANT_IDS = [f"{layout_id(lay)}-{dtype_id(dt)}" for lay, dt in DEQUANT_CASES]


@functools.lru_cache(maxsize=4)
def _reference_pages(layout: PageLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Six pages (fills P, 1, 3, P, 17, P; sinks on two) and their reference dequantization."""
    gen = torch.Generator().manual_seed(1)
    P, D = layout.page_size, layout.head_dim
    k, v = kv_tokens(6 * P, 1, D, gen)
    k, v = k.reshape(6, P, D), v.reshape(6, P, D)
    fill = torch.tensor([P, 1, 3, P, 17, P])
    sink = torch.tensor([True, False, False, False, True, False])
    pages = page.quantize_pages(k, v, layout, fill=fill, sink=sink)
    return (pages, *page.dequantize_pages(pages, layout))


def check_dequantize(layout: PageLayout, dtype, device) -> None:
    """dequantize_pages and dequantize_blocks are bit-equal to the reference rounded to the dtype."""
    from kivi_serve.kernels import quantize_append

    P, D = layout.page_size, layout.head_dim
    pages, kr, vr = _reference_pages(layout)
    kg, vg = quantize_append.dequantize_pages(to(device, pages), layout, dtype)
    sync(device)
    assert torch.equal(kg.cpu(), kr.to(dtype)) and torch.equal(vg.cpu(), vr.to(dtype))
    # whole blocks (2 KV heads), a permuted subset, a skipped entry (-1: left unwritten)
    kv_pages = pages.reshape(3, 2, layout.page_bytes)
    blocks = torch.tensor([2, -1, 0], dtype=torch.int32)
    kb, vb = quantize_append.dequantize_blocks(to(device, kv_pages), to(device, blocks), layout, dtype)
    sync(device)
    kr3, vr3 = kr.reshape(3, 2, P, D).to(dtype), vr.reshape(3, 2, P, D).to(dtype)
    for i, blk in ((0, 2), (2, 0)):
        assert torch.equal(kb[i].cpu(), kr3[blk]) and torch.equal(vb[i].cpu(), vr3[blk])


# ----------------------------------------------------------------------------- decode attention
#: Named decode batches: each sequence's length including its new token; `early` sequences have
#: their partial last page finalised early (read quantized, tail_slot -1).
BATCH_SPECS = {
    "tiny": {"seq_lens": [1, 2, 3]},
    "page_edges": {"seq_lens": [63, 64, 65, 127, 128, 129]},
    "ragged": {"seq_lens": [5, 200, 64 * 7 + 11, 1000, 1]},
    "early_tails": {"seq_lens": [100, 300, 77], "early": [0, 2]},
    "long": {"seq_lens": [4096 + 17]},
}
#: The batches emulated on CPU ("long" costs minutes of reference quantization there). "ragged"
#: gives a warp several pages with num_splits=1: the only batch that cycles the cp.async ring.
EMULATED_BATCHES = ("tiny", "page_edges", "ragged", "early_tails")
DECODE_CASES = [
    (PageLayout(128, 64), torch.bfloat16, 4),  # Llama-3.1-8B per KV head, 24 wide K channels
    (PageLayout(128, 64), torch.float16, 1),
    (PageLayout(64, 128), torch.bfloat16, 12),  # rows16 tile, 12 wide channels
    (PageLayout(256, 64, exact_tokens=0, k_outliers=0), torch.float16, 8),  # 48 wide channels
    (PageLayout(128, 128, exact_tokens=1, k_outliers=0), torch.bfloat16, 32),  # two 16-row tiles
    (PageLayout(128, 64, k_outliers=1), torch.bfloat16, 4),  # wide channels and K outliers together
    (PageLayout(128, 64, k_outliers=1, wide_channels=0), torch.float16, 4),  # the first format
    (PageLayout(64, 64, exact_tokens=0, wide_channels=0), torch.bfloat16, 16),  # plain 2-bit
    (PageLayout(128, 128), torch.bfloat16, 8),  # the bar's page with a full 8-row tile: two chunks per page
]
DECODE_IDS = [f"{layout_id(lay)}-{dtype_id(dt)}-g{g}" for lay, dt, g in DECODE_CASES]


def build_decode_case(
    layout: PageLayout,
    dtype,
    group: int,
    seq_lens: list[int],
    early=(),
    H: int = 2,
    seed: int = 0,
    kv=kv_tokens,
    staging_dtype: str = "model",
):
    """Cache state after this step's append, on the CPU: pages quantized by the reference, tails in
    staging (in ``staging_dtype``'s format), random block placement, block 0 and unused slots full
    of garbage."""
    gen = torch.Generator().manual_seed(seed)
    P, D = layout.page_size, layout.head_dim
    B = len(seq_lens)
    max_pages = max(1, max(-(-n // P) for n in seq_lens))
    NB = 1 + B * max_pages
    perm = (1 + torch.randperm(NB - 1, generator=gen)).tolist()
    pages = torch.randint(0, 256, (NB, H, layout.page_bytes), dtype=torch.uint8, generator=gen)
    staging = torch.randn(B + 1, 2, H, P, D, generator=gen).to(dtype) * 100  # garbage in unused rows
    block_tables = torch.zeros(B, max_pages, dtype=torch.int32)
    tail_slots = torch.full((B,), -1, dtype=torch.int32)
    key = torch.empty(B, H, D, dtype=dtype)
    value = torch.empty(B, H, D, dtype=dtype)
    for b, n in enumerate(seq_lens):
        k, v = kv(n, H, D, gen)
        k, v = k.to(dtype), v.to(dtype)
        key[b], value[b] = k[-1], v[-1]
        for i in range(-(-n // P)):
            blk = perm[b * max_pages + i]
            block_tables[b, i] = blk
            lo, hi = i * P, min(n, (i + 1) * P)
            full = hi - lo == P
            if full or b in early:
                kp = torch.zeros(P, H, D, dtype=dtype)
                vp = torch.zeros(P, H, D, dtype=dtype)
                kp[: hi - lo], vp[: hi - lo] = k[lo:hi], v[lo:hi]
                q = page.quantize_pages(
                    kp.transpose(0, 1),
                    vp.transpose(0, 1),
                    layout,
                    fill=torch.full((H,), hi - lo),
                    sink=torch.full((H,), i == 0),
                )
                pages[blk] = q
            else:
                tail_slots[b] = b + 1
                staging[b + 1, 0, :, : hi - lo] = k[lo:hi].transpose(0, 1)
                staging[b + 1, 1, :, : hi - lo] = v[lo:hi].transpose(0, 1)
    query = (torch.randn(B, H * group, D, generator=gen) * 2).to(dtype)
    if staging_dtype == "int8":
        staging = staging_format.encode_int8(staging)
    return {
        "query": query,
        "key": key,
        "value": value,
        "kv_pages": pages,
        "staging": staging,
        "block_tables": block_tables,
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
        "query_start_loc": torch.arange(B + 1, dtype=torch.int32),
        "tail_slots": tail_slots,
    }


def cached_kv(case: dict, layout: PageLayout, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence b's keys and values as the cache holds them (context + its new token): (n, Hkv, D) fp32."""
    n = int(case["seq_lens"][b])
    q0 = int(case["query_start_loc"][b])
    ck, cv = reference.gather_context(
        reference.pages_view(case["kv_pages"], layout),
        case["staging"],
        case["block_tables"][b],
        n - 1,
        n,
        int(case["tail_slots"][b]),
        layout,
        dtype=case["query"].dtype,
    )
    return (
        torch.cat([ck, case["key"][q0 : q0 + 1].float()]),
        torch.cat([cv, case["value"][q0 : q0 + 1].float()]),
    )


def attention_truth_and_lowp(case: dict, layout: PageLayout, attn=None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 attention over the cached values, and the same in the query dtype: q . k summed in fp32
    and rounded to the dtype, softmax in fp32 rounded to the dtype, p . v summed in fp32 and
    rounded (what a GPU's low-precision matmuls do), on the CPU. ``attn`` (a LayerAttention): its
    sliding window (keys before seq_len - window dropped) and sink logits (one more softmax column per
    query head, no value), written out here independently of kivi_serve.kernels.semantics."""
    q = case["query"]
    B, Hq, D = q.shape
    H = case["key"].shape[1]
    G = Hq // H
    dt = q.dtype
    truth = torch.empty(B, Hq, D, dtype=torch.float64)
    lowp = torch.empty(B, Hq, D, dtype=dt)
    scale = D**-0.5
    window = getattr(attn, "window", None)
    sinks = getattr(attn, "sinks", None)

    def softmax(x):  # (H, G, n) -> probabilities, the sink column dropped after normalising
        if sinks is None:
            return x.softmax(-1)
        col = sinks.reshape(H, G, 1).to(x.dtype)
        return torch.cat([x, col], -1).softmax(-1)[..., :-1]

    for b in range(B):
        k, v = cached_kv(case, layout, b)
        if window is not None:
            k, v = k[max(0, len(k) - window) :], v[max(0, len(v) - window) :]
        qb = q[int(case["query_start_loc"][b])].reshape(H, G, D)
        s = torch.einsum("hgd,shd->hgs", qb.double(), k.double()) * scale
        truth[b] = torch.einsum("hgs,shd->hgd", softmax(s), v.double()).reshape(Hq, D)
        kd, vd = k.to(dt).float(), v.to(dt).float()
        sl = (torch.einsum("hgd,shd->hgs", qb.float(), kd).to(dt).float() * scale).to(dt)
        p = softmax(sl.float()).to(dt).float()
        lowp[b] = torch.einsum("hgs,shd->hgd", p, vd).to(dt).reshape(Hq, D)
    return truth, lowp


def on(device, case: dict) -> dict:
    """The case's tensors copied to ``device`` (see :func:`to`)."""
    return {k: to(device, v) for k, v in case.items()}


def assert_inputs_untouched(given: dict, case: dict) -> None:
    """The decode kernels only read their inputs."""
    for name, x in case.items():
        assert torch.equal(given[name].cpu(), x), f"the kernel wrote its input {name}"


def check_decode(
    layout: PageLayout, dtype, group: int, spec_name: str, device, staging_dtype: str = "model"
) -> None:
    from kivi_serve.kernels import decode_attention

    spec = BATCH_SPECS[spec_name]
    case = build_decode_case(
        layout, dtype, group, spec["seq_lens"], spec.get("early", ()), staging_dtype=staging_dtype
    )
    truth, lowp = attention_truth_and_lowp(case, layout)
    g = on(device, case)
    out = decode_attention.paged_attention(**g, layout=layout).cpu()
    assert out.dtype == dtype and out.shape == truth.shape
    err_lowp = (lowp.double() - truth).abs().max().item()
    err = (out.double() - truth).abs().max().item()
    assert math.isfinite(err), "non-finite output"
    assert err <= K_TOL * err_lowp + 1e-6, (
        f"kernel error {err:.3e} > {K_TOL} x {err_lowp:.3e} ({dtype} attention's own)"
    )
    # Same cached values as the spec: the reference agrees with fp64 too (sanity of the harness).
    ref = reference.paged_attention(**case, codec=layout)
    assert (ref.double() - truth).abs().max().item() <= K_TOL * err_lowp + 1e-6
    # Other split counts: same math, different merge order (1: each warp streams all its pages; 3
    # with min_split_pages=1: three splits even for a few pages — the default call above gives a
    # short sequence fewer splits than the grid has, the splits past them report empty).
    for ns, msp in ((1, None), (3, 1)):
        other = decode_attention.paged_attention(**g, layout=layout, num_splits=ns, min_split_pages=msp).cpu()
        assert (other.double() - truth).abs().max().item() <= K_TOL * err_lowp + 1e-6, f"num_splits={ns}"
    assert_inputs_untouched(g, case)


# ----------------------------------------------------------------------------- decode: targeted cases
#: (layout, dtype, group) of the targeted decode cases below (TARGETED_CHECKS).
TARGETED_DECODE = [
    (PageLayout(128, 64), torch.bfloat16, 4),
    (PageLayout(64, 128), torch.float16, 12),
]
TARGETED_IDS = [f"{layout_id(lay)}-{dtype_id(dt)}-g{g}" for lay, dt, g in TARGETED_DECODE]


def _eps(dtype) -> float:
    return torch.finfo(dtype).eps


def check_decode_zero_query_is_mean_of_v(layout: PageLayout, dtype, group: int, device) -> None:
    """q = 0: every token has the same score, so the output is the mean of the cached values.

    Bound: half an ulp of the output dtype (its rounding), fp32 summation, and — bf16 only — the
    kernel's documented rounding of p * v_scale and of the codebook to the dtype (exact in fp16).
    """
    from kivi_serve.kernels import decode_attention

    P = layout.page_size
    seq_lens = [1, 2, P - 1, P, P + 1, 2 * P + 5, 3 * P]
    case = build_decode_case(layout, dtype, group, seq_lens, early=(4,), seed=5)
    case["query"].zero_()
    out = (
        decode_attention.paged_attention(**on(device, case), layout=layout, num_splits=2, min_split_pages=1)
        .cpu()
        .double()
    )
    H = case["key"].shape[1]
    for b in range(len(seq_lens)):
        k, v = cached_kv(case, layout, b)
        mean = v.double().mean(0)  # (H, D)
        want = mean.repeat_interleave(group, 0)  # (Hq, D)
        bound = 0.5 * _eps(dtype) * want.abs() + 1e-6 * v.abs().max().item()
        if dtype == torch.bfloat16:  # |v - v_lo| per token = |v_scale * cb[code]|
            term = (v.double() - v.double().amin(-1, keepdim=True)).mean(0)
            bound = bound + 2 * _eps(dtype) * term.repeat_interleave(group, 0)
        err = (out[b] - want).abs()
        assert (err <= bound).all(), (
            f"sequence {b} (len {seq_lens[b]}): output differs from the mean of V by {err.max():.3e} "
            f"(bound {bound[err.argmax() // want.shape[1], err.argmax() % want.shape[1]]:.3e})"
        )
    assert H * group == out.shape[1]


def _plain_kv(n: int, H: int, D: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, H, D, generator=gen), torch.randn(n, H, D, generator=gen)


def check_decode_peaked_query(layout: PageLayout, dtype, group: int, device) -> None:
    """A query aimed at one token (q = beta * its cached key) at every page edge — first and last
    token of each page, the last cached token, the new token: the output is that token's value."""
    from kivi_serve.kernels import decode_attention

    P, D = layout.page_size, layout.head_dim
    n = 3 * P + 7
    targets = sorted({0, P - 1, P, 2 * P - 1, 2 * P, 3 * P - 1, 3 * P, n - 2, n - 1})
    case = build_decode_case(layout, dtype, group, [n] * len(targets), early=(1,), seed=7, kv=_plain_kv)
    H = case["key"].shape[1]
    for b, t in enumerate(targets):
        k, _ = cached_kv(case, layout, b)
        aim = k[t] / k[t].norm(dim=-1, keepdim=True)  # (H, D)
        case["query"][b] = (aim * 4 * math.sqrt(D)).repeat_interleave(group, 0).to(dtype)
    out = (
        decode_attention.paged_attention(**on(device, case), layout=layout, num_splits=3, min_split_pages=1)
        .cpu()
        .double()
    )
    for b, t in enumerate(targets):
        k, v = cached_kv(case, layout, b)
        q = case["query"][b].double().reshape(H, group, D)
        s = torch.einsum("hgd,shd->hgs", q, k.double()) * D**-0.5
        top2 = s.topk(2, dim=-1).values
        assert (top2[..., 0] - top2[..., 1] > 12).all(), "test setup: the query is not peaked enough"
        assert (s.argmax(-1) == t).all()
        want = v[t].double().repeat_interleave(group, 0)
        err = (out[b] - want).abs().max().item()
        assert err <= 4 * _eps(dtype) * v[t].abs().max().item() + 1e-3, (
            f"query aimed at token {t} (page {t // P}, offset {t % P}): "
            f"output differs from its value by {err:.3e}"
        )


def check_decode_part_lse(layout: PageLayout, dtype, group: int, device) -> None:
    """The partial results (workspace) against the reference: for each split, part_lse is the
    log2-sum-exp of the scaled scores of exactly the tokens the split owns (an even share of the
    quantized pages over eff = max(1, min(splits, pages // min_split_pages)) splits; the last
    split: the staging tail and the new token), part_o their softmax-weighted mean of V; an empty
    split reports -inf. min_split_pages 1 (three splits wherever there are three pages) and 2."""
    for msp in (1, 2):
        _check_decode_part_lse(layout, dtype, group, device, msp)


def _check_decode_part_lse(layout: PageLayout, dtype, group: int, device, msp: int) -> None:
    from kivi_serve.kernels import decode_attention

    P, D = layout.page_size, layout.head_dim
    seq_lens = [2, P + 3, 4 * P + 1, 3 * P]
    case = build_decode_case(layout, dtype, group, seq_lens, early=(3,), seed=11)
    B, Hq, _ = case["query"].shape
    H = case["key"].shape[1]
    splits = 3
    ns = splits + 1
    part_o, part_lse = decode_attention.make_workspace(B, Hq, D, splits, device)
    out = decode_attention.paged_attention(
        **on(device, case),
        layout=layout,
        num_splits=splits,
        workspace=(part_o, part_lse),
        min_split_pages=msp,
    )
    sync(device)
    part_o = part_o[: B * Hq * ns * D].cpu().reshape(B, Hq, ns, D).double()
    part_lse = part_lse[: B * Hq * ns].cpu().reshape(B, Hq, ns).double()
    scale = D**-0.5
    for b, n in enumerate(seq_lens):
        k, v = cached_kv(case, layout, b)
        q = case["query"][b].double().reshape(H, group, D)
        s = (torch.einsum("hgd,shd->hgs", q, k.double()) * scale).reshape(Hq, n)
        # the kernel's partition of the tokens
        ctx = n - 1
        n_pages = -(-ctx // P) if ctx > 0 else 0
        staged = int(case["tail_slots"][b]) >= 0 and n_pages * P > n
        n_quant = n_pages - int(staged)
        eff = max(1, min(splits, n_quant // msp))
        per = -(-n_quant // eff)
        owned = []
        for sp in range(splits):
            lo, hi = sp * per * P, min(n_quant, (sp + 1) * per) * P
            owned.append(list(range(lo, min(hi, ctx))) if sp < eff else [])
        owned.append(list(range(n_quant * P, ctx)) + [ctx])
        # reference: each split's log2-sum-exp and mean; the combined log-sum-exp
        # the same scores in the query dtype (q . k in fp32, rounded): the bound's yardstick
        s_lowp = torch.einsum("hgd,shd->hgs", q.float(), k.to(dtype).float()).to(dtype).double() * scale
        s_lowp = s_lowp.reshape(Hq, n)
        v_rep = v.double().repeat_interleave(group, 1)  # (n, Hq, D)
        for sp, toks in enumerate(owned):
            got = part_lse[b, :, sp]
            if not toks:
                assert torch.isneginf(got).all(), f"sequence {b} split {sp}: empty split must report -inf"
                continue
            want = torch.logsumexp(s[:, toks], -1) * LOG2E
            lowp = torch.logsumexp(s_lowp[:, toks], -1) * LOG2E
            err, err_lowp = (got - want).abs().max().item(), (lowp - want).abs().max().item()
            assert err <= K_TOL * err_lowp + 1e-4, (
                f"sequence {b} split {sp}: part_lse off by {err:.3e} log2 units "
                f"({dtype} scores: {err_lowp:.3e})"
            )
            po = torch.einsum("hs,shd->hd", s[:, toks].softmax(-1), v_rep[toks])
            po_lowp = torch.einsum("hs,shd->hd", s_lowp[:, toks].softmax(-1), v_rep[toks].to(dtype).double())
            e, e_lowp = (part_o[b, :, sp] - po).abs().max().item(), (po_lowp - po).abs().max().item()
            assert e <= K_TOL * e_lowp + 1e-5, (
                f"sequence {b} split {sp}: part_o off by {e:.3e} ({e_lowp:.3e})"
            )
        total = torch.logsumexp(part_lse[b] / LOG2E, -1) * LOG2E
        want = torch.logsumexp(s, -1) * LOG2E
        lowp = torch.logsumexp(s_lowp, -1) * LOG2E
        assert (total - want).abs().max().item() <= K_TOL * (lowp - want).abs().max().item() + 1e-4
    assert out.shape == (B, Hq, D)


def check_decode_zero_length_rows(layout: PageLayout, dtype, group: int, device) -> None:
    """Padded batches (CUDA-graph padding): a zero-length query_start_loc entry, in the middle and at
    the end, with a non-zero seq_len. Its sequence is skipped (as in the reference) and no other
    sequence's output row is touched; rows no sequence owns keep their contents."""
    from kivi_serve.kernels import decode_attention

    P = layout.page_size
    seq_lens = [P + 9, 70, 2 * P + 1, 33, 5]
    case = build_decode_case(layout, dtype, group, seq_lens, seed=13)
    # sequence 1 and 4 have no new token; rows: seq 0 -> 0, seq 2 -> 1, seq 3 -> 2; row 3, 4 unused
    live = [(0, 0), (2, 1), (3, 2)]  # (sequence, row)
    for name in ("query", "key", "value"):
        moved = case[name].clone()
        for b, r in live:
            moved[r] = case[name][b]
        case[name] = moved
    case["query_start_loc"] = torch.tensor([0, 1, 1, 2, 3, 3], dtype=torch.int32)
    B, Hq, D = case["query"].shape
    ref = reference.paged_attention(**case, codec=layout)
    truth, lowp = attention_truth_and_lowp_rows(case, layout, rows=live)
    sentinel = torch.full((B, Hq, D), 7.0, dtype=dtype)
    for ns in (None, 1, 2):
        out = to(device, sentinel)
        decode_attention.paged_attention(**on(device, case), layout=layout, out=out, num_splits=ns)
        sync(device)
        out = out.cpu()
        assert (out[3:] == 7.0).all(), f"num_splits={ns}: a padded entry wrote an output row nobody owns"
        err_lowp = (lowp.double() - truth).abs().max().item()
        err = (out[:3].double() - truth).abs().max().item()
        assert err <= K_TOL * err_lowp + 1e-6, f"num_splits={ns}: error {err:.3e} (lowp {err_lowp:.3e})"
    assert (ref[:3].double() - truth).abs().max().item() <= K_TOL * err_lowp + 1e-6


def attention_truth_and_lowp_rows(case: dict, layout: PageLayout, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_truth_and_lowp for the (sequence, row) pairs given, stacked in that order."""
    sub = dict(case)
    seqs = [b for b, _ in rows]
    sub["query"] = torch.stack([case["query"][r] for _, r in rows])
    sub["key"] = torch.stack([case["key"][r] for _, r in rows])
    sub["value"] = torch.stack([case["value"][r] for _, r in rows])
    sub["block_tables"] = case["block_tables"][seqs]
    sub["seq_lens"] = case["seq_lens"][seqs]
    sub["tail_slots"] = case["tail_slots"][seqs]
    sub["query_start_loc"] = torch.arange(len(rows) + 1, dtype=torch.int32)
    return attention_truth_and_lowp(sub, layout)


# ----------------------------------------------------------------------------- decode: window and sinks
#: (layout, dtype, group) of the sliding-window / sink-logit decode cases (issue 15): GQA groups with
#: 8- and 16-row tiles, pages of 64 and 128, wide channels and the exact token, K outliers.
WINDOW_DECODE = [
    (PageLayout(128, 64), torch.bfloat16, 4),
    (PageLayout(64, 128), torch.float16, 12),
    (PageLayout(64, 64, k_outliers=1), torch.bfloat16, 2),
]
WINDOW_IDS = [f"{layout_id(lay)}-{dtype_id(dt)}-g{g}" for lay, dt, g in WINDOW_DECODE]


def window_cases(P: int) -> list[tuple[list[int], int]]:
    """(seq_lens, window) pairs: the window's first key (seq_len - window) on a page boundary, one
    token after and before it, inside the staging tail, a window smaller than a page, a window of the
    new token alone, a window longer than the sequence; pages wholly before it are skipped."""
    return [
        ([3 * P + 5, 2 * P + 1, P + 1], P),  # first key 2P + 5, P + 1, 1: inside a quantized page
        ([3 * P + 5, 2 * P + 5], 2 * P + 5),  # first key exactly on a page boundary (P, 0)
        ([3 * P + 5, 2 * P + 6], 2 * P + 4),  # first key P + 1, 2: one token of a page masked
        ([3 * P + 5], 2 * P + 6),  # first key P - 1: one token of the page before the boundary
        # smaller than a page: ending in the last quantized page (new token in it, or just after),
        # starting exactly at the staging tail, inside the tail
        ([4 * P, 4 * P + 1, 2 * P + 7, 3 * P + 20], 7),
        ([2 * P + 3, 5], 1),  # the new token alone
        ([P + 9, 40], 10 * P),  # longer than the sequences: nothing masked
    ]


def check_decode_window_sinks(layout: PageLayout, dtype, group: int, device) -> None:
    """Sliding window and sink logits against an fp64 truth with both (and the reference): every
    window of :func:`window_cases`, with and without sinks, the pages wholly before each sequence's
    window replaced by block 0 (garbage: they must not be read), every split count."""
    from kivi_serve.kernels import decode_attention
    from kivi_serve.kernels.semantics import LayerAttention

    P = layout.page_size
    for i, (seq_lens, window) in enumerate(window_cases(P)):
        case = build_decode_case(layout, dtype, group, seq_lens, seed=20 + i)
        Hq = case["query"].shape[1]
        gen = torch.Generator().manual_seed(7 + i)
        for with_sinks in (False, True):
            sinks = torch.randn(Hq, generator=gen) * 3 if with_sinks else None
            attn = LayerAttention(window=window, sinks=sinks)
            truth, lowp = attention_truth_and_lowp(case, layout, attn)
            run = dict(case)
            run["block_tables"] = case["block_tables"].clone()
            for b, n in enumerate(seq_lens):
                run["block_tables"][b, : max(0, n - window) // P] = 0  # vLLM's null block
            ref = reference.paged_attention(**run, codec=layout, attn=attn)
            err_lowp = (lowp.double() - truth).abs().max().item()
            assert (ref.double() - truth).abs().max().item() <= K_TOL * err_lowp + 1e-6
            g = on(device, run)
            g_attn = LayerAttention(window=window, sinks=None if sinks is None else to(device, sinks))
            for ns, msp in ((None, None), (3, 1)):
                out = decode_attention.paged_attention(
                    **g, layout=layout, attn=g_attn, num_splits=ns, min_split_pages=msp
                ).cpu()
                err = (out.double() - truth).abs().max().item()
                assert math.isfinite(err) and err <= K_TOL * err_lowp + 1e-6, (
                    f"seq_lens {seq_lens}, window {window}, sinks {with_sinks}, num_splits {ns}: "
                    f"error {err:.3e} > {K_TOL} x {err_lowp:.3e}"
                )
            assert_inputs_untouched(g, run)


def check_decode_refuses_softcap(layout: PageLayout, dtype, group: int, device) -> None:
    """A soft-capped layer is refused with a clear error (the kernel does not apply one), as are sinks
    of the wrong shape."""
    import pytest

    from kivi_serve.kernels import decode_attention
    from kivi_serve.kernels.semantics import LayerAttention

    case = on(device, build_decode_case(layout, dtype, group, [5, 70]))
    with pytest.raises(ValueError, match="soft-cap"):
        decode_attention.paged_attention(**case, layout=layout, attn=LayerAttention(softcap=30.0))
    bad = LayerAttention(sinks=to(device, torch.zeros(case["query"].shape[1] + 1)))
    with pytest.raises(ValueError, match="sinks"):
        decode_attention.paged_attention(**case, layout=layout, attn=bad)


#: The targeted decode checks: each is called as check(layout, dtype, group, device).
TARGETED_CHECKS = {
    "zero-query-mean-of-v": check_decode_zero_query_is_mean_of_v,
    "peaked-page-edges": check_decode_peaked_query,
    "part-lse": check_decode_part_lse,
    "zero-length-rows": check_decode_zero_length_rows,
}


def bad_append_cases(key_dtypes: str) -> tuple[tuple, list[tuple[tuple, str]]]:
    """Good ``append_kv`` arguments on the CPU (bf16, head_dim 128, 64-token pages, 2 KV heads) and
    the bad variants every wrapper refuses, each with the start of its ValueError (``key_dtypes``: the
    wrapper's "key must be ..." list)."""
    layout = PageLayout(128, 64)
    plan = StagingPool(num_slots=2, page_size=64).plan([[1]], [3], [3])
    k = torch.zeros(3, 2, 128, dtype=torch.bfloat16)
    pages = torch.zeros(2, 2, layout.page_bytes, dtype=torch.uint8)
    staging = torch.zeros(2, 2, 2, 64, 128, dtype=torch.bfloat16)
    cases = [
        ((plan, k.double(), k, pages, staging, layout), f"key must be {key_dtypes}"),
        ((plan, k, k[:2], pages, staging, layout), "value must have shape"),
        ((plan, k, k, pages, staging.half(), layout), "staging must be bfloat16"),
        ((plan, k, k, pages[:, :1].contiguous(), staging, layout), "kv_pages has 1 KV heads"),
        ((plan, k[:2], k[:2], pages, staging, layout), "plan.token_slots must have shape"),
    ]
    return (plan, k, k, pages, staging, layout), cases


#: Changes of ``tests/test_kernels_cuda.py::_cpu_decode_args`` (layout PageLayout(128, 64)) that every
#: ``paged_attention`` wrapper refuses, with the start of its ValueError.
BAD_DECODE_ARGS = [
    ({"query": torch.zeros(2, 8, 64, dtype=torch.bfloat16)}, "query: head_dim"),
    ({"key": torch.zeros(3, 2, 128, dtype=torch.bfloat16)}, "key must have shape"),
    ({"value": torch.zeros(2, 2, 128, dtype=torch.float16)}, "value must be bfloat16"),
    ({"kv_pages": torch.zeros(3, 2, 100, dtype=torch.uint8)}, "kv_pages must be"),
    ({"block_tables": torch.zeros(2, 2, dtype=torch.int64)}, "block_tables must be int32"),
    ({"seq_lens": torch.ones(3, dtype=torch.int32)}, "seq_lens must have shape"),
    ({"query_start_loc": torch.arange(2, dtype=torch.int32)}, "query_start_loc must have shape"),
]


# ----------------------------------------------------------------------------- 256-token pages, vr flags
def vr_layout_id(layout: PageLayout) -> str:
    """:func:`layout_id` plus the value flags (``-rot`` rotated values, ``-free`` free V codebook ends)."""
    return layout_id(layout) + ("-rot" if layout.v_rotate else "") + ("" if layout.v_pin_ends else "-free")


def p256(head_dim: int, **flags) -> PageLayout:
    """The page of kivi-serve-2bit-p256 (7D/16 wide K channels); ``v_rotate=True, v_pin_ends=False``:
    kivi-serve-2bit-p256-vr."""
    return PageLayout(head_dim, 256, wide_channels=7 * head_dim // 16, **flags)


VR = {"v_rotate": True, "v_pin_ends": False}
#: Append schedules (bit-exact pages and staging, early finalisation, a page completed from its own
#: block, re-opening): 256-token pages with the fixed-point values kept in shared memory (D = 128); the
#: vr page at D = 128 (rotated fp32 tile: fixed-point values recomputed where read).
P256_APPEND = [
    (p256(128), torch.bfloat16, "fitted"),
    (p256(128, **VR), torch.bfloat16, "fitted"),
]
P256_APPEND_IDS = [f"{vr_layout_id(lay)}-{dtype_id(dt)}-{cb}" for lay, dt, cb in P256_APPEND]
#: Early finalisation (fills 1 .. P - 1, ties, all-zero scales): each flag alone, the p256-vr page, and
#: the p256 page at D = 256 (Gemma-3: the fixed-point values recomputed, 112 wide channels).
P256_EARLY = [
    (PageLayout(64, 64, v_rotate=True), torch.float16),
    (PageLayout(64, 128, v_pin_ends=False), torch.bfloat16),
    (p256(64, **VR), torch.bfloat16),
    (p256(256), torch.bfloat16),
]
P256_EARLY_IDS = [f"{vr_layout_id(lay)}-{dtype_id(dt)}" for lay, dt in P256_EARLY]
#: Dequantize (values rotated back before the exact token's override) at pages 256 and 64.
P256_DEQUANT = [
    (p256(64, **VR), torch.float16),
    (PageLayout(128, 64, **VR), torch.bfloat16),
    (p256(256), torch.bfloat16),
]
P256_DEQUANT_IDS = [f"{vr_layout_id(lay)}-{dtype_id(dt)}" for lay, dt in P256_DEQUANT]
#: Decode (layout, dtype, group, batch): 256-token pages with 8-row tiles (two chunks per softmax step);
#: the vr page with 8-row tiles (exact value rotated per page, rows rotated back per split) and 16-row
#: tiles; the D = 256 warp pair (each warp reads its partner's rotated exact value); vr at page 64 with
#: its staging tails. The batches with pages at P = 256: "ragged" (1000 tokens: 3 pages and a tail, a
#: warp cycles its ring) and "early_tails" (pages finalised early, read quantized); one each (emulating
#: 256-token pages costs ~15 s a batch).
P256_DECODE = [
    (p256(128), torch.bfloat16, 4, "early_tails"),
    (p256(128, **VR), torch.bfloat16, 8, "ragged"),
    (p256(64, **VR), torch.float16, 12, "ragged"),
    (PageLayout(256, 64, **VR), torch.bfloat16, 16, "ragged"),
    (PageLayout(128, 64, **VR), torch.bfloat16, 4, "page_edges"),
]
P256_DECODE_IDS = [f"{vr_layout_id(lay)}-{dtype_id(dt)}-g{g}-{b}" for lay, dt, g, b in P256_DECODE]
