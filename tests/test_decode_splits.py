"""The decode wrapper's split count (``choose_num_splits``): whole waves of resident CTAs.

Checked against an independent simulation: CTAs of equal duration (their pages plus a fixed cost)
dealt to ``SMs x resident CTAs`` slots, the makespan counted wave by wave. No GPU needed.
"""

from __future__ import annotations

import heapq
import itertools

import pytest

from kivi_serve.kernels import decode_attention as da


def _makespan(ctas: int, slots: int, duration: int) -> int:
    """Finish time of ``ctas`` equal CTAs on ``slots`` slots, each taking the earliest free slot."""
    free = [0] * min(slots, ctas)
    heapq.heapify(free)
    end = 0
    for _ in range(ctas):
        start = heapq.heappop(free)
        end = max(end, start + duration)
        heapq.heappush(free, start + duration)
    return end


def _best_by_simulation(batch, kv_heads, group, pages, sms, ctas_per_sm, min_split_pages) -> int:
    tiles = -(-group // da.rows_per_tile(group))
    cap = max(1, min(da.MAX_SPLITS, pages // min_split_pages))
    cta_time = {s: -(-pages // s) + da.SPLIT_OVERHEAD_PAGES for s in range(1, cap + 1)}
    spans = {s: _makespan(batch * kv_heads * tiles * s, sms * ctas_per_sm, t) for s, t in cta_time.items()}
    return min(spans, key=lambda s: (spans[s], s))


@pytest.mark.parametrize(
    ("batch", "kv_heads", "group", "pages", "sms", "ctas", "msp"),
    [
        *itertools.product((1, 3, 8), (8,), (4, 16), (1, 16, 255, 1024), (132,), (2, 3), (1, 8)),
        *itertools.product((64,), (1, 8), (4,), (16, 255), (108,), (2,), (1, 8)),
    ],
)
def test_split_count_minimises_the_simulated_makespan(batch, kv_heads, group, pages, sms, ctas, msp):
    got = da.choose_num_splits(batch, kv_heads, group, pages, sms, ctas, msp)
    assert 1 <= got <= max(1, min(da.MAX_SPLITS, pages // msp))
    assert got == _best_by_simulation(batch, kv_heads, group, pages, sms, ctas, msp)


def test_split_counts_of_the_h200_measurement():
    """The cells measured on an H200 (132 SMs, 2 resident CTAs of the D = 128, P = 128 kernel; 8 KV heads,
    GQA group 4, min_split_pages 8 = 4 warps x 2 stages): one full wave where the old rule ran 1.21."""
    assert da.choose_num_splits(8, 8, 4, 256, 132, 2, 8) == 4  # batch 8, 32K: 256 CTAs on 264 slots
    assert da.choose_num_splits(8, 8, 4, 1024, 132, 2, 8) == 4  # batch 8, 128K
    assert da.choose_num_splits(1, 8, 4, 1024, 132, 2, 8) == 32  # batch 1, 128K: 256 CTAs
    assert da.choose_num_splits(1, 8, 4, 16, 132, 2, 8) == 2  # 2K: at least 8 pages a split
    # more resident CTAs, more splits fit one wave
    assert da.choose_num_splits(8, 8, 4, 256, 132, 4, 8) == 8
