"""Argument checks shared by the CUDA wrappers: every failure is a ValueError naming the argument.

They look only at shapes, dtypes, strides and pointers (never at tensor contents), so they cost
no host sync; the device checks (:func:`devices`) come last, so that a wrong dtype or shape is
reported the same way on a machine without a GPU.
"""

from __future__ import annotations

import torch

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
    """``[NB, Hkv, page_bytes]`` or ``[NB, Hkv, P, C]`` uint8 → the 3-d view."""
    tensor(name, kv_pages, dtype=torch.uint8, align=16)
    if kv_pages.dim() == 4:
        if tuple(kv_pages.shape[2:]) != (layout.page_size, layout.slot_bytes):
            raise ValueError(
                f"{name} must be [blocks, kv_heads, {layout.page_size}, {layout.slot_bytes}], "
                f"got {tuple(kv_pages.shape)}"
            )
        kv_pages = kv_pages.view(kv_pages.shape[0], kv_pages.shape[1], layout.page_bytes)
    if kv_pages.dim() != 3 or kv_pages.shape[2] != layout.page_bytes:
        raise ValueError(
            f"{name} must be [blocks, kv_heads, {layout.page_bytes}], got {tuple(kv_pages.shape)}"
        )
    return kv_pages


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
