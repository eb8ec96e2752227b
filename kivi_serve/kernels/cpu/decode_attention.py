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

The backend runs decode attention once per layer per step over the same step metadata, and at short
context the kernel itself takes ~20 microseconds, so the per-call cost is split:
:class:`DecodeBatch` checks the step's metadata (block tables, lengths, query_start_loc, tail slots;
their shapes here, their contents in C) once per step, and its :meth:`~DecodeBatch.attend` then
checks and passes only one layer's tensors (query / key / value / out may be row-strided views, as
vLLM hands them over; no copies). The kernel compares the metadata tensors with what was checked on
every call, so a batch kept past its step is refused, never run on changed block ids.
:func:`paged_attention` is the one-call form (both at once). Every tensor attribute is read once
(:func:`_plain`, the common case; :func:`_validate` names what is wrong otherwise) and the C
arguments go over as int64 blocks (``decode.cpp`` ``PrepareArg`` / ``kivi_cpu.h`` ``RunArg``).
Where the torch binding (``binding.cpp``, :func:`loader.binding`) is built, ``attend``'s common case
— the same checks, the pointers and strides, the call — runs in C++ (~1 us instead of ~4 us of
Python per call); whatever it does not take goes through the Python checks, which name the problem.
"""

from __future__ import annotations

import ctypes
import functools
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
    splits = _splits(num_splits)
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
        prep, call = _local.prep, _local.call
    except AttributeError:
        prep, call = _local.prep, _local.call = _PREP(), _RUN()
    prep[:_N_PREP] = (  # decode.cpp PrepareArg, in order
        num_blocks, H, num_slots, block_tables.data_ptr(), bt_stride, seq_lens.data_ptr(),
        query_start_loc.data_ptr(), tail_slots.data_ptr(), B, splits, _num_threads(),
    )  # fmt: skip
    row = Hq * D
    call[:_N_RUN] = (  # decode.cpp RunArg, in order
        staging_dtype, dtype, Hq, T, query.data_ptr(), key.data_ptr(), value.data_ptr(), staging.data_ptr(),
        kv_pages.data_ptr(), out.data_ptr(), row, H * D, H * D, row, _num_threads(),
    )  # fmt: skip
    status = lib.kivi_decode(struct, prep, call, scale)
    if status:
        loader.check(status, "paged_attention", (prep[_N_PREP], prep[_N_PREP + 1]))
    return out


#: The entry points' argument blocks (decode.cpp ``PrepareArg``: 11 inputs, ``RunArg``: 15), each
#: followed by err (2). One of each per thread, reused: filling one costs ~0.5 us, making a new one
#: from a tuple ~2 us.
_N_PREP = 11
_N_RUN = 15
_PREP = ctypes.c_int64 * (_N_PREP + 2)
_RUN = ctypes.c_int64 * (_N_RUN + 2)
#: A DecodeBatch's block for the torch binding (binding.cpp BindArg): run, plan, call block, Hkv, D,
#: rows needed, kv_pages' shape (3), staging's shape (5), staging format.
_BIND = ctypes.c_int64 * 15
_local = threading.local()
_DTYPE_CODES = loader.DTYPE_CODES
_STAGING_I8 = loader.STAGING_I8
_num_threads = torch.get_num_threads
_UINT8 = torch.uint8
_INT32 = torch.int32


@functools.cache
def _run_address(lib: ctypes.CDLL) -> int:
    """The address of ``lib``'s ``kivi_decode_run`` (what binding.cpp calls)."""
    return ctypes.cast(lib.kivi_decode_run, ctypes.c_void_p).value


class StaleMetadata(ValueError):
    """A :class:`DecodeBatch`'s metadata tensors changed since it checked them: nothing was run."""


_STALE = 8  # kivi_cpu.h kStale


def _where(err: tuple[int, int]) -> str:
    return f" (sequence {err[0]}: block {err[1]})" if err[0] >= 0 else ""


