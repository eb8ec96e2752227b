"""The page format: hand-computed bytes, the bits budget, and the CUDA header agreeing with Python."""

import shutil
import subprocess
from pathlib import Path

import pytest

from kivi_serve.quant.layout import (
    SUPPORTED_BITS,
    SUPPORTED_HEAD_DIMS,
    SUPPORTED_PAGE_SIZES,
    PageLayout,
    default_wide_channels,
    group_permutation,
)

ROOT = Path(__file__).resolve().parents[1]


def test_default_head_dim_128_by_hand():
    L = PageLayout(128)
    assert (L.k_bits, L.v_bits, L.exact_tokens, L.k_outliers, L.wide_channels) == (2, 2, 1, 0, 24)
    # 128 tokens x 128 channels x 2 bits = 4096 bytes of codes each for K and V.
    expected = {
        "k_plane0": (0, 4096),
        "v_plane0": (4096, 4096),
        "k_lo": (8192, 256),
        "k_scale": (8448, 256),
        "v_lo": (8704, 256),
        "v_scale": (8960, 256),
        "k_cb": (9216, 8),
        "v_cb": (9232, 8),  # 16-byte aligned
        "exact_k": (9248, 256),
        "exact_v": (9504, 256),
        "exact_idx": (9760, 2),
        "wide_plane": (9776, 384),  # 24 wide channels x 128 tokens x 1 bit
        "wide_cb": (10160, 16),  # 8 fp16 levels
        "wide_idx": (10176, 24),
    }
    assert {n: (s.offset, s.nbytes) for n, s in L.sections.items()} == expected
    assert L.content_bytes == 10200
    assert L.slot_bytes == 80  # ceil(10200 / 128)
    assert L.page_bytes == 10240
    assert L.bits_per_element == 2.5  # the budget, padding included
    assert L.compression_vs_bf16 == pytest.approx(6.4)


def test_first_format_with_k_outliers_by_hand():
    L = PageLayout(128, k_outliers=1, wide_channels=0)
    assert (L.sections["kout_val"].offset, L.sections["kout_idx"].offset) == (9776, 10032)
    assert L.content_bytes == 10160 and L.slot_bytes == 80


def test_head_dim_64_by_hand():
    L = PageLayout(64)
    assert L.wide_channels == 12
    assert (L.sections["v_plane0"].offset, L.sections["k_lo"].offset) == (2048, 4096)
    assert (L.sections["wide_plane"].offset, L.sections["wide_idx"].offset) == (5168, 5376)
    assert L.content_bytes == 5388 and L.slot_bytes == 43 and L.page_bytes == 5504
    assert L.bits_per_element == pytest.approx(5504 * 8 / (2 * 128 * 64))  # 2.6875


def test_budget_targets():
    assert PageLayout(128).bits_per_element <= 2.5
    assert PageLayout(256).bits_per_element <= 2.5
    assert PageLayout(128, k_bits=3).bits_per_element == 3.0  # with 24 wide 4-bit channels
    assert PageLayout(128, k_bits=3).wide_channels == 24
    assert PageLayout(128, k_bits=4, v_bits=4).wide_channels == 0  # no 5-bit codes
    # the KIVI-2 baseline (no exact token, no outliers, no wide channels) uses fewer bytes
    assert PageLayout(128, exact_tokens=0, wide_channels=0).page_bytes < PageLayout(128).page_bytes


