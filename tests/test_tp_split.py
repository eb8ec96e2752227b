"""Tensor parallelism splits the KV cache by head, and the page format splits with it.

vLLM shards attention over ``tp`` ranks by heads: rank ``r`` gets query heads
``[r * Hq/tp, (r + 1) * Hq/tp)`` and the KV heads those queries read — ``Hkv/tp`` consecutive KV
heads when ``tp <= Hkv``, else one KV head replicated on ``tp/Hkv`` ranks (QKVParallelLinear's
``num_kv_head_replicas``). Each rank's backend builds its own pages from its own heads. This is
only correct if a page depends on its own head's tokens alone: a shard's pages must equal the
corresponding slice of the unsharded pages byte for byte, and a shard's attention output the
corresponding slice of the unsharded output. Checked here with the reference (the spec), on CPU.
"""

from __future__ import annotations

import pytest
import torch

from kivi_serve.kernels import reference as ref
from kivi_serve.quant import page
from kivi_serve.quant.layout import PageLayout

D, P = 64, 64
LAYOUT = PageLayout(D, page_size=P)


def shard_heads(rank: int, tp: int, hq: int, hkv: int) -> tuple[slice, slice]:
    """(query heads, KV heads) of ``rank`` out of ``tp``, as vLLM assigns them."""
    assert hq % tp == 0, "vLLM requires query heads divisible by tp"
    q = slice(rank * hq // tp, (rank + 1) * hq // tp)
    if tp <= hkv:
        assert hkv % tp == 0
        per = hkv // tp
        return q, slice(rank * per, (rank + 1) * per)
    assert tp % hkv == 0
    kv = rank // (tp // hkv)  # replicas of one KV head sit on consecutive ranks
    return q, slice(kv, kv + 1)


def pages_of(k: torch.Tensor, v: torch.Tensor, fills: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """quantize_pages over pages of shape (n * heads, P, D) → bytes (n, heads, page_bytes)."""
    n, h = k.shape[:2]
    out = page.quantize_pages(
        k.reshape(n * h, P, D),
        v.reshape(n * h, P, D),
        LAYOUT,
        fill=fills.repeat_interleave(h),
        sink=sinks.repeat_interleave(h),
    )
    return out.reshape(n, h, LAYOUT.page_bytes)


CONFIGS = [  # (Hq, Hkv, tp)
    (8, 4, 2),  # GQA, KV heads split 2 + 2
    (8, 4, 4),  # one KV head per rank
    (9, 3, 3),  # SmolLM2-135M's heads
    (8, 2, 4),  # tp > Hkv: each KV head replicated on 2 ranks
]


def shard_attention(cache, query, q, kv):
    """The reference attention of query heads ``q`` over KV heads ``kv`` (one rank's share)."""
    kv_pages, staging, tables, lens, qsl, tails, key, value = cache
    kv_cache = (key[:, kv], value[:, kv], kv_pages[:, kv], staging[:, :, kv])
    return ref.paged_attention(query[:, q], *kv_cache, tables, lens, qsl, tails, LAYOUT)


@pytest.mark.parametrize("hq, hkv, tp", CONFIGS)
def test_shard_pages_equal_the_slice_of_unsharded_pages(hq, hkv, tp):
    g = torch.Generator().manual_seed(hq * 100 + hkv * 10 + tp)
    n = 4
    k = torch.randn(n, hkv, P, D, generator=g, dtype=torch.float32).to(torch.bfloat16)
    v = torch.randn(n, hkv, P, D, generator=g, dtype=torch.float32).to(torch.bfloat16)
    k[:, :, 7, 3] *= 40  # outliers, so per-page choices (exact token, K outliers) differ across heads
    fills = torch.tensor([P, P, 17, 1])  # full pages and early-finalised ones
    sinks = torch.tensor([True, False, False, True])
    full = pages_of(k, v, fills, sinks)
    for rank in range(tp):
        _, kv = shard_heads(rank, tp, hq, hkv)
        shard = pages_of(k[:, kv], v[:, kv], fills, sinks)
        assert torch.equal(shard, full[:, kv]), f"rank {rank}: its pages differ from the unsharded slice"


def build_cache(hkv: int, seq_lens: list[int], new_tokens: list[int], g: torch.Generator):
    """A paged cache holding each sequence's context: full pages quantized into shuffled blocks
    (block 0 is the null block), the partial last page in a staging slot; plus the step's new tokens."""
    num_blocks = 1 + sum(-(-s // P) for s in seq_lens)
    blocks = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    kv_pages = torch.zeros(num_blocks, hkv, LAYOUT.page_bytes, dtype=torch.uint8)
    staging = torch.zeros(len(seq_lens), 2, hkv, P, D, dtype=torch.bfloat16)
    max_pages = max(-(-s // P) for s in seq_lens)
    block_tables = torch.zeros(len(seq_lens), max_pages, dtype=torch.int32)
    tail_slots = torch.full((len(seq_lens),), -1, dtype=torch.int32)
    keys, values = [], []
    for b, (seq_len, n_new) in enumerate(zip(seq_lens, new_tokens)):
        k = torch.randn(seq_len, hkv, D, generator=g).to(torch.bfloat16)
        v = torch.randn(seq_len, hkv, D, generator=g).to(torch.bfloat16)
        n_pages = -(-seq_len // P)
        for i in range(n_pages):
            block_tables[b, i] = blocks.pop()
        n_full = seq_len // P
        if n_full:
            kp = k[: n_full * P].reshape(n_full, P, hkv, D).transpose(1, 2)
            vp = v[: n_full * P].reshape(n_full, P, hkv, D).transpose(1, 2)
            ref.finalize_pages(
                kv_pages,
                LAYOUT,
                block_tables[b, :n_full],
                kp,
                vp,
                torch.full((n_full,), P),
                torch.arange(n_full) == 0,
            )
        if seq_len % P:
            tail = seq_len - n_full * P
            staging[b, 0, :, :tail] = k[n_full * P :].transpose(0, 1)
            staging[b, 1, :, :tail] = v[n_full * P :].transpose(0, 1)
            tail_slots[b] = b
        keys.append(k[seq_len - n_new :])
        values.append(v[seq_len - n_new :])
    qsl = torch.tensor([0] + new_tokens).cumsum(0)
    return (
        kv_pages,
        staging,
        block_tables,
        torch.tensor(seq_lens),
        qsl,
        tail_slots,
        torch.cat(keys),
        torch.cat(values),
    )


@pytest.mark.parametrize("hq, hkv, tp", CONFIGS)
def test_shard_attention_equals_the_slice_of_unsharded_attention(hq, hkv, tp):
    g = torch.Generator().manual_seed(7 + hq + hkv + tp)
    # decode (1 new token), a chunk ending mid-page, a prefill on exact page boundaries
    seq_lens, new_tokens = [2 * P + 5, 2 * P - 9, P], [1, 6, P]
    cache = build_cache(hkv, seq_lens, new_tokens, g)
    query = torch.randn(sum(new_tokens), hq, D, generator=g).to(torch.bfloat16)
    full = shard_attention(cache, query, slice(None), slice(None))
    outputs = []
    for rank in range(tp):
        q, kv = shard_heads(rank, tp, hq, hkv)
        out = shard_attention(cache, query, q, kv)
        # Same fp32 math per head; only the batched matmul's blocking may differ across head counts.
        torch.testing.assert_close(out, full[:, q], rtol=0, atol=1e-2 * 2**-7)
        outputs.append(out)
    # Gathering the ranks' outputs in rank order gives the whole layer's output.
    torch.testing.assert_close(torch.cat(outputs, 1), full, rtol=0, atol=1e-2 * 2**-7)


def test_a_wrong_head_split_is_caught():
    """The check has teeth: pairing a rank's queries with another rank's KV heads fails it."""
    hq, hkv, tp = 8, 4, 2
    g = torch.Generator().manual_seed(3)
    cache = build_cache(hkv, [P + 3], [1], g)
    query = torch.randn(1, hq, D, generator=g).to(torch.bfloat16)
    full = shard_attention(cache, query, slice(None), slice(None))
    q0, _ = shard_heads(0, tp, hq, hkv)
    _, kv1 = shard_heads(1, tp, hq, hkv)
    wrong = shard_attention(cache, query, q0, kv1)
    assert not torch.allclose(wrong.float(), full[:, q0].float(), atol=1e-2)