class DecodeBatch:
    """One step's decode metadata, checked and packed once; :meth:`attend` runs one layer over it.

    block_tables : (B, max_pages) int32 · seq_lens, tail_slots : (B,) int32 · query_start_loc :
    (B + 1,) int32 — as for :func:`paged_attention`, on the CPU; kept (not copied): every
    :meth:`attend` compares them with what was checked here and refuses changed ones (a batch is
    valid for one step). layout : PageLayout with 2-bit codes. kv_pages : (NB, Hkv, page_bytes) (or
    ``[NB, Hkv, P, C]``) uint8 and staging : (S, 2, Hkv, P, D) in a model dtype or (S, 2, Hkv, P,
    D + 4) uint8 — one layer's, the cache geometry every layer shares (each call's must match).
    num_splits : page splits per sequence (default: enough items for every thread).

    Check failures are ValueErrors naming the argument; out-of-range contents (a block id, a
    staging slot, a length) are ValueErrors from the kernel's check, here, before any call; changed
    metadata is a :class:`StaleMetadata` (a ValueError) from :meth:`attend`, before it runs. One
    Python thread at a time per batch (its call block is reused), as the backend's layers run.
    """

    __slots__ = ("layout", "_lib", "_plan", "_struct", "_call", "_pshape", "_sshape", "_sdt", "_D", "_H",
                 "_need", "_meta", "_bind", "_block", "__weakref__")  # fmt: skip

    def __init__(
        self, block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor, tail_slots: Tensor,
        layout: PageLayout, kv_pages: Tensor, staging: Tensor, *, num_splits: int | None = None,
    ) -> None:  # fmt: skip
        self._plan = self._bind = None
        layout = _two_bit(layout)
        B = _checks.tensor("block_tables", block_tables, dtype=_INT32, dims=2).shape[0]
        _checks.int32("seq_lens", seq_lens, B)
        _checks.int32("tail_slots", tail_slots, B)
        _checks.int32("query_start_loc", query_start_loc, B + 1)
        pages = _checks.pages("kv_pages", kv_pages, layout)
        H, D, P = pages.shape[1], layout.head_dim, layout.page_size
        if H == 0:
            raise ValueError("kv_pages must have at least one KV head")
        sdt = staging.dtype if isinstance(staging, Tensor) else None
        _checks.staging_arg(staging, sdt if sdt in MODEL_DTYPES else MODEL_DTYPES, H, P, D)
        cpu(block_tables=block_tables, seq_lens=seq_lens, query_start_loc=query_start_loc,
            tail_slots=tail_slots, kv_pages=pages, staging=staging)  # fmt: skip
        splits = _splits(num_splits)
        self.layout, self._D, self._H = layout, D, H
        self._pshape, self._sshape, self._sdt = pages.shape, staging.shape, sdt
        # (kept alive while the plan points at them)
        self._meta = (block_tables, seq_lens, query_start_loc, tail_slots)
        self._need = int(query_start_loc[B]) if B else 0  # rows every layer's query must have
        self._lib = lib = loader.library()
        if lib is None:
            return
        self._struct = loader.layout_struct(layout)
        prep = _PREP(
            pages.shape[0], H, staging.shape[0], block_tables.data_ptr(), block_tables.shape[1],
            seq_lens.data_ptr(), query_start_loc.data_ptr(), tail_slots.data_ptr(), B, splits, _num_threads(),
        )  # fmt: skip
        status = ctypes.c_int(0)
        plan = lib.kivi_decode_prepare(self._struct, prep, ctypes.byref(status))
        if status.value:
            loader.check(status.value, "DecodeBatch", (prep[_N_PREP], prep[_N_PREP + 1]))
        if not plan:
            raise MemoryError("DecodeBatch: out of memory")
        self._plan = plan
        self._call = _RUN()
        self._call[0] = loader.staging_code(staging, sdt)
        self._bind = bind = loader.binding()
        if bind is not None:  # binding.cpp BindArg, in order (a slice fill: 3x faster than _BIND(*args))
            self._block = block = _BIND()
            block[:] = (_run_address(lib), plan, ctypes.addressof(self._call), H, D, self._need, *pages.shape,
                        *staging.shape, self._call[0])  # fmt: skip

    @property
    def via_binding(self) -> bool:
        """Whether :meth:`attend`'s common case runs through the torch binding (``binding.cpp``)."""
        return self._bind is not None

    def __del__(self) -> None:
        plan, self._plan = getattr(self, "_plan", None), None
        if plan:
            self._lib.kivi_decode_free(plan)

    def attend(
        self, query: Tensor, key: Tensor, value: Tensor, kv_pages: Tensor, staging: Tensor,
        scale: float | None, out: Tensor,
    ) -> Tensor:  # fmt: skip
        """One layer's decode attention into ``out``'s decode rows; returns ``out``.

        query, out : (T, Hq, D) · key, value : (T, Hkv, D), one dtype (float32, bfloat16 or float16;
        the staging's unless it is uint8), T ≥ the batch's rows (``query_start_loc[B]``; rows past
        them are not read), Hq a multiple of Hkv; each token's row dense (strides ``(s, D, 1)``, ``s``
        ≥ the row's elements: slices of vLLM's fused qkv are read in place); kv_pages and staging of
        the batch's shapes (kv_pages as the 3-d view). Only the decode rows of ``out`` are written.
        """
        bind = self._bind
        if bind is not None:  # binding.cpp: the checks below, and the call, in C++
            status = bind(self._block, query, key, value, kv_pages, staging, scale, out)
            if not status:
                return out
            if status > 0:
                self._fail(status)
            # -1: not the common form; the checks below name what is wrong (or take a valid rare form)
        dt = query.dtype
        qs, ks, vs, os_ = query.shape, key.shape, value.shape, out.shape
        qt, kt, vt, ot = query.stride(), key.stride(), value.stride(), out.stride()
        H, D = self._H, self._D
        if not (
            query.is_cpu and key.is_cpu and value.is_cpu and out.is_cpu and kv_pages.is_cpu and staging.is_cpu
            and dt in _DTYPE_CODES and key.dtype is dt and value.dtype is dt and out.dtype is dt
            and kv_pages.dtype is _UINT8 and kv_pages.shape == self._pshape and kv_pages.is_contiguous()
            and staging.shape == self._sshape and (staging.dtype is self._sdt) and staging.is_contiguous()
            and (self._sdt is _UINT8 or self._sdt is dt)
            and len(qs) == 3 and len(ks) == 3 and len(vs) == 3 and len(os_) == 3
            and qs[2] == D and ks[1] == H and ks[2] == D and vs[1] == H and vs[2] == D
            and os_[1] == qs[1] and os_[2] == D
            and qs[1] % H == 0 and qs[1] > 0
            and qs[0] >= self._need and ks[0] >= self._need and vs[0] >= self._need and os_[0] >= self._need
            and qt[2] == 1 and qt[1] == D and kt[2] == 1 and kt[1] == D and vt[2] == 1 and vt[1] == D
            and ot[2] == 1 and ot[1] == D and qt[0] >= qs[1] * D and kt[0] >= H * D and vt[0] >= H * D
            and ot[0] >= qs[1] * D
        ):  # fmt: skip
            rows = self._layer_problem(query, key, value, kv_pages, staging, out)
        else:
            rows = qt[0], kt[0], vt[0], ot[0]
        if not (type(scale) is float and 0.0 < scale < math.inf):  # noqa: E721 — the common case, checked fast
            scale = _checks.softmax_scale(scale, D)
        lib = self._lib
        if lib is None:
            self._reference(query, key, value, kv_pages, staging, scale, out)
            return out
        call = self._call
        call[1:_N_RUN] = (  # kivi_cpu.h RunArg after the staging format, in order
            _DTYPE_CODES[dt], qs[1], min(qs[0], ks[0], vs[0], os_[0]), query.data_ptr(), key.data_ptr(),
            value.data_ptr(), staging.data_ptr(), kv_pages.data_ptr(), out.data_ptr(), *rows, _num_threads(),
        )  # fmt: skip
        status = lib.kivi_decode_run(self._plan, call, scale)
        if status:
            self._fail(status)
        return out

    def _fail(self, status: int) -> None:
        """Raise the error of a non-zero status of ``kivi_decode_run`` (err in the call block)."""
        err = (self._call[_N_RUN], self._call[_N_RUN + 1])
        if status == _STALE:
            raise StaleMetadata(f"DecodeBatch.attend: {loader.STATUS[_STALE]}{_where(err)}")
        loader.check(status, "DecodeBatch.attend", err)

    def _layer_problem(self, query, key, value, kv_pages, staging, out) -> tuple[int, int, int, int]:
        """The row strides of layer tensors that :meth:`attend`'s quick test did not take but that are
        valid (a size-1 dimension may have any stride; ``kv_pages`` may be 4-d); else the ValueError
        naming the first problem."""
        H, D, need = self._H, self._D, self._need
        dt = getattr(query, "dtype", None)
        if dt not in MODEL_DTYPES:
            _checks.tensor("query", query, dtype=MODEL_DTYPES)
        qt = _row_stride("query", query, dt, None, D, need)
        Hq = query.shape[1]
        if Hq == 0 or Hq % H:
            raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({H})")
        kt = _row_stride("key", key, dt, H, D, need)
        vt = _row_stride("value", value, dt, H, D, need)
        ot = _row_stride("out", out, dt, Hq, D, need)
        pages = _checks.pages("kv_pages", kv_pages, self.layout)
        if pages.shape != self._pshape:
            raise ValueError(
                f"kv_pages must have this batch's shape {tuple(self._pshape)}, got {tuple(pages.shape)}"
            )
        _checks.staging_arg(staging, dt, H, self.layout.page_size, D)
        if staging.shape != self._sshape or staging.dtype != self._sdt:
            raise ValueError(
                f"staging must be this batch's {tuple(self._sshape)} {self._sdt}, got {tuple(staging.shape)} "
                f"{staging.dtype}"
            )
        cpu(kv_pages=kv_pages, staging=staging)
        return qt, kt, vt, ot

    def _reference(self, query, key, value, kv_pages, staging, scale, out) -> None:
        """Without the C++ library: the PyTorch reference over the same metadata."""
        pages = reference.pages_view(kv_pages, self.layout)
        codec = QuantCodec(self.layout)
        reference.decode_rows(query, key, value, pages, staging, *self._meta, codec, scale, out)


