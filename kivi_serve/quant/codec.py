"""Page codecs: how a finalised page's tokens become the bytes of its vLLM block, and back.

Two codecs share every other part of kivi-serve (block tables, slot mapping, staging pool, append
plan, attention, the reference in :mod:`kivi_serve.kernels.reference`):

- :class:`QuantCodec` — the product: :func:`~kivi_serve.quant.page.quantize_pages` /
  :func:`~kivi_serve.quant.page.dequantize_pages` in the :class:`~kivi_serve.quant.layout.PageLayout`
  format (2-bit codes, codebook per page).
- :class:`FpPagesCodec` — debug: a page stores its K and V in the model dtype, so the cache holds
  exactly what vLLM's own backend would. With it the engine must reproduce vLLM's default backend;
  a mismatch can only come from the wiring (block tables, slots, staging, plan), never from
  quantization.

A codec describes one page of one KV head: ``page_size`` tokens, ``slot_bytes`` bytes per token
slot (``C`` in vLLM's ``[blocks, kv_heads, page_size, C]`` uint8 view), ``page_bytes = P * C``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kivi_serve.quant.codebook import MODES
from kivi_serve.quant.layout import PageLayout
from kivi_serve.quant.page import dequantize_pages, quantize_pages
from kivi_serve.quant.schemes import DEFAULT_SCHEME, get_scheme


class PageCodec(Protocol):
    """What the reference, the backend and the tests need of a codec."""

    name: str
    layout: PageLayout
    page_size: int
    head_dim: int
    slot_bytes: int
    page_bytes: int
    bits_per_element: float

    def encode(
        self, k: torch.Tensor, v: torch.Tensor, fills: torch.Tensor, sinks: torch.Tensor
    ) -> torch.Tensor:
        """(n, P, D) K and V, fills (n,), sinks (n,) → (n, page_bytes) uint8."""

    def decode(self, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, page_bytes) uint8 → (k, v), each (n, P, D) fp32."""


class QuantCodec:
    """Pages in the :class:`PageLayout` format (the spec in :mod:`kivi_serve.quant.page`)."""

    name = "quantized"

    def __init__(self, layout: PageLayout, codebook: str = "fitted") -> None:
        if codebook not in MODES:
            raise ValueError(f"codebook must be one of {MODES}, got {codebook!r}")
        self.layout = layout
        self.codebook = codebook
        self.page_size = layout.page_size
        self.head_dim = layout.head_dim
        self.slot_bytes = layout.slot_bytes
        self.page_bytes = layout.page_bytes
        self.bits_per_element = layout.bits_per_element

    def encode(
        self, k: torch.Tensor, v: torch.Tensor, fills: torch.Tensor, sinks: torch.Tensor
    ) -> torch.Tensor:
        return quantize_pages(k, v, self.layout, fill=fills, sink=sinks, codebook=self.codebook)

    def decode(self, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return dequantize_pages(pages, self.layout)


class FpPagesCodec:
    """Debug pages: K then V, each ``(P, D)`` in ``dtype``; ``slot_bytes = 2 * D * itemsize``.

    Rows at or beyond a page's fill are stored as zeros (they are never attended).
    """

    name = "fp_pages"

    def __init__(self, head_dim: int, page_size: int, dtype: torch.dtype) -> None:
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"fp pages need a floating model dtype, got {dtype}")
        self.layout = PageLayout(head_dim, page_size)  # head_dim / page_size validation only
        self.page_size = page_size
        self.head_dim = head_dim
        self.dtype = dtype
        itemsize = torch.empty(0, dtype=dtype).element_size()
        self.slot_bytes = 2 * head_dim * itemsize
        self.page_bytes = page_size * self.slot_bytes
        self.bits_per_element = 8.0 * itemsize

    def encode(
        self, k: torch.Tensor, v: torch.Tensor, fills: torch.Tensor, sinks: torch.Tensor
    ) -> torch.Tensor:
        n, P, D = k.shape
        valid = torch.arange(P, device=k.device).unsqueeze(0) < fills.to(k.device).long().unsqueeze(1)
        valid = valid.unsqueeze(-1)
        kv = torch.stack(
            [torch.where(valid, k, 0).to(self.dtype), torch.where(valid, v, 0).to(self.dtype)], 1
        )
        return kv.contiguous().view(torch.uint8).reshape(n, self.page_bytes)

    def decode(self, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = pages.shape[0]
        kv = pages.contiguous().view(self.dtype).reshape(n, 2, self.page_size, self.head_dim).float()
        return kv[:, 0], kv[:, 1]


def make_codec(
    head_dim: int, page_size: int, dtype: torch.dtype, *, scheme: str = DEFAULT_SCHEME, fp_pages: bool = False
) -> PageCodec:
    """The codec for one engine: full-precision debug pages, or the pages of a quantized
    :mod:`~kivi_serve.quant.schemes` scheme (the default 2-bit layout unless ``scheme`` says otherwise)."""
    if fp_pages:
        return FpPagesCodec(head_dim, page_size, dtype)
    s = get_scheme(scheme)
    if not s.quantized:
        raise ValueError(f"scheme {scheme!r} stores no pages; use fp_pages for full-precision pages")
    return QuantCodec(s.layout(head_dim, page_size), codebook=s.codebook)


def as_codec(codec: PageCodec | PageLayout) -> PageCodec:
    """A codec as given, or the 2-bit codec (fitted codebooks) of a bare :class:`PageLayout`."""
    return QuantCodec(codec) if isinstance(codec, PageLayout) else codec
