"""Pack and unpack code matrices into the bit planes described in :mod:`kivi_serve.quant.layout`."""

from __future__ import annotations

import torch

from kivi_serve.quant.layout import GROUP, PLANES, group_permutation

_SHIFT2 = torch.arange(GROUP, dtype=torch.int64) * 2
_SHIFT1 = torch.arange(GROUP, dtype=torch.int64)


def pack_codes(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Pack ``codes`` into bit planes, low plane first.

    Parameters
    ----------
    codes : torch.Tensor, shape (n, rows, cols), integer, values in ``[0, 2**bits)``
        ``cols`` is the MMA reduction dimension (channels for K, tokens for V); a multiple of 64.
    bits : int
        2, 3 or 4.

    Returns
    -------
    list of torch.Tensor, each shape (n, plane_bytes) uint8
    """
    if bits not in PLANES:
        raise ValueError(f"bits must be one of {tuple(PLANES)}, got {bits}")
    n, rows, cols = codes.shape
    perm = group_permutation(cols).to(codes.device)
    grouped = codes.long()[:, :, perm].reshape(n, rows * cols // GROUP, GROUP)
    planes, shift = [], 0
    for width in PLANES[bits]:
        part = (grouped >> shift) & ((1 << width) - 1)
        if width == 2:
            word = (part << _SHIFT2.to(codes.device)).sum(-1)
            word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
        else:
            word = (part << _SHIFT1.to(codes.device)).sum(-1)
            word = torch.where(word >= 2**15, word - 2**16, word).to(torch.int16)
        planes.append(word.contiguous().view(torch.uint8).reshape(n, -1))
        shift += width
    return planes


def unpack_codes(planes: list[torch.Tensor], bits: int, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``planes`` (each ``(n, plane_bytes)`` uint8) → ``(n, rows, cols)``."""
    if bits not in PLANES or len(planes) != len(PLANES[bits]):
        raise ValueError(f"bits={bits} needs {len(PLANES.get(bits, ()))} planes, got {len(planes)}")
    n = planes[0].shape[0]
    codes = None
    shift = 0
    for plane, width in zip(planes, PLANES[bits]):
        raw = plane.contiguous()
        if width == 2:
            word = raw.view(torch.int32).long() & 0xFFFFFFFF
            part = (word.unsqueeze(-1) >> _SHIFT2.to(raw.device)) & 3
        else:
            word = raw.view(torch.int16).long() & 0xFFFF
            part = (word.unsqueeze(-1) >> _SHIFT1.to(raw.device)) & 1
        part = part << shift
        codes = part if codes is None else codes | part
        shift += width
    grouped = codes.reshape(n, rows, cols)
    out = torch.empty_like(grouped)
    out[:, :, group_permutation(cols).to(grouped.device)] = grouped
    return out


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """One bit per element, little-endian: (..., m) of 0/1 (m % 8 == 0) → uint8 (..., m // 8).

    Element ``t`` goes to bit ``t % 8`` of byte ``t // 8`` (= bit ``t % 32`` of little-endian
    uint32 word ``t // 32``).
    """
    b = bits.to(torch.uint8).reshape(*bits.shape[:-1], -1, 8)
    weights = (1 << torch.arange(8, device=bits.device)).to(torch.uint8)
    return (b * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, m: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 (..., m // 8) → int64 (..., m) of 0/1."""
    shifts = torch.arange(8, device=packed.device)
    return ((packed.long().unsqueeze(-1) >> shifts) & 1).reshape(*packed.shape[:-1], m)
