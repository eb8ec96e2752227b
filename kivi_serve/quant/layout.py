"""The page format: the one place that says where every byte of a kivi-serve KV page lives.

A *page* holds ``P`` (``page_size``) tokens of one layer and one KV head. vLLM sees it as ``P``
token slots of ``C`` bytes each (:attr:`PageLayout.slot_bytes`), so one vLLM kernel block == one
page, and a layer's cache is a uint8 tensor ``[num_blocks, num_kv_heads, P, C]`` (layout LBHNC:
each head's page is one contiguous run of ``P * C`` bytes).

Inside a page (byte offsets from its start; every section starts 16-byte aligned)::

    k_codes   K codes, token-major, in mma B-fragment order (see below)   bit planes
    v_codes   V codes, channel-major, in mma B-fragment order              bit planes
    k_lo      fp16[D]   per-channel offset   k = k_lo[d] + k_scale[d] * k_cb[code]
    k_scale   fp16[D]   per-channel scale (max - min over the page's kept elements)
    v_lo      fp16[P]   per-token offset     v = v_lo[t] + v_scale[t] * v_cb[code]
    v_scale   fp16[P]   per-token scale
    k_cb      fp16[2**k_bits]   K codebook in [0, 1], fitted to this page, ends pinned at 0 and 1
    v_cb      fp16[2**v_bits]   V codebook
    exact_k   fp16[D]   (exact_tokens) one token kept exactly: the sink (token 0) on a
    exact_v   fp16[D]                  sequence's first page, else the page's strongest outlier
    exact_idx int16[1]
    kout_val  fp16[D]   (k_outliers) per K channel, the one element dropped from the
    kout_idx  uint8[D]               channel's range, kept exactly (value, token index)
    wide_plane uint32[H, P/32]  (wide_channels = H > 0) the top code bit of the H "wide" K channels:
                        bit t % 32 of word t // 32 of row i is bit ``k_bits`` of token t's code in
                        channel wide_idx[i] (its low ``k_bits`` bits are in the K planes as usual)
    wide_cb    fp16[2**(k_bits+1)]  the wide channels' codebook (one more bit, fitted to them alone)
    wide_idx   uint8[H]  the wide channels, ascending: the H channels with the largest k_scale
    padding up to P * C bytes

**Wide K channels.** Keys carry most of the accuracy loss, and a few channels with a large range
carry most of the key error (the error of ``q . k`` grows with ``scale[d]**2``). So each page spends
one more bit on its ``H`` widest channels (default ``3 * D / 16``: 24 of 128) — 3-bit codes there,
2-bit elsewhere (4 and 3 in the 3-bit mode) — paid for by dropping the per-channel outliers; this
cut the perplexity loss from +22 % to +7 % at the same 2.5 bits (docs/accuracy.md). A wide channel reads
``k = k_lo[d] + k_scale[d] * wide_cb[code]``; the decode kernel computes the plain 2-bit MMA over
every channel and adds ``q'[d] * (wide_cb[code] - k_cb[code & 3])`` for the wide ones.

Why this shape (see docs/design.md): with per-channel K and per-token V, the decode kernel folds
the scales into the other MMA operand (``q'[d] = q[d] * k_scale[d]``, ``p'[t] = p[t] * v_scale[t]``)
and the offsets into one scalar per page, so the Tensor-Core operand is just ``cb[code]``: a
4-entry lookup per page. The exact token and the outliers are sparse corrections added after the MMA.

**Code order.** Codes are packed in groups of 16 elements. A matrix ``M[rows, cols]`` whose MMA
reduction dimension runs along ``cols`` (K: rows = tokens, cols = channels; V: rows = channels,
cols = tokens) is stored row by row; within a row, group ``w = j * (cols // 64) + g`` holds, at
position ``p = 4 * kt + e``, the element at column ``64 * g + 16 * kt + 2 * j + (0, 1, 8, 9)[e]``.
That is exactly what lane ``4 * n + j`` of an ``mma.m16n8k16`` needs for its B fragment
(``b0 = {B[2j][n], B[2j+1][n]}``, ``b1 = {B[2j+8][n], B[2j+9][n]}``) for four consecutive 16-wide
k-tiles: one 32-bit load per lane per four MMAs, no shuffles.

**Bit planes.** ``b``-bit codes are split into planes: 2 → (2,), 3 → (2, 1), 4 → (2, 2). A 2-bit
plane stores each group of 16 codes as one little-endian uint32 (element ``p`` in bits
``2p..2p+1``); a 1-bit plane stores each group as one uint16 (element ``p`` in bit ``p``). Plane
``i`` holds bits ``sum(widths[:i]) ...`` of the code, low plane first. The 2-bit decode kernel
reads one plane only.

The CUDA mirror of this module is ``cuda/kivi_layout.cuh``; ``tests/test_layout.py`` proves they agree.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

SUPPORTED_HEAD_DIMS = (64, 128, 256)
#: Multiples of 64 (one V code group spans 64 tokens); at most 256 (token indices are uint8).
SUPPORTED_PAGE_SIZES = (64, 128, 256)
SUPPORTED_BITS = (2, 3, 4)
DEFAULT_PAGE_SIZE = 128

#: Elements per code group (one uint32 of a 2-bit plane, one uint16 of a 1-bit plane).
GROUP = 16
#: Column offsets inside a 16-wide MMA k-tile for the four elements a lane holds: b0.x, b0.y, b1.x, b1.y.
FRAG_COLS = (0, 1, 8, 9)
ALIGN = 16
#: Bytes of every metadata element (fp16); exact values are stored as fp16 too (bf16 → fp16 is
#: lossless for |x| in [2**-14, 65504], i.e. for KV values; larger magnitudes are clamped).
META_BYTES = 2

PLANES = {2: (2,), 3: (2, 1), 4: (2, 2)}


def default_wide_channels(head_dim: int, k_bits: int) -> int:
    """Wide K channels per page by default: ``3 * D / 16`` with 2- and 3-bit keys (the 2.5- and
    3-bit budgets at head_dim 128 have exactly room for them), none with 4-bit keys."""
    return 3 * head_dim // 16 if k_bits < 4 else 0


def align_up(n: int, a: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``a`` (``kivi::align_up`` of cuda/kivi_layout.cuh)."""
    return (n + a - 1) // a * a


