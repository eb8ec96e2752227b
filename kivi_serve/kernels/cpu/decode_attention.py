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

This wrapper runs once per layer per decode step, and at short context the kernel itself takes
tens of microseconds, so its own cost is kept to a few: every tensor attribute is read once
(:func:`_plain`, the common case; :func:`_validate` names what is wrong otherwise) and the C
arguments go over as one int64 block (``decode.cpp`` ``DecodeArg``).
"""

from __future__ import annotations

import ctypes
import math
import threading

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
    dims = _plain(batch, layout, out)
    if dims is None:
        _validate(batch, layout, out)
        dims = _dims(batch, layout)
    T, Hq, D, H, B, dtype, num_blocks, num_slots, staging_dtype, bt_stride, struct = dims
    if not (type(scale) is float and 0.0 < scale < math.inf):  # noqa: E721 — the common case, checked fast
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
    try:
        block = _local.block
    except AttributeError:
        block = _local.block = _ARGS()
    block[:_N_IN] = (  # decode.cpp DecodeArg, in order
        dtype, query.data_ptr(), key.data_ptr(), value.data_ptr(), kv_pages.data_ptr(), num_blocks, H,
        staging.data_ptr(), num_slots, staging_dtype, block_tables.data_ptr(), bt_stride, seq_lens.data_ptr(),
        query_start_loc.data_ptr(), tail_slots.data_ptr(), B, Hq, T, out.data_ptr(), num_splits or 0,
        _num_threads(),
    )  # fmt: skip
    status = lib.kivi_decode(struct, block, scale)
    if status:
        loader.check(status, "paged_attention", (block[_N_IN], block[_N_IN + 1]))
    return out


#: ``kivi_decode``'s argument block (decode.cpp ``DecodeArg``): 21 inputs, then err (2). One per
#: thread, reused: filling it costs ~0.5 us, making a new one from a tuple ~2 us.
_N_IN = 21
_ARGS = ctypes.c_int64 * (_N_IN + 2)
_local = threading.local()
_DTYPE_CODES = loader.DTYPE_CODES
_STAGING_I8 = loader.STAGING_I8
_num_threads = torch.get_num_threads
_UINT8 = torch.uint8
_INT32 = torch.int32


def _plain(batch: tuple, layout, out) -> tuple | None:
    """:func:`_dims` when every argument is in the expected form, checked in one cheap pass (this
    runs once per layer per step: every attribute read counts, ~0.1 us each); None for anything
    else, which then goes through :func:`_validate` (it names what is wrong). ``batch``:
    :func:`paged_attention`'s tensors from ``query`` to ``tail_slots``, in order."""
    query, key, value, kv_pages, staging, block_tables, seq_lens, query_start_loc, tail_slots = batch
    dt = query.dtype
    if type(layout) is not PageLayout or dt not in _DTYPE_CODES:
        return None
    struct, (head_dim, page_size, page_bytes, two_bit) = loader.layout_info(layout)
    if not (
        two_bit
        and query.is_cpu and query.is_contiguous() and key.is_cpu and key.is_contiguous()
        and value.is_cpu and value.is_contiguous() and kv_pages.is_cpu and kv_pages.is_contiguous()
        and staging.is_cpu and staging.is_contiguous()
        and block_tables.is_cpu and block_tables.is_contiguous()
        and seq_lens.is_cpu and seq_lens.is_contiguous() and query_start_loc.is_cpu
        and query_start_loc.is_contiguous() and tail_slots.is_cpu and tail_slots.is_contiguous()
        and (out is None or (out.is_cpu and out.is_contiguous() and out.dtype is dt))
    ):  # fmt: skip
        return None
    qshape, kshape, pshape, bshape = query.shape, key.shape, kv_pages.shape, block_tables.shape
    sshape = staging.shape
    if len(qshape) != 3 or len(kshape) != 3 or len(pshape) != 3 or len(bshape) != 2 or len(sshape) != 5:
        return None
    T, Hq, D = qshape
    H, B = kshape[1], bshape[0]
    sdt = staging.dtype
    if not (
        key.dtype is dt
        and value.dtype is dt
        and kv_pages.dtype is _UINT8
        and block_tables.dtype is _INT32
        and seq_lens.dtype is _INT32
        and query_start_loc.dtype is _INT32
        and tail_slots.dtype is _INT32
        and D == head_dim
        and H > 0
        and Hq % H == 0
        and kshape[0] == T
        and kshape[2] == D
        and value.shape == kshape
        and pshape[1] == H
        and pshape[2] == page_bytes
        and sshape[1] == 2
        and sshape[2] == H
        and sshape[3] == page_size
        and ((sdt is _UINT8 and sshape[4] == D + 4) or (sdt is dt and sshape[4] == D))
        and seq_lens.shape == (B,)
        and tail_slots.shape == (B,)
        and query_start_loc.shape == (B + 1,)
        and (out is None or out.shape == qshape)
    ):
        return None
    code = _DTYPE_CODES[dt]
    sdt_code = _STAGING_I8 if sdt is _UINT8 else code
    return T, Hq, D, H, B, code, pshape[0], sshape[0], sdt_code, bshape[1], struct


def _dims(batch: tuple, layout: PageLayout) -> tuple:
    """``(T, Hq, D, Hkv, B, dtype code, num_blocks, num_slots, staging code, table stride, layout's C
    struct)`` of valid arguments (``kv_pages`` may be 4-d: its blocks are its first dimension either
    way)."""
    query, key, _, kv_pages, staging, block_tables = batch[:6]
    T, Hq, D = query.shape
    code = _DTYPE_CODES[query.dtype]
    sdt_code = loader.staging_code(staging, query.dtype)
    return (T, Hq, D, key.shape[1], block_tables.shape[0], code, kv_pages.shape[0], staging.shape[0],
            sdt_code, block_tables.shape[1], loader.layout_struct(layout))  # fmt: skip


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
