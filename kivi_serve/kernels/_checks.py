"""Argument checks shared by the CUDA and the C++ CPU wrappers: every failure is a ValueError
naming the argument.

They look only at shapes, dtypes, strides and pointers (never at tensor contents), so they cost
no host sync; the device checks (:func:`devices`) come last, so that a wrong dtype or shape is
reported the same way on a machine without a GPU.
"""

from __future__ import annotations

import math

import torch

from kivi_serve.kernels import reference

MODEL_DTYPES = (torch.float16, torch.bfloat16)


def tensor(
    name: str, x, *, dtype=None, dims: int | None = None, shape: tuple | None = None, align: int = 0
) -> torch.Tensor:
    """Check one tensor argument; ``shape`` entries of None match anything."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if x.dtype not in allowed:
            names = " or ".join(str(d).removeprefix("torch.") for d in allowed)
            raise ValueError(f"{name} must be {names}, got {str(x.dtype).removeprefix('torch.')}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(x.shape)}")
    if shape is not None:
        if x.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if align and x.numel() and x.data_ptr() % align:
        raise ValueError(f"{name} must start at a {align}-byte aligned address")
    return x


def pages(name: str, kv_pages, layout) -> torch.Tensor:
    """``[NB, Hkv, page_bytes]`` or ``[NB, Hkv, P, C]`` uint8, contiguous, 16-byte aligned → the 3-d view."""
    return reference.pages_view(tensor(name, kv_pages, dtype=torch.uint8, align=16), layout, name)


def softmax_scale(scale, head_dim: int) -> float:
    """``scale`` as a float (default ``head_dim ** -0.5``); ValueError unless positive and finite."""
    scale = head_dim**-0.5 if scale is None else float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return scale


def int32(name: str, x, length: int | None) -> torch.Tensor:
    return tensor(name, x, dtype=torch.int32, shape=(length,))


def devices(**named: torch.Tensor | None) -> torch.device:
    """All tensors on one CUDA device (the first one's); returns it. None entries are ignored.

    Inside :func:`kivi_serve.kernels.loader.emulate` the CPU counts as a device too (the kernels
    then run emulated on CPU)."""
    from kivi_serve.kernels import loader

    first_name, first = next((k, v) for k, v in named.items() if v is not None)
    emulated = first.device.type == "cpu" and loader.emulation_mode() is not None
    if first.device.type != "cuda" and not emulated:
        raise ValueError(f"{first_name} must be on a CUDA device, got {first.device}")
    for name, x in named.items():
        if x is not None and x.device != first.device:
            raise ValueError(
                f"{name} is on {x.device}, {first_name} on {first.device}: all arguments on one device"
            )
    return first.device


#: The fields of each page-op list of an AppendPlan (:class:`~kivi_serve.backend.staging.PageOps`).
PLAN_OPS = {
    "evict": ("blocks", "slots", "fills", "sinks"),
    "finalize": ("blocks", "slots", "fills", "sinks", "starts", "prefix"),
    "reopen": ("blocks", "slots"),
}


def staging_arg(staging, model_dtype, H: int, P: int, D: int, align: int = 0) -> None:
    """The staging tensor: ``(S, 2, H, P, D)`` in the model dtype, or compact ``(S, 2, H, P, D + 4)``
    uint8 (:mod:`kivi_serve.quant.staging`)."""
    from kivi_serve.quant.staging import SCALE_BYTES

    if isinstance(staging, torch.Tensor) and staging.dtype == torch.uint8:
        tensor("staging", staging, dtype=torch.uint8, shape=(None, 2, H, P, D + SCALE_BYTES), align=align)
    else:
        tensor("staging", staging, dtype=model_dtype, shape=(None, 2, H, P, D), align=align)


def append_arguments(plan, key, value, kv_pages, staging, layout, codebook, dtypes, align: int = 0) -> dict:
    """Check ``append_kv``'s arguments (shapes and dtypes); returns every tensor by name (for the
    device check)."""
    from kivi_serve.quant.codebook import MODES

    tensor("key", key, dtype=dtypes, dims=3, align=align)
    T, H, D = key.shape
    if D != layout.head_dim:
        raise ValueError(f"key: head_dim {D} does not match layout.head_dim={layout.head_dim}")
    tensor("value", value, dtype=key.dtype, shape=(T, H, D), align=align)
    P = layout.page_size
    staging_arg(staging, key.dtype, H, P, D, align)
    if pages("kv_pages", kv_pages, layout).shape[1] != H:
        raise ValueError(f"kv_pages has {kv_pages.shape[1]} KV heads, key has {H}")
    if codebook not in MODES:
        raise ValueError(f"codebook must be one of {MODES}, got {codebook!r}")
    named = {"key": key, "value": value, "staging": staging, "kv_pages": kv_pages}
    named["plan.token_slots"] = int32("plan.token_slots", plan.token_slots, T)
    named["plan.token_offsets"] = int32("plan.token_offsets", plan.token_offsets, T)
    for list_name, fields in PLAN_OPS.items():
        ops = getattr(plan, list_name)
        for f in fields:
            name, t = f"plan.{list_name}.{f}", getattr(ops, f)
            if f == "sinks":
                named[name] = tensor(name, t, dtype=torch.bool, shape=(len(ops),))
            else:
                named[name] = int32(name, t, len(ops))
    return named


def decode_arguments(
    query,
    key,
    value,
    kv_pages,
    staging,
    block_tables,
    seq_lens,
    query_start_loc,
    tail_slots,
    out,
    layout,
    dtypes,
) -> dict:
    """Check ``paged_attention``'s tensor arguments (shapes and dtypes): query/key/value/out rows
    ``T``, sequences ``B`` = block-table rows; returns every tensor by name (for the device check)."""
    tensor("query", query, dtype=dtypes, dims=3)
    T, Hq, D = query.shape
    if D != layout.head_dim:
        raise ValueError(f"query: head_dim {D} does not match layout.head_dim={layout.head_dim}")
    tensor("key", key, dtype=query.dtype, dims=3)
    H = key.shape[1]
    if tuple(key.shape) != (T, H, D):
        raise ValueError(
            f"key must have shape ({T}, Hkv, {D}): one row per query row, got {tuple(key.shape)}"
        )
    tensor("value", value, dtype=query.dtype, shape=(T, H, D))
    if H == 0 or Hq % H:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({H})")
    staging_arg(staging, query.dtype, H, layout.page_size, D)
    if pages("kv_pages", kv_pages, layout).shape[1] != H:
        raise ValueError(f"kv_pages has {kv_pages.shape[1]} KV heads, key has {H}")
    B = tensor("block_tables", block_tables, dtype=torch.int32, dims=2).shape[0]
    int32("seq_lens", seq_lens, B)
    int32("tail_slots", tail_slots, B)
    int32("query_start_loc", query_start_loc, B + 1)
    if out is not None:
        tensor("out", out, dtype=query.dtype, shape=(T, Hq, D))
    return dict(
        query=query, key=key, value=value, kv_pages=kv_pages, staging=staging, block_tables=block_tables,
        seq_lens=seq_lens, query_start_loc=query_start_loc, tail_slots=tail_slots, out=out,
    )  # fmt: skip
