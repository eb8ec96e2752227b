"""Bit planes round-trip and sit where the MMA fragment wants them; codebooks are fitted, never worse
than uniform."""

import pytest
import torch

from kivi_serve.quant.codebook import (
    FIXED_POINT,
    WEIGHT_ONE,
    assign,
    fit_codebooks,
    scale_weights,
    uniform_levels,
)
from kivi_serve.quant.packing import pack_bits, pack_codes, unpack_bits, unpack_codes


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rows, cols", [(64, 128), (128, 64), (3, 256)])
def test_round_trip(bits, rows, cols):
    g = torch.Generator().manual_seed(bits * 1000 + rows + cols)
    codes = torch.randint(0, 1 << bits, (2, rows, cols), generator=g)
    planes = pack_codes(codes, bits)
    assert [p.dtype for p in planes] == [torch.uint8] * len(planes)
    assert sum(p.shape[1] for p in planes) == rows * cols * bits // 8
    assert torch.equal(unpack_codes(planes, bits, rows, cols), codes)


def _word(plane: torch.Tensor, w: int) -> int:
    return int.from_bytes(bytes(plane[0, 4 * w : 4 * w + 4].tolist()), "little")


@pytest.mark.parametrize(
    "col, word, pos",
    # cols = 128: two 64-column groups per lane slot j; word = j * 2 + g, pos = 4 * ktile + e
    [(0, 0, 0), (1, 0, 1), (8, 0, 2), (9, 0, 3), (16, 0, 4), (57, 0, 15), (64, 1, 0), (2, 2, 0), (3, 2, 1),
     (10, 2, 2), (6, 6, 0), (127, 7, 15)],
)
def test_code_lands_in_its_fragment_slot(col, word, pos):
    codes = torch.zeros(1, 1, 128, dtype=torch.long)
    codes[0, 0, col] = 3
    (plane,) = pack_codes(codes, 2)
    assert _word(plane, word) == 3 << (2 * pos)
    assert sum(_word(plane, w) for w in range(8)) == 3 << (2 * pos)


def test_three_bit_high_plane_is_one_bit_per_code():
    codes = torch.zeros(1, 1, 64, dtype=torch.long)
    codes[0, 0, 9] = 0b110  # low bits 10 in plane 0 position 3, high bit in plane 1 position 3
    lo, hi = pack_codes(codes, 3)
    assert _word(lo, 0) == 0b10 << 6
    assert int.from_bytes(bytes(hi[0, :2].tolist()), "little") == 1 << 3


def test_bit_plane_round_trip_and_order():
    bits = torch.randint(0, 2, (3, 5, 128), generator=torch.Generator().manual_seed(4))
    packed = pack_bits(bits)
    assert packed.shape == (3, 5, 16) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, 128), bits)
    one = torch.zeros(64, dtype=torch.long)
    one[37] = 1  # token 37: bit 5 of byte 4 = bit 5 of little-endian word 1
    assert pack_bits(one).tolist() == [0, 0, 0, 0, 32, 0, 0, 0]
    assert pack_bits(one).view(torch.int32).tolist() == [0, 1 << 5]


def test_bad_bits():
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(1, 1, 64, dtype=torch.long), 5)


