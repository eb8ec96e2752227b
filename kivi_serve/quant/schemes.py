"""The named KV-cache schemes the accuracy harness compares.

A scheme says how a finalised page is stored: code widths for K and V, whether the page keeps
one exact token and one exact outlier per K channel, and which codebook (``fitted`` per page or
KIVI's ``uniform`` levels). Every quantized scheme goes through the one page format
(:class:`~kivi_serve.quant.layout.PageLayout`) and the one quantizer
(:func:`kivi_serve.quant.page.quantize_pages`), so the bits it reports are the bytes the
server stores.

====================  ======  ======  ===========  ==========  ===========  ========  ================
scheme                K bits  V bits  exact token  K outliers  wide K ch.   codebook  bits (hd128, 128)
====================  ======  ======  ===========  ==========  ===========  ========  ================
fp16                  16      16      —            —           —            —         16
kivi2-uniform         2       2       no           no          no           uniform   2.28
kivi-serve-2bit       2       2       yes          no          3D/16 3-bit  fitted    2.50
kivi-serve-3bit       3       2       yes          no          3D/16 4-bit  fitted    3.00
kivi-serve-4bit       4       4       yes          no          no           fitted    4.41
kivi-serve-2bit-p256  2       2       yes          no          7D/16 3-bit  fitted    2.50 (page 256)
...-p256-vr          2       2*      yes          no          7D/16 3-bit  fitted*   2.50 (page 256)
====================  ======  ======  ===========  ==========  ===========  ========  ================

(* values quantized rotated, V codebook ends fitted: see below.)

Reference only (:data:`REFERENCE_SCHEMES`: the harness and the reference read them, no kernel does yet):
``kivi-serve-2bit-p256-vr-pr``, ``kivi-serve-2bit-pr`` and ``kivi-serve-2bit-vr-pr`` are
``kivi-serve-2bit-p256-vr``, ``kivi-serve-2bit`` and the latter with -p256-vr's values, with the keys
quantized **before RoPE** (:mod:`kivi_serve.quant.rope`): same bytes, but a reader rotates each key by
its position (issue 16, eighth session: the retrieval losses at 4K-8K are key-side, and the rotation
widens the per-channel ranges of a post-RoPE page; docs/accuracy.md, "Keys quantized before RoPE").

``kivi2-uniform`` is plain KIVI-2 (keys per channel, values per token, uniform levels, fp16
``lo``/``scale``) in the same page size, with the open page kept exact like every scheme.

``kivi-serve-2bit-p256-vr`` is the same page with two changes to what the value bytes mean (issue 16's
value study): each token's value is quantized after a fixed orthonormal rotation (signed Hadamard),
and the V codebook's end levels are fitted instead of pinned at the token's min and max. Same 2.500
bits. Both the CPU and the CUDA kernels serve it, except at head_dim 256 on a GPU: the CUDA quantizer
cannot hold a rotated 256 x 256 page in shared memory, so the backend refuses it there with a reason.

``kivi-serve-2bit-p256`` is the long-context 2-bit format: the same page format with 256-token pages,
where the per-page exact slot and codebooks cost half as much per token, and the saving buys 7D/16
wide K channels instead of 3D/16 at the same 2.500 bits (head_dim 128; 2.625 at head_dim 64). It is
defined for 256-token pages only (:attr:`Scheme.page_size`): any other page size is an error, not a
silently larger page (docs/accuracy.md, "A long-context 2-bit format").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kivi_serve.quant.layout import DEFAULT_PAGE_SIZE, PageLayout
from kivi_serve.quant.page import dequantize_pages, quantize_pages
from kivi_serve.quant.rope import Rope, rotate

#: The head_dim at which the headline bits per element are quoted (the issue's target).
REFERENCE_HEAD_DIM = 128


@dataclass(frozen=True)
class Scheme:
    """One way of storing finalised pages.

    Parameters
    ----------
    name : str
        The name the CLI and the JSON report use.
    k_bits, v_bits : int or None
        Code widths (2, 3, 4); ``None`` for the unquantized cache.
    exact_tokens, k_outliers : int
        Passed to :class:`PageLayout` (0 or 1).
    wide_channels : int or None
        Wide K channels per page (passed to :class:`PageLayout`; ``None``: its default).
    wide_16ths : int or None
        If set, the wide K channels as a share of the head: ``head_dim * wide_16ths // 16``
        (overrides ``wide_channels``; the same share at every head_dim).
    page_size : int or None
        The only page size the scheme is defined for (its bit budget assumes it); ``None``: any.
    codebook : str
        ``fitted`` or ``uniform`` (passed to :func:`~kivi_serve.quant.page.quantize_pages`).
    keep_exact : tuple of str
        Ablations only: ``"k"`` and/or ``"v"`` read back exact (their bits are still counted).
    v_rotate, v_pin_ends : bool
        Passed to :class:`PageLayout`: values quantized rotated, V codebook ends pinned or fitted.
    k_pre_rope : bool
        Keys are quantized before RoPE (:mod:`kivi_serve.quant.rope`): each key un-rotated by its own
        position, quantized, and rotated back when read (a reader rotates every key). Same bytes; what
        they mean needs the model's rope, which :meth:`roundtrip` takes. Reference and harness only (no
        kernel reads such pages yet).
    """

    name: str
    k_bits: int | None = 2
    v_bits: int | None = 2
    exact_tokens: int = 1
    k_outliers: int = 1
    codebook: str = "fitted"
    wide_channels: int | None = 0
    keep_exact: tuple[str, ...] = ()
    description: str = ""
    wide_16ths: int | None = None
    page_size: int | None = None
    v_rotate: bool = False
    v_pin_ends: bool = True
    k_pre_rope: bool = False

    @property
    def quantized(self) -> bool:
        return self.k_bits is not None

    @property
    def default_page_size(self) -> int:
        """The scheme's own page size, else the default page size."""
        return self.page_size or DEFAULT_PAGE_SIZE

    def check_page_size(self, page_size: int) -> None:
        """``ValueError`` if the scheme is defined for another page size than ``page_size``."""
        if self.page_size is not None and page_size != self.page_size:
            raise ValueError(
                f"scheme {self.name!r} is defined for {self.page_size}-token pages, got page size "
                f"{page_size}: set the page size to {self.page_size} (--page-size {self.page_size}, "
                f"KIVI_SERVE_PAGE_SIZE={self.page_size})"
            )

    def layout(self, head_dim: int, page_size: int | None = None) -> PageLayout | None:
        """The page layout of this scheme (``None`` for the unquantized cache); ``page_size``
        ``None``: :attr:`default_page_size`."""
        page_size = self.default_page_size if page_size is None else page_size
        self.check_page_size(page_size)
        if not self.quantized:
            return None
        wide = self.wide_channels if self.wide_16ths is None else head_dim * self.wide_16ths // 16
        return PageLayout(
            head_dim,
            page_size,
            k_bits=self.k_bits,
            v_bits=self.v_bits,
            exact_tokens=self.exact_tokens,
            k_outliers=self.k_outliers,
            wide_channels=wide,
            v_rotate=self.v_rotate,
            v_pin_ends=self.v_pin_ends,
        )

    def bits_per_element(self, head_dim: int = REFERENCE_HEAD_DIM, page_size: int | None = None) -> float:
        """Effective bits per cached element, all metadata included (16 for the unquantized cache)."""
        layout = self.layout(head_dim, page_size)
        return 16.0 if layout is None else layout.bits_per_element

    def roundtrip(
        self, k: torch.Tensor, v: torch.Tensor, page_size: int, sink: torch.Tensor,
        positions: torch.Tensor | None = None, rope: Rope | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize full pages and read them back: what a query sees of a finalised page.

        k, v : (n, P, D) float; sink : (n,) bool (True for a sequence's first page); positions : (n, P)
        int, the tokens' positions, and rope, the model's rotation: both required by a ``k_pre_rope``
        scheme, ignored otherwise → (k, v) each (n, P, D) fp32.
        """
        if not self.quantized:
            return k.float(), v.float()
        layout = self.layout(k.shape[-1], page_size)
        kin = k
        if self.k_pre_rope:
            if positions is None or rope is None:
                raise ValueError(f"scheme {self.name!r} quantizes keys before RoPE: it needs the tokens' "
                                 "positions and the model's rope")
            kin = rotate(k, positions, rope, inverse=True)
        pages = quantize_pages(kin, v, layout, sink=sink, codebook=self.codebook)
        kq, vq = dequantize_pages(pages, layout)
        if self.k_pre_rope:
            kq = rotate(kq, positions, rope)
        if "k" in self.keep_exact:
            kq = k.float()
        if "v" in self.keep_exact:
            vq = v.float()
        return kq, vq


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("fp16", k_bits=None, v_bits=None, exact_tokens=0, k_outliers=0, codebook="none",
               description="unquantized cache (the reference)"),
        Scheme("kivi2-uniform", k_bits=2, v_bits=2, exact_tokens=0, k_outliers=0, codebook="uniform",
               description="KIVI-2: K per channel, V per token, uniform levels"),
        Scheme("kivi-serve-2bit", k_bits=2, v_bits=2, exact_tokens=1, k_outliers=0, wide_channels=None,
               description="default page format: fitted codebooks, exact token, 3-bit wide K channels"),
        Scheme("kivi-serve-3bit", k_bits=3, v_bits=2, exact_tokens=1, k_outliers=0, wide_channels=None,
               description="K 3-bit (4-bit wide channels) / V 2-bit"),
        Scheme("kivi-serve-4bit", k_bits=4, v_bits=4, exact_tokens=1, k_outliers=0, wide_channels=None,
               description="K 4-bit / V 4-bit"),
        Scheme("kivi-serve-2bit-p256", k_bits=2, v_bits=2, exact_tokens=1, k_outliers=0, wide_16ths=7,
               page_size=256, description="long-context 2-bit: 256-token pages, 7D/16 3-bit wide K channels"),
        Scheme("kivi-serve-2bit-p256-vr", k_bits=2, v_bits=2, exact_tokens=1, k_outliers=0, wide_16ths=7,
               page_size=256, v_rotate=True, v_pin_ends=False,
               description="kivi-serve-2bit-p256, values quantized rotated (Hadamard), free V codebook "
                           "ends: same bytes (on a GPU: head_dim 64 and 128 only)"),
    )
}
#: Schemes the reference (:mod:`kivi_serve.quant.page`, :mod:`kivi_serve.kernels.reference`) and the
#: accuracy harness implement but the CPU kernels do not: not in :data:`SCHEMES`, so the backend and
#: the engine refuse them (``--task ppl`` of ``kivi-serve eval`` and ``scripts/study.py`` take them): the
#: pre-RoPE key formats (issue 16, eighth session), whose readers must rotate each key by its position.
REFERENCE_SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        replace(SCHEMES["kivi-serve-2bit"], name="kivi-serve-2bit-pr", k_pre_rope=True,
                description="kivi-serve-2bit with keys quantized before RoPE: same bytes (reference only)"),
        replace(SCHEMES["kivi-serve-2bit"], name="kivi-serve-2bit-vr-pr", k_pre_rope=True, v_rotate=True,
                v_pin_ends=False, description="kivi-serve-2bit with the values of -p256-vr (rotated, free "
                                              "codebook ends) and keys quantized before RoPE: same bytes "
                                              "(reference only)"),
        replace(SCHEMES["kivi-serve-2bit-p256-vr"], name="kivi-serve-2bit-p256-vr-pr", k_pre_rope=True,
                description="kivi-serve-2bit-p256-vr with keys quantized before RoPE: same bytes (reference "
                            "only)"),
    )
}
#: The schemes an evaluation runs by default: those defined at any page size.
DEFAULT_SCHEMES = tuple(name for name, s in SCHEMES.items() if s.page_size is None)
#: The scheme the server stores pages in unless told otherwise.
DEFAULT_SCHEME = "kivi-serve-2bit"
#: The page formats the kivi backend serves: every quantized scheme.
SERVED_SCHEMES = tuple(name for name, s in SCHEMES.items() if s.quantized)
#: The format the kernels are built and modelled for by default at a page size (the CUDA loader's
#: default configurations, the static cost model): the one defined for exactly that page size, else
#: the default.
PAGE_FORMATS = {256: "kivi-serve-2bit-p256"}


def page_format(page_size: int) -> Scheme:
    """The scheme of :data:`PAGE_FORMATS` at ``page_size``."""
    return SCHEMES[PAGE_FORMATS.get(page_size, DEFAULT_SCHEME)]


def get_scheme(name: str) -> Scheme:
    """Look up a scheme by name (:data:`SCHEMES`, then :data:`REFERENCE_SCHEMES`); ``ValueError`` lists
    the known names."""
    try:
        return SCHEMES.get(name) or REFERENCE_SCHEMES[name]
    except KeyError:
        known = ", ".join([*SCHEMES, *REFERENCE_SCHEMES])
        raise ValueError(f"unknown scheme {name!r}; known: {known}") from None
