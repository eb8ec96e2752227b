"""fp_pages debug mode against vLLM's own backend: the wiring is right.

With full-precision debug pages our backend runs every step exactly as in production — metadata
builder, staging pool and its plan, page finalisation, re-opening, block tables, slot mapping — but a page stores its
keys and values at full precision instead of 2-bit codes. It must then reproduce vLLM's default CPU
backend token for token, under everything the scheduler does: chunked prefill ending mid-page,
prefix-cache hits on full pages, preemption (a cache of 12 blocks), abort mid-generation and 32
concurrent requests. Afterwards no staging slot is held for a live block and vLLM's KV usage is
back to its baseline.

Both engines (float32: exact agreement needs the same arithmetic on both sides, and fp32 matmuls are
much faster than bf16 on CPUs without AVX512-BF16) live for the whole module.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from support import engines as T  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ENGINE = dict(
    dtype="float32",
    max_num_seqs=32,
    max_model_len=1024,
    max_num_batched_tokens=700,
    num_gpu_blocks_override=12,
    enable_prefix_caching=True,
)


@pytest.fixture(scope="module")
def engines(model):
    """{"default": LLM, "fp_pages": LLM}, each with a preemption counter."""
    out = {}
    for backend in ("default", "fp_pages"):
        llm = T.make_llm(model, backend, **ENGINE)
        sched = T.scheduler(llm)
        preempt = sched._preempt_request
        llm.preemptions = 0

        def counting(*a, _llm=llm, _orig=preempt, **kw):
            _llm.preemptions += 1
            return _orig(*a, **kw)

        sched._preempt_request = counting
        llm.baseline_usage = T.kv_usage(llm)
        out[backend] = llm
    yield out
    for llm in out.values():
        T.shutdown(llm)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def generate(llm, prompts, n):
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy(n), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], outs


def both(engines, prompts, n):
    got = {name: generate(llm, prompts, n) for name, llm in engines.items()}
    return got["default"], got["fp_pages"]


def test_fp_pages_backend_is_ours(engines):
    layers = T.attention_layers(engines["fp_pages"])
    assert {type(layer.impl).__name__ for layer in layers.values()} == {"KiviAttentionImpl"}
    stats = T.staging_report(engines["fp_pages"])["stats"]
    assert stats.mode == "fp_pages" and stats.slot_bytes == 2 * 64 * 4  # fp32 K and V
    layers = T.attention_layers(engines["default"])
    assert {type(layer.impl).__name__ for layer in layers.values()} == {"CPUAttentionBackendImpl"}


def test_pages_and_chunked_prefill_ending_mid_page(engines, tok):
    # 1616 prompt tokens through a 700-token budget: the first step takes 300 + 200 + 129 and 71
    # tokens of the fourth prompt (a chunk ending mid-page), later steps the rest, including 700
    # tokens of the 900-token prompt; prompts cover several pages and the outputs stop mid-page
    prompts = T.prompt_windows(tok, [300, 200, 129, 127, 60], offset=700) + T.prompt_windows(
        tok, [900], offset=200
    )
    (want, _), (got, outs) = both(engines, prompts, 10)
    assert all(o.num_cached_tokens == 0 for o in outs)
    assert got == want


def test_prefix_cache_hits_on_full_pages(engines, tok):
    prefix = T.prompt_windows(tok, [300], offset=500)[0]  # a prefix no earlier request used
    first = prefix + T.prompt_windows(tok, [20], offset=3)[0]
    second = prefix + T.prompt_windows(tok, [45], offset=9)[0][::-1]
    for prompt in (first, second):
        (want, w_out), (got, g_out) = both(engines, [prompt], 6)
        assert got == want
    assert g_out[0].num_cached_tokens == 256 and w_out[0].num_cached_tokens == 256


def test_32_concurrent_requests_with_preemption(engines, tok):
    # 100..127 tokens: one page each, and a third of them cross into a second page while decoding,
    # when all 11 usable blocks are taken: the scheduler must preempt
    lengths = [100 + (i * 37) % 28 for i in range(32)]
    before = {name: llm.preemptions for name, llm in engines.items()}
    (want, _), (got, _) = both(engines, T.prompt_windows(tok, lengths, stride=29), 6)
    assert engines["fp_pages"].preemptions > before["fp_pages"], "the tiny cache should force preemption"
    assert (
        engines["fp_pages"].preemptions - before["fp_pages"] == engines["default"].preemptions - before["default"]
    )
    mismatched = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert not mismatched, f"requests {mismatched} differ"


def run_with_aborts(llm, prompts, n, abort_after: dict[int, int]):
    """Step the engine by hand; abort request i once it has produced ``abort_after[i]`` tokens."""
    engine = llm.llm_engine
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, TokensPrompt(prompt_token_ids=p), greedy(n))
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    aborted = set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] = list(out.outputs[0].token_ids)
        for i, k in abort_after.items():
            rid = ids[i]
            if rid not in aborted and len(tokens[rid]) >= k:
                engine.abort_request([rid])
                aborted.add(rid)
    return [tokens[rid] for rid in ids]


def test_abort_mid_generation(engines, tok):
    prompts = T.prompt_windows(tok, [150, 90, 260, 40], stride=101)
    runs = {name: run_with_aborts(llm, prompts, 8, {1: 2, 3: 5}) for name, llm in engines.items()}
    assert runs["fp_pages"] == runs["default"]
    assert len(runs["fp_pages"][0]) == 8 and len(runs["fp_pages"][1]) < 8


def test_afterwards_no_slot_is_leaked_and_kv_usage_is_back(engines, tok):
    for llm in engines.values():
        assert T.kv_usage(llm) == pytest.approx(llm.baseline_usage)
    rep = T.staging_report(engines["fp_pages"])
    assert rep["mapped_blocks_held_by_requests"] == []
    assert rep["slots_mapped"] <= rep["slots_total"]
    assert rep["stats"].reclaimed > 0  # blocks of finished requests were handed out again
    # the pool is reclaimable: one more full batch runs and stays exact
    (want, _), (got, _) = both(engines, T.prompt_windows(tok, [70] * 4, stride=61), 3)
    assert got == want
    assert T.staging_report(engines["fp_pages"])["mapped_blocks_held_by_requests"] == []
