"""Helpers for tests and benchmarks that drive an in-process vLLM engine with or without kivi-serve.

Only for one-process engines (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, executor ``uni``): they reach
into the engine core, the scheduler and the worker directly.
"""

from __future__ import annotations

import gc
from typing import Any

from kivi_serve.backend import engine_overrides


def make_llm(model: str, backend: str = "kivi", **kwargs: Any):
    """An in-process ``vllm.LLM`` on ``backend``: ``"kivi"`` (2-bit pages), ``"fp_pages"`` (kivi-serve's
    wiring with full-precision pages) or ``"default"`` (vLLM's own attention).

    ``kwargs`` are engine arguments; ``block_size`` defaults to the page size (128) for all three so
    that their schedules are identical.
    """
    from vllm import LLM

    page_size = kwargs.pop("page_size", 128)
    args: dict[str, Any] = dict(distributed_executor_backend="uni", enforce_eager=True, block_size=page_size)
    if backend in ("kivi", "fp_pages"):
        args.update(
            engine_overrides(
                page_size, fp_pages=backend == "fp_pages", staging_slots=kwargs.pop("staging_slots", None)
            )
        )
    elif backend != "default":
        raise ValueError(f"backend must be 'kivi', 'fp_pages' or 'default', got {backend!r}")
    args.update(kwargs)
    return LLM(model=model, **args)


def shutdown(llm) -> None:
    """Stop an engine made by :func:`make_llm` and free its KV cache (so the next one can start)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 — best effort, the process goes on
        pass
    del llm
    gc.collect()
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    except Exception:  # noqa: BLE001
        pass


def engine_core(llm):
    return llm.llm_engine.engine_core.engine_core


def scheduler(llm):
    return engine_core(llm).scheduler


def worker(llm):
    return llm.llm_engine.model_executor.driver_worker.worker


def attention_layers(llm) -> dict:
    """``layer name → vLLM Attention module`` of the model."""
    ctx = worker(llm).model_runner.vllm_config.compilation_config.static_forward_context
    return {name: layer for name, layer in ctx.items() if hasattr(layer, "impl")}


def kv_usage(llm) -> float:
    """vLLM's KV-cache usage (fraction of blocks held by requests), as its metrics report it."""
    return float(scheduler(llm).kv_cache_manager.usage)


def staging_report(llm) -> dict:
    """Which vLLM blocks the staging pool still maps, and whether vLLM considers them free.

    A slot is *reclaimable* when its block is held by no request (``ref_cnt == 0``): the next time
    vLLM hands the block out it is written from offset 0 and the slot is reclaimed, and under
    pressure the slot is the first the pool takes back (and :func:`release_finished` frees it).
    """
    from kivi_serve.backend.runtime import runtime_of

    runner = worker(llm).model_runner
    rt = runtime_of(runner.vllm_config)
    if rt is None:
        return {"active": False}
    blocks = scheduler(llm).kv_cache_manager.block_pool.blocks
    mapped = sorted({blk for g in rt.groups for blk in g.pool.snapshot()["slot_blocks"] if blk >= 0})
    held = [blk for blk in mapped if blocks[blk].ref_cnt > 0]
    return {
        "active": True,
        "slots_total": rt.num_slots,
        "slots_mapped": len(mapped),
        "mapped_blocks_held_by_requests": held,
        # every layer executed every plan: one distinct value, equal to the group's plan count
        "layer_plan_ids": sorted({impl.last_plan_id for impl in rt.layers}),
        "group_plan_ids": [g.plan_id for g in rt.groups],
        "stats": rt.stats(),
    }


def release_finished(llm) -> dict:
    """What happens in a server once the last request is done: the engine core steps once more to
    hand the scheduler's finished requests to the model runner (``EngineCore.run_busy_loop`` steps
    while ``scheduler.has_requests()``, which counts finished ones; the offline ``LLM`` loop stops
    earlier), then the adapter's stats probe releases their staging slots and reads the stats."""
    from kivi_serve.backend import cache_stats, release_finished

    core = engine_core(llm)
    for _ in range(4):
        if not core.scheduler.has_finished_requests():
            break
        core.step_fn()
    runner = worker(llm).model_runner
    release_finished(runner)
    return cache_stats(runner.vllm_config)


#: English prose for test prompts (written for these tests; no download needed).
PROSE = """\
The lighthouse keeper had kept the lamp burning for thirty-one winters, and in all that time the
island had changed less than he had. Every evening he climbed the one hundred and twelve steps,
trimmed the wick, polished the great lens until it threw his own face back at him in a hundred
curved pieces, and wrote three lines in the log: the wind, the sea, and whatever ship had passed.
Most nights there was no ship. The log filled anyway, a slow river of weather running down the
pages, and when a book was full he tied it with string and set it on the shelf beside the others.
In the spring of his thirty-second year a letter came on the supply boat. It was from a school on
the mainland, written in the careful round hand of a child, and it asked a single question: what
does the light say to the ships? The keeper read it twice, then folded it into his coat. He had
never thought of the light as saying anything. It turned, it flashed twice every ten seconds, and
the ships, if they were wise, kept away from the rocks that lay under the water to the north.
That night he watched the beam sweep across the dark and tried to hear it as a ship would. Here I
am, it said. Here is the edge of the world you know. Beyond me the water is shallow and the stone
is sharp. Turn, and live. He wrote that down, not in the log but on a fresh sheet of paper, and
he found that once he had started he could not stop. He wrote about the storm of his fourth winter,
when the waves broke over the gallery and the whole tower hummed like a struck bell. He wrote about
the seals that slept on the southern beach and the terns that nested in the grass each summer,
screaming at him whenever he walked to the well. He wrote about the supply boat and its captain, a
woman who never said more than nine words on any visit and who once, without explanation, left him
a jar of honey and a book of poems. By the time the sky turned grey he had filled eleven pages. He
read them over with the strange feeling of meeting a stranger who knew everything about him. Then
he copied them out more neatly, added a drawing of the lamp with all its brass and glass, and wrote
at the bottom: the light says that someone is awake. When the boat came again he gave the letter to
the captain, who looked at the address, looked at him, and said, for the first time in thirty-one
years, more than nine words. She said that her daughter went to that school, and that the whole
class had been waiting. The keeper did not know what to say to that, so he said nothing, and the
captain laughed, and the boat pulled away across the bright cold water toward the distant town.
Weeks later a parcel arrived. Inside were twenty-three letters, one from every child in the class,
and each of them asked another question. How do you sleep if the light must never go out? What do
you eat in winter? Have you ever seen a whale? Are you lonely? He answered every one. The answers
grew longer as the summer went on, and the shelf of logbooks gained a companion shelf of letters,
and for the first time the island seemed to him not the end of the world but the middle of it.
"""


def prompt_windows(tokenizer, lengths: list[int], stride: int = 37, offset: int = 0) -> list[list[int]]:
    """Token-id prompts of the given lengths, prompt ``i`` starting at token ``offset + i * stride`` of
    :data:`PROSE` (wrapping around the text as needed). Prompts that start at different offsets share
    no prefix block; reuse an (offset, stride) pair only to share one on purpose."""
    ids = tokenizer(PROSE)["input_ids"]
    out = []
    for i, n in enumerate(lengths):
        start = (offset + i * stride) % len(ids)
        window = (ids[start:] + ids) * (1 + n // len(ids))
        out.append(window[:n])
    return out
