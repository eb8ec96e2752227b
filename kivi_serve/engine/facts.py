"""The KV cache arithmetic behind :class:`~kivi_serve.engine.types.CacheFacts` (pure, no vLLM).

Inputs are what the running engine reports: the block count and cache tensor bytes vLLM allocated
(``kivi_kv_layout`` from each worker), our backend's :class:`BackendStats` (staging pool), vLLM's
scheduler numbers, and the model's shape. Compression is bf16 bytes for the same token capacity
divided by the bytes really allocated (pages + staging): never a constant.
"""

from __future__ import annotations

import time

from kivi_serve.backend.stats import BackendStats
from kivi_serve.engine.stats import SchedulerSnapshot
from kivi_serve.engine.types import CacheFacts


def compute_facts(
    *,
    backend: str,
    attention_impl: str,
    kv_cache_dtype: str,
    block_size: int,
    num_blocks: int,
    layouts: list[dict],
    stats: BackendStats,
    snapshot: SchedulerSnapshot,
    model_dims: tuple[int, int, int],
) -> CacheFacts:
    """``layouts``: ``kivi_kv_layout()`` of each worker; ``stats``: the workers' merged stats (inactive
    for vLLM's default backend); ``model_dims``: (layers, KV heads, head dim) of the whole model.

    With several KV-cache groups (sliding-window + full models) a block holds one page of each layer
    of one group, and a sequence holds blocks in every group: ``capacity_tokens`` is then the tokens
    when every group keeps a page for every page of the sequence (full attention, or contexts within
    the window; sliding groups of longer sequences hold fewer, so long contexts fit more), and the
    bits and compression count the token slots that exist (``blocks · P · layers / groups``).
    """
    layers, kv_heads, head_dim = model_dims
    groups = max(1, int(layouts[0].get("num_groups", 1))) if layouts else 1
    slots = num_blocks * block_size  # token slots of one group's layers
    capacity = slots // groups
    block_layers = layers / groups
    pages_total = sum(x["tensor_bytes"] for x in layouts)
    page_bytes = stats.page_bytes
    if not page_bytes and layouts:  # vLLM's own backend: a page is a block of one layer and head
        page_bytes = layouts[0]["page_size_bytes"] // layouts[0]["num_kv_heads"]
    staging_total, staging_in_use = stats.staging_slots_total, stats.staging_slots_in_use
    staging_bytes = stats.staging_bytes
    slot_bytes = staging_bytes / staging_total if staging_total else 0.0
    total = pages_total + staging_bytes
    used = min(total, int(round(snapshot.kv_usage * pages_total + staging_in_use * slot_bytes)))
    elements = slots * 2 * block_layers * kv_heads * head_dim
    return CacheFacts(
        backend=backend,
        attention_impl=attention_impl,
        kv_cache_dtype=kv_cache_dtype,
        page_size=block_size,
        num_blocks=num_blocks,
        capacity_tokens=capacity,
        page_bytes=page_bytes,
        kv_bytes_total=total,
        kv_bytes_used=used,
        kv_bytes_free=total - used,
        kv_usage=snapshot.kv_usage,
        bits_per_element=8.0 * total / elements if elements else 0.0,
        page_bits_per_element=8.0 * pages_total / elements if elements else 0.0,
        compression_vs_bf16=2 * elements / total if total else 0.0,
        staging_slots_total=staging_total,
        staging_slots_in_use=staging_in_use,
        early_finalisations=stats.early_finalisations,
        reopened=stats.reopened,
        reclaimed=stats.reclaimed,
        running=snapshot.running,
        waiting=snapshot.waiting,
        preemptions=snapshot.preemptions,
        stats_age_s=time.monotonic() - snapshot.updated,
    )