def _splits(num_splits: int | None) -> int:
    """``num_splits`` as the kernel takes it (0: its default); ValueError unless None or a positive int."""
    if num_splits is not None and not (isinstance(num_splits, int) and num_splits >= 1):
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    return num_splits or 0


def _two_bit(layout) -> PageLayout:
    layout = _check_layout(layout)
    if (layout.k_bits, layout.v_bits) != (2, 2):
        raise ValueError(
            "layout: the CPU decode kernel reads 2-bit codes, "
            f"got k_bits={layout.k_bits} v_bits={layout.v_bits}"
        )
    return layout


def _row_stride(name: str, x, dtype, heads: int | None, D: int, need: int) -> int:
    """Elements from one token's row of ``x`` (``(≥ need, heads, D)`` of ``dtype``, on the CPU, each
    row dense) to the next; ValueError naming what is wrong."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != dtype:
        raise ValueError(f"{name} must be {str(dtype).removeprefix('torch.')} (the query's dtype), got "
                         f"{str(x.dtype).removeprefix('torch.')}")  # fmt: skip
    n, h, d = x.shape if x.dim() == 3 else (-1, -1, -1)
    if d != D or (heads is not None and h != heads) or n < need:
        want = f"(>= {need}, {'Hq' if heads is None else heads}, {D})"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    cpu(**{name: x})
    if x.is_contiguous() or n == 1:  # (a size-1 dimension's stride is never used)
        return h * d
    s0, s1, s2 = x.stride()
    if s2 == 1 and (s1 == d or h == 1) and s0 >= h * d:
        return s0
    raise ValueError(f"{name} must be contiguous within each token's row: strides (>= {h * d}, {d}, 1), "
                     f"got {x.stride()}")  # fmt: skip


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
    layout = _two_bit(layout)
    cpu(**_checks.decode_arguments(*batch, out, layout, MODEL_DTYPES))
