"""CPU append: :func:`append_kv` executes an AppendPlan like :func:`kivi_serve.kernels.reference.append_kv`.

Same signature as the CUDA wrapper (:func:`kivi_serve.kernels.quantize_append.append_kv`), on CPU
tensors, bit-identical to the reference (pages and staging), any page layout. ``quantize.cpp``
holds two page primitives — quantize a batch of pages, each from up to two row sources (bit for
bit :func:`kivi_serve.quant.page.quantize_pages`), and dequantize pages — and ``kivi_append``, the
thin glue that executes a plan with them in the reference's order: (1) evict + finalize in one
parallel batch, (2) reopen, (3) this step's tokens into staging. A change of the plan's shape
touches that glue and :func:`append_kv` only. A decode step is (3) alone, plus (1) when a page fills.

:func:`quantize_pages` and :func:`dequantize_pages` expose the primitives with the signatures of
:mod:`kivi_serve.quant.page` (the tests compare them with it directly).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from kivi_serve.kernels import _checks, reference
from kivi_serve.kernels.cpu import loader
from kivi_serve.quant.codebook import MODES
from kivi_serve.quant.codec import QuantCodec
from kivi_serve.quant.layout import PageLayout

MODEL_DTYPES = tuple(loader.DTYPE_CODES)
_NULL = 0


def cpu(**named: torch.Tensor | None) -> None:
    """Every tensor argument on the CPU."""
    for name, x in named.items():
        if x is not None and x.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got {x.device}")


def _check_layout(layout) -> PageLayout:
    if not isinstance(layout, PageLayout):
        raise ValueError(f"layout must be a PageLayout, got {type(layout).__name__}")
    return layout


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr() if t.numel() else _NULL


# ----------------------------------------------------------------------------------- append
_LISTS = ("plan.evict", "plan.finalize", "plan.reopen", "plan.token_slots / token_offsets")


def _plain_append(plan, key, value, kv_pages, staging, layout, codebook) -> bool:
    """True when every argument is in the expected form, in one cheap pass (once per layer per
    step); anything else goes through :func:`_validate_append`, which names what is wrong. Page
    ops lists that are empty are not looked into: the kernel reads nothing of them."""
    dt = key.dtype
    if not (isinstance(layout, PageLayout) and dt in loader.DTYPE_CODES and codebook in MODES):
        return False
    if key.dim() != 3 or staging.dim() != 5 or kv_pages.dim() not in (3, 4):
        return False
    T, H, D = kshape = key.shape
    ints = [plan.token_slots, plan.token_offsets]
    for name, fields in _checks.PLAN_OPS.items():
        ops = getattr(plan, name)
        if len(ops):
            ints += [getattr(ops, f) for f in fields if f != "sinks"]
            if ops.sinks.dtype is not torch.bool or ops.sinks.shape != (len(ops),):
                return False
    if not all(t.is_cpu and t.is_contiguous() for t in (key, value, kv_pages, staging, *ints)):
        return False
    pages_ok = (
        kv_pages.shape[1:] == (H, layout.page_bytes)
        if kv_pages.dim() == 3
        else kv_pages.shape[1:] == (H, layout.page_size, layout.slot_bytes)
    )
    n_tok = plan.token_slots.shape == (T,) and plan.token_offsets.shape == (T,)
    return (
        pages_ok and n_tok and D == layout.head_dim and value.dtype is dt
        and kv_pages.dtype is torch.uint8 and value.shape == kshape
        and loader.staging_ok(staging, dt, H, layout.page_size, D)
        and all(t.dtype is torch.int32 and t.dim() == 1 for t in ints)
        and all(
            getattr(getattr(plan, name), f).shape == (len(getattr(plan, name)),)
            for name, fields in _checks.PLAN_OPS.items() if len(getattr(plan, name))
            for f in fields
        )
    )  # fmt: skip


def _validate_append(plan, key, value, kv_pages, staging, layout, codebook) -> None:
    """Raise a ValueError naming the first argument that is not as :func:`append_kv` needs."""
    cpu(
        **_checks.append_arguments(
            plan, key, value, kv_pages, staging, _check_layout(layout), codebook, MODEL_DTYPES
        )
    )


def append_kv(
    plan, key: Tensor, value: Tensor, kv_pages: Tensor, staging: Tensor, layout: PageLayout,
    codebook: str = "fitted",
) -> None:  # fmt: skip
    """Execute one step's :class:`~kivi_serve.backend.staging.AppendPlan` for one layer on the CPU.

    Arguments as :func:`kivi_serve.kernels.reference.append_kv` (``layout``: any PageLayout, with the
    ``codebook`` mode, "fitted" or "uniform"), on CPU tensors: int32 index tensors and bool sinks in
    the plan, float32, bfloat16 or float16 ``key``/``value``, staging in their dtype or as int8 rows.
    Every index of the plan is range-checked before anything is written (ValueError otherwise).
    """
    if not _plain_append(plan, key, value, kv_pages, staging, layout, codebook):
        _validate_append(plan, key, value, kv_pages, staging, layout, codebook)
    T, H = key.shape[0], key.shape[1]
    pages = kv_pages.view(kv_pages.shape[0], H, layout.page_bytes)
    ev, fin, re = plan.evict, plan.finalize, plan.reopen
    lib = loader.library()
    if lib is None:
        reference.append_kv(plan, key, value, pages, staging, QuantCodec(layout, codebook))
        return
    err = (ctypes.c_int32 * 2)(-1, 0)
    status = lib.kivi_append(
        loader.layout_struct(layout), loader.DTYPE_CODES[key.dtype], _ptr(key), _ptr(value), T, H,
        staging.data_ptr(), staging.shape[0], loader.staging_code(staging, key.dtype),
        pages.data_ptr(), pages.shape[0], _ptr(plan.token_slots), _ptr(plan.token_offsets),
        _ptr(ev.blocks), _ptr(ev.slots), _ptr(ev.fills), _ptr(ev.sinks), len(ev),
        _ptr(fin.blocks), _ptr(fin.slots), _ptr(fin.fills), _ptr(fin.sinks), _ptr(fin.starts),
        _ptr(fin.prefix), len(fin),
        _ptr(re.blocks), _ptr(re.slots), len(re),
        int(codebook == "uniform"), loader.num_threads(), err,
    )  # fmt: skip
    if status:
        which = _LISTS[err[0]] if 0 <= err[0] < len(_LISTS) else "plan"
        raise ValueError(f"append_kv: {which} holds {loader.STATUS.get(status, status)} (value {err[1]})")


# ----------------------------------------------------------------------------------- primitives
def quantize_pages(
    k: Tensor, v: Tensor, layout: PageLayout, fill: Tensor | None = None, sink: Tensor | None = None,
    codebook: str = "fitted",
) -> Tensor:  # fmt: skip
    """The C++ encoder with the signature of :func:`kivi_serve.quant.page.quantize_pages` (bit for bit
    its result; no ``exact_idx`` override).

    k, v : (n, P, D) float32 / bfloat16 / float16 · fill : (n,) int in [1, P] (default P) ·
    sink : (n,) bool (default False) → (n, page_bytes) uint8.
    """
    layout = _check_layout(layout)
    cpu(k=k, v=v)
    k, v = k.contiguous(), v.contiguous()  # like the spec, any strides (a copy when needed)
    _checks.tensor("k", k, dtype=MODEL_DTYPES, shape=(None, layout.page_size, layout.head_dim))
    n = k.shape[0]
    _checks.tensor("v", v, dtype=k.dtype, shape=tuple(k.shape))
    if codebook not in MODES:
        raise ValueError(f"codebook must be one of {MODES}, got {codebook!r}")
    fill = torch.full((n,), layout.page_size, dtype=torch.int32) if fill is None else fill.to(torch.int32)
    sink = torch.zeros(n, dtype=torch.bool) if sink is None else sink.to(torch.bool)
    if fill.shape != (n,) or sink.shape != (n,):
        raise ValueError(f"fill and sink must have shape ({n},)")
    fill, sink = fill.contiguous(), sink.contiguous()
    lib = loader.library()
    if lib is None:
        from kivi_serve.quant.page import quantize_pages as spec

        return spec(k, v, layout, fill=fill, sink=sink, codebook=codebook)
    pages = torch.empty(n, layout.page_bytes, dtype=torch.uint8)
    if n:
        status = lib.kivi_quantize_pages(
            loader.layout_struct(layout), n, loader.DTYPE_CODES[k.dtype], k.data_ptr(), v.data_ptr(),
            fill.data_ptr(), sink.data_ptr(), pages.data_ptr(),
            int(codebook == "uniform"), loader.num_threads(),
        )  # fmt: skip
        if status:
            raise ValueError(f"fill must be in [1, {layout.page_size}]")
    return pages


def dequantize_blocks(
    kv_pages: torch.Tensor, blocks: torch.Tensor, layout: PageLayout, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize whole blocks (all KV heads), e.g. for prefill over cached pages.

    kv_pages : (NB, Hkv, page_bytes) or (NB, Hkv, P, C) uint8 · blocks : (n,) int32 (entries < 0
    are skipped: their rows stay zero) · dtype : float32, bfloat16 or float16 → (k, v), each
    (n, Hkv, P, D) of ``dtype``: the reference's decoding rounded to ``dtype`` (bit-equal).
    """
    layout = _check_layout(layout)
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    pages = _checks.pages("kv_pages", kv_pages, layout)
    _checks.tensor("blocks", blocks, dtype=torch.int32, dims=1)
    cpu(kv_pages=kv_pages, blocks=blocks)
    NB, H = pages.shape[:2]
    P, D = layout.page_size, layout.head_dim
    n = blocks.shape[0]
    k = torch.zeros(n, H, P, D, dtype=dtype)
    v = torch.zeros_like(k)
    keep = (blocks >= 0).nonzero().squeeze(1)
    if keep.numel() == 0:
        return k, v
    chosen = blocks[keep].long()
    if int(chosen.max()) >= NB:
        raise ValueError(f"blocks must lie in [0, {NB}) (or be < 0 to skip), got {int(chosen.max())}")
    lib = loader.library()
    if lib is None:
        kr, vr = QuantCodec(layout).decode(pages[chosen].reshape(-1, layout.page_bytes))
        k[keep] = kr.reshape(-1, H, P, D).to(dtype)
        v[keep] = vr.reshape(-1, H, P, D).to(dtype)
        return k, v
    heads = torch.arange(H, dtype=torch.int64)
    src = (pages.data_ptr() + (chosen.unsqueeze(1) * H + heads) * layout.page_bytes).reshape(-1)
    rows = (keep.unsqueeze(1) * H + heads).reshape(-1) * (P * D * k.element_size())
    dst_k, dst_v = (k.data_ptr() + rows).contiguous(), (v.data_ptr() + rows).contiguous()
    lib.kivi_dequantize_pages(
        loader.layout_struct(layout), src.numel(), src.contiguous().data_ptr(),
        dst_k.data_ptr(), dst_v.data_ptr(), loader.DTYPE_CODES[dtype], loader.num_threads(),
    )  # fmt: skip
    return k, v


def dequantize_pages(
    pages: torch.Tensor, layout: PageLayout, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kivi_serve.quant.page.dequantize_pages` rounded to ``dtype`` (float32: bit-equal to it).

    pages : (n, page_bytes) uint8 → (k, v), each (n, P, D) of ``dtype``.
    """
    layout = _check_layout(layout)
    _checks.tensor("pages", pages, dtype=torch.uint8, shape=(None, layout.page_bytes))
    n = pages.shape[0]
    k, v = dequantize_blocks(
        pages.view(n, 1, layout.page_bytes), torch.arange(n, dtype=torch.int32), layout, dtype
    )
    return k[:, 0], v[:, 0]