def test_three_bit_planes():
    L = PageLayout(128, 64, k_bits=3)
    assert L.sections["k_plane0"].nbytes == 64 * 128 * 2 // 8
    assert L.sections["k_plane1"].nbytes == 64 * 128 // 8
    assert L.sections["v_plane0"].offset == L.sections["k_plane1"].offset + 64 * 128 // 8


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(head_dim=96), "head_dim"),
        (dict(head_dim=128, page_size=32), "page_size"),
        (dict(head_dim=128, k_bits=1), "k_bits"),
        (dict(head_dim=128, v_bits=8), "v_bits"),
        (dict(head_dim=128, exact_tokens=2), "exact_tokens"),
        (dict(head_dim=128, k_outliers=3), "k_outliers"),
        (dict(head_dim=128, wide_channels=6), "wide_channels"),
        (dict(head_dim=128, wide_channels=128), "wide_channels"),
        (dict(head_dim=128, k_bits=4, wide_channels=8), "wide_channels"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        PageLayout(**kwargs)


def test_group_permutation_is_the_mma_b_fragment():
    # Hand-derived from PTX's mma.m16n8k16 B layout: lane (n, j) holds k = 2j, 2j+1, 2j+8, 2j+9.
    perm = group_permutation(128).tolist()  # 2 groups of 64 columns per lane slot
    assert perm[:16] == [0, 1, 8, 9, 16, 17, 24, 25, 32, 33, 40, 41, 48, 49, 56, 57]  # j=0, g=0
    assert perm[16:20] == [64, 65, 72, 73]  # j=0, g=1
    assert perm[32:36] == [2, 3, 10, 11]  # j=1, g=0
    assert sorted(perm) == list(range(128))
    with pytest.raises(ValueError):
        group_permutation(96)


CPP = r"""
#include <cstdio>
#include "kivi_layout.cuh"
template <int D, int P, int KB, int VB, bool E, bool O, int HI> void show() {
  using L = kivi::KiviLayout<D, P, KB, VB, E, O, HI>;
  const int v[] = {D, P, KB, VB, (int)E, (int)O, HI, L::kKPlane0, KB > 2 ? L::kKPlane1 : -1, L::kVPlane0,
                   VB > 2 ? L::kVPlane1 : -1, L::kKLo, L::kKScale, L::kVLo, L::kVScale, L::kKCb, L::kVCb,
                   L::kExactK, L::kExactV, L::kExactIdx, L::kKoutVal, L::kKoutIdx, L::kWidePlane, L::kWideCb,
                   L::kWideIdx, L::kContentBytes, L::kSlotBytes, L::kPageBytes};
  for (int x : v) std::printf("%%d ", x);
  std::printf("\n");
}
int main() {
%s
  // the packed column order, for one row of 128 codes
  for (int w = 0; w < 8; ++w) for (int p = 0; p < 16; ++p) std::printf("%%d ", kivi::packed_col(128, w, p));
  std::printf("\n");
}
"""


def _his(d: int, kb: int) -> list[int]:
    """Wide-channel counts to check: none, the default, and 3 * D / 16 where the layout allows it."""
    return sorted({0, default_wide_channels(d, kb), 3 * d // 16 if kb < 4 else 0})


CONFIGS = [
    (d, p, kb, vb, e, o, hi)
    for d in SUPPORTED_HEAD_DIMS
    for p in SUPPORTED_PAGE_SIZES
    for kb, vb in [(2, 2), (3, 2), (4, 4), (2, 3)]
    for e, o in [(1, 1), (0, 0), (1, 0)]
    for hi in _his(d, kb)
]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a host C++ compiler")
def test_cuda_header_matches_python(tmp_path):
    assert any(c[-1] for c in CONFIGS) and any(not c[-1] for c in CONFIGS)
    b = lambda x: str(bool(x)).lower()  # noqa: E731
    calls = "\n".join(f"  show<{d}, {p}, {kb}, {vb}, {b(e)}, {b(o)}, {hi}>();"
                      for d, p, kb, vb, e, o, hi in CONFIGS)
    src = tmp_path / "layout_check.cpp"
    src.write_text(CPP.replace("%s", calls, 1).replace("%%", "%"))
    exe = tmp_path / "layout_check"
    subprocess.run(["g++", "-std=c++17", "-I", str(ROOT / "cuda"), str(src), "-o", str(exe)], check=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.strip().splitlines()
    assert len(lines) == len(CONFIGS) + 1
    for line, (d, p, kb, vb, e, o, hi) in zip(lines, CONFIGS):
        got = list(map(int, line.split()))
        L = PageLayout(d, p, kb, vb, e, o, hi)
        off = lambda n, L=L: L.sections[n].offset if n in L.sections else -1  # noqa: E731
        want = [d, p, kb, vb, e, o, hi, off("k_plane0"), off("k_plane1"), off("v_plane0"), off("v_plane1"),
                off("k_lo"), off("k_scale"), off("v_lo"), off("v_scale"), off("k_cb"), off("v_cb"),
                off("exact_k"), off("exact_v"), off("exact_idx"), off("kout_val"), off("kout_idx"),
                off("wide_plane"), off("wide_cb"), off("wide_idx"), L.content_bytes, L.slot_bytes,
                L.page_bytes]
        assert got == want, (d, p, kb, vb, e, o, hi)
    assert list(map(int, lines[-1].split())) == group_permutation(128).tolist()


def test_every_supported_combination_builds():
    for d in SUPPORTED_HEAD_DIMS:
        for p in SUPPORTED_PAGE_SIZES:
            for kb in SUPPORTED_BITS:
                L = PageLayout(d, p, kb, 2)
                assert L.page_bytes % p == 0 and L.page_bytes >= L.content_bytes
                ends = sorted((s.offset, s.offset + s.nbytes) for s in L.sections.values())
                assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:])), "sections overlap"
