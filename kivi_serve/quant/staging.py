"""The staging slot's format: how an open page's tokens are held until the page is quantized.

A staging slot holds one page of one layer, K and V of every KV head: a tensor
``[S, 2, Hkv, P, W]`` per layer (``[:, 0]`` keys, ``[:, 1]`` values), one *row* per
(slot, K/V, head, token). Two formats, told apart by the tensor's dtype alone (so every kernel
and executor takes the same single staging tensor):

- ``model`` — ``W = D`` elements of the model dtype: the token's K/V as the model computed them.
- ``int8`` (the default) — uint8 rows of ``W = D + 4`` bytes: ``D`` int8 codes, then the row's
  scale as a little-endian IEEE fp32. A row ``x`` (the model-dtype values, widened to fp32) is
  stored as::

      scale = max(|x|) / 127                          (fp32 division, round-to-nearest-even)
      code  = clamp(rint(x / scale), -127, 127)       (fp32 division; rint: half to even)
              = 0 everywhere when scale == 0
      read  = model_dtype(float(code) * scale)        (one fp32 multiply, rounded to the model dtype)

  Each step is a single correctly rounded IEEE operation, so the PyTorch reference, the C++ CPU
  kernels and the CUDA kernels (``__fdiv_rn``, ``rintf``, ``__fmul_rn``) store and read identical
  bits. A staged value therefore reads back as a model-dtype value, as with ``model`` staging, and
  every consumer (attention, the page quantizer, whose CUDA tile is in the model dtype) sees the
  same one. The error is at most ``max|x| / 254`` per element, plus the model dtype's rounding.

What is rounded: every value that enters staging — this step's tokens of open pages, and an
early-finalised page re-opened into a slot (decoded, rounded to the model dtype, then encoded).
What reads it: the attention of later steps over the open page (decode tail, prefill context,
the reference), and the page quantizer when the page fills or is evicted: the page is encoded
from the values staging holds (``read`` above), never from the originals, which are gone by then.
A step's own new tokens are attended exactly, from the layer's input, not from staging.

``fp8`` (e4m3 with a per-row scale ``max|x| / 448``) is defined here for the accuracy harness's
comparison only (``kivi-serve eval --staging``); it has no kernels and is not a backend setting.
"""

from __future__ import annotations

import torch

#: Staging formats the backend (reference, C++ and CUDA kernels) supports; the first is the default.
STAGING_DTYPES = ("int8", "model")
DEFAULT_STAGING_DTYPE = STAGING_DTYPES[0]
#: Formats the accuracy harness can simulate (``fp8``: comparison only, no kernels).
SIMULATED_STAGING_DTYPES = STAGING_DTYPES + ("fp8",)

#: Bytes of a compact row beyond its ``D`` codes: the fp32 scale.
SCALE_BYTES = 4
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def check_staging_dtype(name: str) -> str:
    if name not in STAGING_DTYPES:
        raise ValueError(f"kivi-serve staging_dtype must be one of {STAGING_DTYPES}, got {name!r}")
    return name


def row_width(staging_dtype: str, head_dim: int) -> int:
    """``W``, the last dimension of the staging tensor (elements of its dtype)."""
    return head_dim + SCALE_BYTES if check_staging_dtype(staging_dtype) == "int8" else head_dim


def slot_bytes(staging_dtype: str, head_dim: int, page_size: int, num_kv_heads: int, model_dtype) -> int:
    """Bytes of one slot of one layer: ``2 · Hkv · P · W · itemsize``."""
    compact = check_staging_dtype(staging_dtype) == "int8"
    itemsize = 1 if compact else torch.empty(0, dtype=model_dtype).element_size()
    return 2 * num_kv_heads * page_size * row_width(staging_dtype, head_dim) * itemsize


def new_staging(
    num_slots: int,
    num_kv_heads: int,
    page_size: int,
    head_dim: int,
    model_dtype,
    staging_dtype: str,
    device=None,
) -> torch.Tensor:
    """A zeroed staging tensor ``[S, 2, Hkv, P, W]`` (uint8 for ``int8``, else ``model_dtype``)."""
    dtype = torch.uint8 if check_staging_dtype(staging_dtype) == "int8" else model_dtype
    W = row_width(staging_dtype, head_dim)
    return torch.zeros(num_slots, 2, num_kv_heads, page_size, W, dtype=dtype, device=device)


def is_compact(staging: torch.Tensor) -> bool:
    """True for int8 rows (uint8 tensor), False for model-dtype rows."""
    return staging.dtype == torch.uint8


def staged_head_dim(staging: torch.Tensor) -> int:
    """``D`` of a staging tensor (its last dimension less the scale bytes of compact rows)."""
    return staging.shape[-1] - (SCALE_BYTES if is_compact(staging) else 0)


def encode_int8(x: torch.Tensor) -> torch.Tensor:
    """Rows ``x`` (..., D), any float dtype (the model-dtype values) → uint8 rows (..., D + 4)."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.where(scale > 0, torch.round(xf / safe).clamp(-INT8_MAX, INT8_MAX), 0.0).to(torch.int8)
    return torch.cat([codes.view(torch.uint8), scale.contiguous().view(torch.uint8)], -1)


def decode_int8(rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 rows (..., D + 4) → fp32 (..., D): ``code * scale``, rounded to the model ``dtype``
    (None: not rounded, the fp32 product)."""
    D = rows.shape[-1] - SCALE_BYTES
    codes = rows[..., :D].contiguous().view(torch.int8).float()
    scale = rows[..., D:].contiguous().view(torch.float32)
    out = codes * scale
    return out if dtype is None else out.to(dtype).float()


def round_fp8(x: torch.Tensor) -> torch.Tensor:
    """Harness only: ``x`` (..., D) through fp8 e4m3 with a per-row scale ``max|x| / 448``, as fp32."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True) / FP8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (xf / safe).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale


def roundtrip(x: torch.Tensor, staging_dtype: str, model_dtype=None) -> torch.Tensor:
    """What staging hands back for values ``x`` (..., D), fp32: ``model`` rounds to ``model_dtype``
    (unchanged if None), ``int8`` and ``fp8`` as defined above (``int8`` read back in ``model_dtype``)."""
    if staging_dtype == "int8":
        return decode_int8(encode_int8(x), model_dtype)
    if staging_dtype == "fp8":
        return round_fp8(x)
    if staging_dtype == "model":
        return x.float() if model_dtype is None else x.to(model_dtype).float()
    raise ValueError(f"staging dtype must be one of {SIMULATED_STAGING_DTYPES}, got {staging_dtype!r}")


def store(staging: torch.Tensor, index: tuple, x: torch.Tensor) -> None:
    """``staging[index] = x`` in the staging format: ``x`` (..., D) holds the model-dtype values."""
    staging[index] = encode_int8(x) if is_compact(staging) else x.to(staging.dtype)


def load(rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Staged rows (..., W) → their values as fp32 (..., D): model-dtype rows widened, int8 rows
    decoded and rounded to the model ``dtype`` (None: fp32, i.e. a float32 model)."""
    return decode_int8(rows, dtype) if is_compact(rows) else rows.float()


def read_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Staged rows (..., W) as model-``dtype`` values (..., D) (exactly what :func:`load` reads)."""
    return decode_int8(rows, dtype).to(dtype) if is_compact(rows) else rows.to(dtype)
