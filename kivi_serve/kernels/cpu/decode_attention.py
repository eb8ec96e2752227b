"""CPU decode attention: :func:`paged_attention` for the rows of a batch that decode one token.

Same signature as the CUDA wrapper (:func:`kivi_serve.kernels.decode_attention.paged_attention`)
and the semantics of :func:`kivi_serve.kernels.reference.paged_attention`, on CPU tensors, for the
sequences whose query length is 1; the rows of every other sequence (prefill chunks, zero-length
padding) are neither read nor written. One call of ``kivi_decode`` (``decode.cpp``): OpenMP over
(sequence, KV head, split), the 2-bit pages read in place (no dequantized copy, no gather
buffer), a log-sum-exp merge of the splits.

Supported: query/key/value/staging in one of float32, bfloat16, float16; head_dim 64/128/256;
pages of 64/128/256 tokens; 2-bit K and V codes with or without the exact token, K outliers and
wide K channels; any GQA group.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from kivi_serve.kernels import _checks, reference
from kivi_serve.kernels.cpu import loader
from kivi_serve.kernels.cpu.quantize_append import MODEL_DTYPES, _check_layout, cpu
from kivi_serve.quant.codec import QuantCodec
from kivi_serve.quant.layout import PageLayout


def paged_attention(
    query: Tensor, key: Tensor, value: Tensor, kv_pages: Tensor, staging: Tensor,
    block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor, tail_slots: Tensor,
    layout: PageLayout, scale: float | None = None, *,
    out: Tensor | None = None, num_splits: int | None = None,
) -> Tensor:  # fmt: skip
    """Decode attention over the paged 2-bit cache + the staging tail + each sequence's new token.

    Arguments and result as :func:`kivi_serve.kernels.reference.paged_attention` (``layout``: a
    PageLayout with 2-bit codes), on CPU tensors: ``query``, ``key``, ``value``, ``out`` and
    model-dtype staging in one of float32, bfloat16, float16; int32 index tensors. Only the sequences
    with exactly one row are attended; the rows of the others are neither read nor written. Also:

    out : torch.Tensor, shape (T, Hq, D), dtype of ``query``, optional — written in the decode
        rows only (without it, the other rows of the result are unspecified); returned when given.
    num_splits : int, optional — page splits per sequence (default: enough items for every thread).
    """
    batch = (query, key, value, kv_pages, staging, block_tables, seq_lens, query_start_loc, tail_slots)
    if not _plain(batch, layout, out):
        _validate(batch, layout, out)
    T, Hq, D = query.shape
    H = key.shape[1]
    B = block_tables.shape[0]
    scale = _checks.softmax_scale(scale, D)
    if num_splits is not None and not (isinstance(num_splits, int) and num_splits >= 1):
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    if out is None:
        out = torch.empty(T, Hq, D, dtype=query.dtype)
    if B == 0 or T == 0:
        return out
    lib = loader.library()
    if lib is None:
        pages = _checks.pages("kv_pages", kv_pages, layout)
        reference.decode_rows(*batch[:3], pages, *batch[4:], QuantCodec(layout), scale, out)
        return out
    err = (ctypes.c_int32 * 2)(-1, 0)
    status = lib.kivi_decode(
        loader.layout_struct(layout), loader.DTYPE_CODES[query.dtype],
        query.data_ptr(), key.data_ptr(), value.data_ptr(),
        kv_pages.data_ptr(), kv_pages.shape[0], H,
        staging.data_ptr(), staging.shape[0], loader.staging_code(staging, query.dtype),
        block_tables.data_ptr(), block_tables.shape[1], seq_lens.data_ptr(), query_start_loc.data_ptr(),
        tail_slots.data_ptr(), B, Hq, T, scale, out.data_ptr(),
        num_splits or 0, loader.num_threads(), err,
    )  # fmt: skip
    loader.check(status, "paged_attention", (err[0], err[1]))
    return out


_INT32 = torch.int32


def _plain(batch: tuple, layout, out) -> bool:
    """True when every argument is in the expected form, in one cheap pass (this runs once per layer
    per step); anything else goes through :func:`_validate`, which names what is wrong. ``batch``:
    :func:`paged_attention`'s tensors from ``query`` to ``tail_slots``, in order."""
    query, key, value, kv_pages, staging, block_tables, seq_lens, query_start_loc, tail_slots = batch
    dt = query.dtype
    if not (
        isinstance(layout, PageLayout)
        and dt in loader.DTYPE_CODES
        and layout.k_bits == 2
        and layout.v_bits == 2
    ):
        return False
    if not all(t.is_cpu and t.is_contiguous() for t in (*batch, out) if t is not None):
        return False
    if query.dim() != 3 or staging.dim() != 5 or kv_pages.dim() != 3 or block_tables.dim() != 2:
        return False
    T, Hq, D = qshape = query.shape
    H = key.shape[1] if key.dim() == 3 else 0
    B = block_tables.shape[0]
    kshape = (T, H, D)
    return (
        key.dtype is dt
        and value.dtype is dt
        and kv_pages.dtype is torch.uint8
        and block_tables.dtype is _INT32
        and seq_lens.dtype is _INT32
        and query_start_loc.dtype is _INT32
        and tail_slots.dtype is _INT32
        and (out is None or (out.dtype is dt and out.shape == qshape))
        and D == layout.head_dim
        and H > 0
        and Hq % H == 0
        and key.shape == kshape
        and value.shape == kshape
        and loader.staging_ok(staging, dt, H, layout.page_size, D)
        and kv_pages.shape[1:] == (H, layout.page_bytes)
        and seq_lens.shape == (B,)
        and tail_slots.shape == (B,)
        and query_start_loc.shape == (B + 1,)
    )


def _validate(batch: tuple, layout, out) -> None:
    """Raise a ValueError naming the first argument that is not as :func:`paged_attention` needs
    (arguments as :func:`_plain`)."""
    layout = _check_layout(layout)
    if (layout.k_bits, layout.v_bits) != (2, 2):
        raise ValueError(
            "layout: the CPU decode kernel reads 2-bit codes, "
            f"got k_bits={layout.k_bits} v_bits={layout.v_bits}"
        )
    cpu(**_checks.decode_arguments(*batch, out, layout, MODEL_DTYPES))
