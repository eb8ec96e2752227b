"""The CPU kernels: C++ (``quantize.cpp``, ``decode.cpp``), built once per machine and ISA, loaded
with ctypes (:mod:`~kivi_serve.kernels.cpu.loader`; the per-layer decode call through a small torch
binding, ``binding.cpp``, where it can be built), behind the same Python signatures as the CUDA
wrappers, on CPU tensors:

- :func:`append_kv` — execute an :class:`~kivi_serve.backend.staging.AppendPlan`, bit-identical to
  :func:`kivi_serve.kernels.reference.append_kv` (any page layout);
- :func:`paged_attention` — decode attention straight from the 2-bit pages for the sequences with
  one new token (within the reference's tolerance); :class:`DecodeBatch` — the same with the step's
  metadata checked once and every layer's call passing only its own tensors (the backend's path);
- :func:`dequantize_blocks` / :func:`dequantize_pages` — pages back to K/V rows (prefill, tests).

Without a C++ compiler they fall back to the PyTorch reference after one ``RuntimeWarning``.
``KIVI_SERVE_CPU_ISA`` (auto / avx512 / avx2 / scalar) picks the SIMD path.
"""

from kivi_serve.kernels.cpu.decode_attention import DecodeBatch, StaleMetadata, paged_attention
from kivi_serve.kernels.cpu.loader import selected_isa, supported_isas, unavailable_reason
from kivi_serve.kernels.cpu.quantize_append import (
    append_kv,
    dequantize_blocks,
    dequantize_pages,
    quantize_pages,
)

__all__ = [
    "DecodeBatch",
    "StaleMetadata",
    "append_kv",
    "paged_attention",
    "dequantize_blocks",
    "dequantize_pages",
    "quantize_pages",
    "selected_isa",
    "supported_isas",
    "unavailable_reason",
]
