"""CUDA append: :func:`append_kv` executes an AppendPlan like :func:`kivi_serve.kernels.reference.append_kv`.

Launches (on ``torch.cuda.current_stream()``, no host sync, no allocation), in the plan's order:

1. ``kivi_append`` for the ``evict`` and ``finalize`` ops (both only read staging and write
   distinct blocks): a page's first ``prefix`` tokens come from its slot (or, finalised early,
   from its own block, dequantized), the rest from this step's key/value;
2. ``kivi_reopen`` for the ``reopen`` ops, into their new slots (decoded, rounded to the model
   dtype, stored as staging rows);
3. ``kivi_append`` with write CTAs only: this step's tokens of open pages → staging.

A decode step is launch 3 alone, plus launch 1 when a page fills; launch 2 happens only after the
staging pool overflowed. Launch sizes come from the plan's (host-known) lengths. Supported:
fp16/bf16 key/value, staging in the same dtype or as int8 rows
(:mod:`kivi_serve.quant.staging`; the kernels are compiled per staging format, ``KIVI_STAGING``),
head_dim 64/128/256, page size 64/128/256, any code widths of the layout (2/3/4), with or without
exact token, K outliers and wide K channels (``wide_channels``: ``k_bits + 1``-bit codes against
their own codebook, top bit in ``wide_plane``), the value flags (``v_rotate``: values quantized after
the signed-Hadamard rotation, dequantized rotated back; ``v_pin_ends=False``: free V codebook ends;
rotated values at head_dim 256 x page 256 are refused), ``codebook`` "fitted" or "uniform". Meant to be
bit-identical to the reference (tests/test_kernels_cuda.py) up to one documented corner: the
exact-token choice sums its fp64 score in another order than torch, which can only matter for two
tokens whose scores agree to ~1e-16.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from kivi_serve.kernels import _checks, loader
from kivi_serve.quant import staging as staging_format


def append_kv(
    plan, key: Tensor, value: Tensor, kv_pages: Tensor, staging: Tensor, layout, codebook: str = "fitted"
) -> None:
    """Execute one step's :class:`~kivi_serve.backend.staging.AppendPlan` for one layer on the GPU.

    Arguments as :func:`kivi_serve.kernels.reference.append_kv` (``layout``: a PageLayout, with the
    ``codebook`` mode, "fitted" or "uniform"), on one CUDA device: the plan moved there
    (``plan.to(device)``: int32 index tensors, bool sinks), float16 or bfloat16 ``key``/``value``,
    staging in their dtype or as int8 rows.
    """
    named = _checks.append_arguments(
        plan, key, value, kv_pages, staging, layout, codebook, _checks.MODEL_DTYPES, align=16
    )
    T, H, D = key.shape
    pages = kv_pages.view(kv_pages.shape[0], H, layout.page_bytes)
    compact = staging_format.is_compact(staging)
    spec = loader.spec_for("quantize_append", layout, key.dtype, staging=int(compact))
    device = _checks.devices(**named)

    mod = loader.module_for(spec, device)
    i32 = np.int32
    null = loader.ptr(None)

    def op_args(ops, with_prefix: bool) -> tuple:
        if not len(ops):
            return (null,) * 6 + (i32(0),)
        tail = (loader.ptr(ops.starts), loader.ptr(ops.prefix)) if with_prefix else (null, null)
        return (
            loader.ptr(ops.blocks),
            loader.ptr(ops.slots),
            loader.ptr(ops.fills),
            loader.ptr(ops.sinks),
            *tail,
            i32(len(ops)),
        )

    def append(write_ctas: int, n_tokens: int, a, b) -> None:
        n_ops = len(a) + len(b)
        if write_ctas + n_ops == 0:
            return
        args = (
            loader.ptr(key),
            loader.ptr(value),
            loader.ptr(staging),
            loader.ptr(pages),
            loader.ptr(plan.token_slots) if n_tokens else null,
            loader.ptr(plan.token_offsets) if n_tokens else null,
            i32(n_tokens),
            i32(write_ctas),
            *op_args(a, False),
            *op_args(b, True),
            i32(H),
            i32(codebook == "uniform"),
        )
        smem = mod.smem_bytes if n_ops else 0
        loader.launch(mod["kivi_append"], (write_ctas + n_ops, H), (mod.threads,), args, smem, device)

    # 1. early finalisation (evict) and pages that became full (finalize)
    append(0, 0, plan.evict, plan.finalize)
    # 2. re-opened pages back into their new slots
    n_re = len(plan.reopen)
    if n_re:
        args = (
            loader.ptr(pages),
            loader.ptr(plan.reopen.blocks),
            loader.ptr(plan.reopen.slots),
            i32(H),
            loader.ptr(staging),
        )
        loader.launch(mod["kivi_reopen"], (n_re, H), (256,), args, 0, device)
    # 3. this step's tokens of open pages → staging (int8 rows: a warp per token)
    tokens_per_cta = mod.threads // 32 if compact else mod.threads // (D * key.element_size() // 16)
    append(-(-T // tokens_per_cta) if T else 0, T, (), ())


def _dequantize(pages3: torch.Tensor, blocks: torch.Tensor | None, layout, dtype) -> torch.Tensor:
    device = pages3.device
    n = blocks.shape[0] if blocks is not None else pages3.shape[0]
    H, P, D = pages3.shape[1], layout.page_size, layout.head_dim
    out = torch.empty(2, n, H, P, D, dtype=dtype, device=device)
    if n:
        spec = loader.spec_for("quantize_append", layout, dtype)
        mod = loader.module_for(spec, device)
        args = (
            loader.ptr(pages3),
            loader.ptr(blocks),
            np.int32(H),
            loader.ptr(out),
            loader.ptr(None),
            np.int64(H * P * D),
            np.int64(n * H * P * D),
        )
        loader.launch(mod["kivi_dequantize"], (n, H), (256,), args, 0, device)
    return out


def dequantize_pages(
    pages: torch.Tensor, layout, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPU :func:`kivi_serve.quant.page.dequantize_pages`, rounded to ``dtype``.

    pages : (n, page_bytes) uint8 → (k, v), each (n, P, D) of ``dtype`` (float16 or bfloat16); bit-equal
    to ``page.dequantize_pages(pages, layout)[i].to(dtype)``.
    """
    _checks.tensor("pages", pages, dtype=torch.uint8, shape=(None, layout.page_bytes), align=16)
    if dtype not in _checks.MODEL_DTYPES:
        raise ValueError(f"dtype must be float16 or bfloat16, got {dtype}")
    loader.spec_for("quantize_append", layout, dtype)
    _checks.devices(pages=pages)
    out = _dequantize(pages.view(pages.shape[0], 1, layout.page_bytes), None, layout, dtype)
    return out[0, :, 0], out[1, :, 0]


def dequantize_blocks(
    kv_pages: torch.Tensor, blocks: torch.Tensor, layout, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize whole blocks (all KV heads) for prefill over cached pages.

    kv_pages : (NB, Hkv, page_bytes) or (NB, Hkv, P, C) uint8 · blocks : (n,) int32 (entries < 0 are
    skipped and their output is left unwritten) → (k, v), each (n, Hkv, P, D) of ``dtype``.
    """
    if dtype not in _checks.MODEL_DTYPES:
        raise ValueError(f"dtype must be float16 or bfloat16, got {dtype}")
    pages3 = _checks.pages("kv_pages", kv_pages, layout)
    _checks.tensor("blocks", blocks, dtype=torch.int32, dims=1)
    loader.spec_for("quantize_append", layout, dtype)
    _checks.devices(kv_pages=kv_pages, blocks=blocks)
    out = _dequantize(pages3, blocks, layout, dtype)
    return out[0], out[1]