def plane_bytes(width: int, n_elements: int) -> int:
    """Bytes of one bit plane of ``width`` bits for ``n_elements`` codes."""
    if width not in (1, 2):
        raise ValueError(f"plane width must be 1 or 2, got {width}")
    return n_elements * width // 8


@dataclass(frozen=True)
class Section:
    """One named run of bytes inside a page."""

    name: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    count: int


@dataclass(frozen=True)
class PageLayout:
    """The byte layout of one page (one vLLM block of one KV head of one layer).

    Parameters
    ----------
    head_dim : int
        ``D``, one of :data:`SUPPORTED_HEAD_DIMS`.
    page_size : int
        ``P`` tokens per page, one of :data:`SUPPORTED_PAGE_SIZES`; must equal vLLM's kernel block size.
    k_bits, v_bits : int
        Code widths for keys and values, each in :data:`SUPPORTED_BITS`.
    exact_tokens : int
        0 or 1 tokens per page kept exactly (attention sink / strongest outlier token).
    k_outliers : int
        0 or 1 elements per K channel per page kept exactly (dense-and-sparse).
    wide_channels : int or None
        ``H`` wide K channels per page coded with ``k_bits + 1`` bits (a multiple of 4, ``< D``;
        needs ``k_bits < 4``). ``None``: the default, ``3 * D // 16`` for 2- and 3-bit keys, else 0.
    v_rotate : bool
        The V codes, ``v_lo``, ``v_scale`` and ``v_cb`` describe each token's value *rotated*,
        ``v @ value_rotation(D)`` (:func:`kivi_serve.quant.page.rotate_values`); the exact token's
        ``exact_v`` stays unrotated. Same bytes; a reader rotates the dequantized values back (a
        kernel: each output row once, ``sum_t p_t v_t = (sum_t p_t (v_t R)) R.T``).
    v_pin_ends : bool
        True: the V codebook's first and last levels are pinned at 0 and 1 (the token's min and max);
        False: all ``2**v_bits`` levels are fitted (plain Lloyd-Max, still never worse than uniform).
        Same bytes.

    ``v_rotate`` and ``v_pin_ends=False`` change what the value bytes mean, not where they are
    (docs/accuracy.md, "Values, rotated, with free codebook ends"). The CPU and CUDA kernels implement
    them (``KIVI_V_ROTATE`` / ``KIVI_V_PIN_ENDS``), the CUDA quantizer except rotated values at head_dim
    256 x page 256 (:class:`kivi_serve.kernels.loader.KernelSpec` refuses them; the backend refuses such
    a layer on a GPU before serving).
    """

    head_dim: int
    page_size: int = DEFAULT_PAGE_SIZE
    k_bits: int = 2
    v_bits: int = 2
    exact_tokens: int = 1
    k_outliers: int = 0
    wide_channels: int | None = None
    v_rotate: bool = False
    v_pin_ends: bool = True
    sections: dict[str, Section] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {self.head_dim}")
        if self.page_size not in SUPPORTED_PAGE_SIZES:
            raise ValueError(f"page_size must be one of {SUPPORTED_PAGE_SIZES}, got {self.page_size}")
        for name in ("k_bits", "v_bits"):
            if getattr(self, name) not in SUPPORTED_BITS:
                raise ValueError(f"{name} must be one of {SUPPORTED_BITS}, got {getattr(self, name)}")
        if self.exact_tokens not in (0, 1):
            raise ValueError(f"exact_tokens must be 0 or 1, got {self.exact_tokens}")
        if self.k_outliers not in (0, 1):
            raise ValueError(f"k_outliers must be 0 or 1, got {self.k_outliers}")
        if self.wide_channels is None:
            object.__setattr__(self, "wide_channels", default_wide_channels(self.head_dim, self.k_bits))
        hi = self.wide_channels
        if not isinstance(hi, int) or hi < 0 or hi >= self.head_dim or hi % 4:
            raise ValueError(f"wide_channels must be a multiple of 4 in [0, {self.head_dim}), got {hi!r}")
        if hi and self.k_bits == 4:
            raise ValueError("wide_channels needs k_bits < 4 (wide channels use k_bits + 1 bits)")
        for name in ("v_rotate", "v_pin_ends"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        object.__setattr__(self, "sections", self._build_sections())

    # ------------------------------------------------------------------ layout arithmetic
    def _build_sections(self) -> dict[str, Section]:
        D, P = self.head_dim, self.page_size
        f16, u8, i16, u32 = torch.float16, torch.uint8, torch.int16, torch.int32
        parts: list[tuple[str, int, torch.dtype, int]] = []  # name, nbytes, dtype, count
        for who, bits in (("k", self.k_bits), ("v", self.v_bits)):
            for i, width in enumerate(PLANES[bits]):
                n = plane_bytes(width, P * D)
                dtype, itemsize = (u32, 4) if width == 2 else (i16, 2)
                parts.append((f"{who}_plane{i}", n, dtype, n // itemsize))
        parts += [
            ("k_lo", D * META_BYTES, f16, D),
            ("k_scale", D * META_BYTES, f16, D),
            ("v_lo", P * META_BYTES, f16, P),
            ("v_scale", P * META_BYTES, f16, P),
            ("k_cb", (1 << self.k_bits) * META_BYTES, f16, 1 << self.k_bits),
            ("v_cb", (1 << self.v_bits) * META_BYTES, f16, 1 << self.v_bits),
        ]
        if self.exact_tokens:
            parts += [
                ("exact_k", D * META_BYTES, f16, D),
                ("exact_v", D * META_BYTES, f16, D),
                ("exact_idx", 2, i16, 1),
            ]
        if self.k_outliers:
            parts += [("kout_val", D * META_BYTES, f16, D), ("kout_idx", D, u8, D)]
        if self.wide_channels:
            H = self.wide_channels
            parts += [
                ("wide_plane", H * P // 8, u32, H * P // 32),
                ("wide_cb", (2 << self.k_bits) * META_BYTES, f16, 2 << self.k_bits),
                ("wide_idx", H, u8, H),
            ]
        sections: dict[str, Section] = {}
        offset = 0
        for name, nbytes, dtype, count in parts:
            offset = align_up(offset)
            sections[name] = Section(name, offset, nbytes, dtype, count)
            offset += nbytes
        object.__setattr__(self, "_content_bytes", offset)
        return sections

    @property
    def params(self) -> tuple[int, int, int, int, int, int, int, int, int]:
        """``(head_dim, page_size, k_bits, v_bits, exact_tokens, k_outliers, wide_channels, v_rotate,
        v_pin_ends)`` (the flags as 0/1), in the order the CPU kernels' layout struct takes them."""
        return (
            self.head_dim, self.page_size, self.k_bits, self.v_bits, self.exact_tokens, self.k_outliers,
            self.wide_channels, int(self.v_rotate), int(self.v_pin_ends),
        )  # fmt: skip

    @property
    def content_bytes(self) -> int:
        """Bytes actually used by a page (before padding to ``P * C``)."""
        return self._content_bytes  # type: ignore[attr-defined]

    @property
    def slot_bytes(self) -> int:
        """``C``: bytes per token slot as vLLM sees it; ``page_bytes == page_size * C``."""
        return math.ceil(self.content_bytes / self.page_size)

    @property
    def page_bytes(self) -> int:
        return self.page_size * self.slot_bytes

    @property
    def bits_per_element(self) -> float:
        """Effective bits per cached K or V element, all metadata and padding included."""
        return self.page_bytes * 8 / (2 * self.page_size * self.head_dim)

    @property
    def compression_vs_bf16(self) -> float:
        """How many times fewer bytes than a bf16 K+V cache of the same tokens."""
        return 16.0 / self.bits_per_element

    def offset(self, name: str) -> int:
        return self.sections[name].offset

    def describe(self) -> dict:
        """A JSON-friendly summary (used by the CLI, the docs and the server's /version)."""
        return {
            "head_dim": self.head_dim,
            "page_size": self.page_size,
            "k_bits": self.k_bits,
            "v_bits": self.v_bits,
            "exact_tokens": self.exact_tokens,
            "k_outliers": self.k_outliers,
            "wide_channels": self.wide_channels,
            **({"v_rotate": True} if self.v_rotate else {}),
            **({"v_pin_ends": False} if not self.v_pin_ends else {}),
            "slot_bytes": self.slot_bytes,
            "page_bytes": self.page_bytes,
            "content_bytes": self.content_bytes,
            "bits_per_element": round(self.bits_per_element, 4),
            "compression_vs_bf16": round(self.compression_vs_bf16, 3),
            "sections": {s.name: [s.offset, s.nbytes] for s in self.sections.values()},
        }

    # ------------------------------------------------------------------ views into pages
    def raw(self, pages: torch.Tensor, name: str) -> torch.Tensor:
        """The uint8 bytes ``[..., nbytes]`` of section ``name`` of ``pages`` (``[..., page_bytes]``)."""
        if pages.dtype != torch.uint8:
            raise ValueError(f"pages must be uint8, got {pages.dtype}")
        if pages.shape[-1] != self.page_bytes:
            raise ValueError(f"pages last dim must be page_bytes={self.page_bytes}, got {pages.shape[-1]}")
        s = self.sections[name]
        return pages[..., s.offset : s.offset + s.nbytes]

    def view(self, pages: torch.Tensor, name: str) -> torch.Tensor:
        """View section ``name`` of ``pages`` (uint8 ``[..., page_bytes]``) as ``[..., count]``."""
        s = self.sections[name]
        raw = self.raw(pages, name)
        if s.dtype == torch.uint8:
            return raw
        # Reinterpreting the last dim needs a contiguous tensor; a section slice of a page batch
        # is not, so this is a copy (fine for the reference; kernels read the bytes in place).
        return raw.contiguous().view(s.dtype)

    def write_bytes(self, pages: torch.Tensor, name: str, data: torch.Tensor) -> None:
        """Store raw uint8 ``data`` (``[..., nbytes]``) into section ``name``."""
        s = self.sections[name]
        if data.dtype != torch.uint8 or data.shape[-1] != s.nbytes:
            raise ValueError(f"{name} needs uint8 [..., {s.nbytes}], got {data.dtype} {tuple(data.shape)}")
        pages[..., s.offset : s.offset + s.nbytes] = data

    def write(self, pages: torch.Tensor, name: str, values: torch.Tensor) -> None:
        """Store ``values`` (``[..., count]``, any dtype, cast to the section's) into section ``name``."""
        s = self.sections[name]
        data = values.to(s.dtype).contiguous()
        if data.shape[-1] != s.count:
            raise ValueError(f"{name} needs {s.count} values per page, got {data.shape[-1]}")
        pages[..., s.offset : s.offset + s.nbytes] = data.view(torch.uint8)


@functools.cache
def group_permutation(cols: int) -> torch.Tensor:
    """Column order of one packed row: ``perm[w * 16 + p]`` is the column at group ``w``, position ``p``.

    ``cols`` must be a multiple of 64 (four 16-wide MMA k-tiles per group).
    """
    if cols % 64:
        raise ValueError(f"packed rows need a multiple of 64 columns, got {cols}")
    n_g = cols // 64
    perm = torch.empty(cols, dtype=torch.long)
    for j in range(4):
        for g in range(n_g):
            w = j * n_g + g
            for kt in range(4):
                for e, c in enumerate(FRAG_COLS):
                    perm[w * GROUP + 4 * kt + e] = 64 * g + 16 * kt + 2 * j + c
    return perm
