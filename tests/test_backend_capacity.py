"""Capacity: at the same ``VLLM_CPU_KVCACHE_SPACE``, vLLM fits ≥ 5.5x more tokens with kivi-serve.

A bf16 engine of the embedded SmolLM2 (30 layers, 3 KV heads, head_dim 64) starts with our backend
and we read the token capacity vLLM computed for it (``num_gpu_blocks * block_size``); ours has the
staging pool taken out of the budget first, so the ratio is the honest one. The default backend's
capacity is computed, not started: vLLM's CPU worker divides ``VLLM_CPU_KVCACHE_SPACE`` by the
bytes of one block of every layer, which its own ``FullAttentionSpec`` states. The test also
proves that *our* backend ran (a plugin that fails to load makes vLLM fall back to its default
silently): the impl class of every layer, and a uint8 cache of exactly ``[blocks, kv_heads, page_size, C]``.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("vllm")

from support import engines as T  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

from kivi_serve.backend import cache_stats  # noqa: E402
from kivi_serve.quant.layout import PageLayout  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_NUM_SEQS = 32
ENGINE = dict(dtype="bfloat16", max_num_seqs=MAX_NUM_SEQS, max_model_len=4096)


@pytest.fixture(scope="module")
def engines(model):
    """(default blocks, facts about the kivi engine); the engine is stopped at once."""
    spec = FullAttentionSpec(block_size=128, num_kv_heads=3, head_size=64, dtype=torch.bfloat16)
    default_blocks = (int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) << 30) // (30 * spec.page_size_bytes)
    llm = T.make_llm(model, "kivi", **ENGINE)
    try:
        layers = T.attention_layers(llm)
        facts = {
            "blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
            "block_size": llm.llm_engine.vllm_config.cache_config.block_size,
            "impls": {type(layer.impl).__name__ for layer in layers.values()},
            "kv": {(layer.kv_cache.dtype, tuple(layer.kv_cache.shape)) for layer in layers.values()},
            "num_layers": len(layers),
            "stats": cache_stats(),
        }
    finally:
        T.shutdown(llm)
    return default_blocks, facts


def test_our_backend_ran(engines):
    _, f = engines
    layout = PageLayout(64, 128)
    assert f["impls"] == {"KiviAttentionImpl"}
    assert f["num_layers"] == 30
    assert f["kv"] == {(torch.uint8, (f["blocks"], 3, 128, layout.slot_bytes))}
    assert f["stats"].active and f["stats"].slot_bytes == layout.slot_bytes == 43


def test_capacity_ratio_with_staging_counted(engines, record_property):
    default_blocks, f = engines
    P = f["block_size"]
    ours, theirs = f["blocks"] * P, default_blocks * P
    ratio = ours / theirs
    st = f["stats"]
    budget = int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) << 30
    # bytes per token, all layers: default bf16 K+V vs our pages; staging is a fixed cost
    per_token_default = 30 * 3 * 2 * 64 * 2
    per_token_ours = 30 * 3 * st.slot_bytes
    record_property("capacity_tokens_default", theirs)
    record_property("capacity_tokens_kivi", ours)
    record_property("capacity_ratio", round(ratio, 3))
    print(
        f"\ncapacity at {budget >> 30} GiB: default {theirs} tokens ({per_token_default} B/token), "
        f"kivi {ours} "
        f"tokens ({per_token_ours} B/token + {st.staging_bytes / 2**20:.0f} MiB staging for "
        f"{st.staging_slots_total} slots): {ratio:.3f}x"
    )
    assert st.staging_slots_total == MAX_NUM_SEQS + 4
    # vLLM's count is what the budget minus staging holds at C bytes per slot
    assert f["blocks"] == (budget - st.staging_bytes) // (30 * 3 * 128 * st.slot_bytes)
    assert ratio >= 5.5


def test_layout_ratio_at_head_dim_128():
    """A head_dim-128 model (no engine needed: vLLM sizes blocks by the spec's page bytes)."""
    layout = PageLayout(128, 128)
    assert layout.compression_vs_bf16 >= 6.0  # 2 * 128 * 2 bytes per token per head vs slot_bytes
    assert (2 * 128 * 2) / layout.slot_bytes == pytest.approx(6.4)