# ----------------------------------------------------------------------------- codebooks
def _pages(n=16, m=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [
        torch.rand(n // 4, m, generator=g),  # uniform
        torch.randn(n // 4, m, generator=g).abs().clamp(max=4) / 4,  # half-normal
        torch.distributions.StudentT(2.0).sample((n // 4, m)).abs().clamp(max=20) / 20,  # heavy tail
        torch.sigmoid(torch.randn(n // 4, m, generator=g) * 3),  # bimodal
    ]
    return torch.cat(shapes).float()


def _mse(u, mask, levels):
    codes = assign(u, levels)
    err = (u - torch.gather(levels.float(), 1, codes)) ** 2
    return (err * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fitted_never_worse_than_uniform(bits):
    u = _pages()
    mask = torch.rand(u.shape, generator=torch.Generator().manual_seed(1)) > 0.05
    cb = fit_codebooks(u, mask, bits)
    uni = fit_codebooks(u, mask, bits, mode="uniform")
    # fixed-point rounding of u (1/4096) bounds how far the fp32 MSE can disagree with the fit's metric
    slack = 2.0 / FIXED_POINT
    assert (_mse(u, mask, cb) <= _mse(u, mask, uni) + slack * _mse(u, mask, uni).clamp(min=1e-6).sqrt()).all()
    # and on skewed pages the fit pays (clearly at 2 and 3 bits, where levels are scarce)
    gain = _mse(u, mask, cb)[4:].mean() / _mse(u, mask, uni)[4:].mean()
    assert gain < (0.9 if bits < 4 else 1.0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_shape_and_pinned_ends(bits):
    cb = fit_codebooks(_pages(), torch.ones(16, 4096, dtype=torch.bool), bits)
    assert cb.dtype == torch.float16 and cb.shape == (16, 1 << bits)
    assert (cb[:, 0] == 0).all() and (cb[:, -1] == 1).all()
    assert (cb[:, 1:] >= cb[:, :-1]).all()


def test_uniform_mode_is_kivi():
    cb = fit_codebooks(_pages(), torch.ones(16, 4096, dtype=torch.bool), 2, mode="uniform")
    assert torch.equal(cb.float(), uniform_levels(2).expand(16, 4))
    assert cb[0].tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1], abs=2e-4)


def test_fit_is_order_independent_and_vectorised():
    """The CUDA kernel adds in any order: the codebook must not depend on element order."""
    u = _pages(n=8)
    mask = torch.ones_like(u, dtype=torch.bool)
    cb = fit_codebooks(u, mask, 2)
    perm = torch.randperm(u.shape[1], generator=torch.Generator().manual_seed(3))
    assert torch.equal(fit_codebooks(u[:, perm], mask, 2), cb)
    assert torch.equal(torch.cat([fit_codebooks(u[i : i + 1], mask[i : i + 1], 2) for i in range(8)]), cb)


def test_masked_elements_do_not_count():
    u = _pages(n=4)
    mask = torch.ones_like(u, dtype=torch.bool)
    mask[:, :100] = False
    poisoned = u.clone()
    poisoned[:, :100] = 0.5
    assert torch.equal(fit_codebooks(poisoned, mask, 2), fit_codebooks(u, mask, 2))


def test_scale_weights_by_hand():
    w = scale_weights(torch.tensor([[2.0, 1.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float16))
    assert w.tolist() == [[WEIGHT_ONE, WEIGHT_ONE // 4, 0, WEIGHT_ONE // 16], [0, 0, 0, 0]]


@pytest.mark.parametrize("bits", [2, 3])
def test_weighted_fit_never_worse_than_uniform_in_its_metric(bits):
    """With weights (K: scale² per channel) the guarantee holds for the weighted error, which is
    the error of the keys themselves."""
    u = _pages(n=8)
    mask = torch.ones_like(u, dtype=torch.bool)
    w = torch.randint(0, WEIGHT_ONE + 1, u.shape, generator=torch.Generator().manual_seed(2))
    w[:, ::3] = WEIGHT_ONE  # some heavy elements

    def werr(levels):
        uq = torch.round(u * FIXED_POINT) / FIXED_POINT
        return (w * (uq - torch.gather(levels.float(), 1, assign(uq, levels))) ** 2).sum(1)

    cb = fit_codebooks(u, mask, bits, weight=w)
    assert (werr(cb) <= werr(fit_codebooks(u, mask, bits, mode="uniform")) * (1 + 1e-6)).all()
    # weights move the levels: heavy elements pull them (the plain fit differs)
    assert not torch.equal(cb, fit_codebooks(u, mask, bits))


def test_codebook_bad_input():
    with pytest.raises(ValueError, match="mode"):
        fit_codebooks(torch.rand(1, 8), torch.ones(1, 8, dtype=torch.bool), 2, mode="kmeans")
    with pytest.raises(ValueError, match="bits"):
        fit_codebooks(torch.rand(1, 8), torch.ones(1, 8, dtype=torch.bool), 5)
    with pytest.raises(ValueError):
        fit_codebooks(torch.rand(1, 8), torch.ones(1, 9, dtype=torch.bool), 2)
