"""fp_pages debug mode against vLLM's own backend: the wiring is right.

With full-precision debug pages our backend runs every step exactly as in production — metadata
builder, staging pool and its plan, page finalisation, re-opening, block tables, slot mapping —
but a page stores its keys and values at full precision instead of 2-bit codes. It must then
reproduce vLLM's default CPU backend token for token (up to near-ties, below), under everything the
scheduler does: chunked prefill ending mid-page,
prefix-cache hits on full pages, preemption (a cache of 12 blocks), abort mid-generation and 32
concurrent requests. Afterwards no staging slot is held for a live block and vLLM's KV usage is
back to its baseline.

Both engines (float32: exact agreement needs the same arithmetic on both sides, and fp32 matmuls are
much faster than bf16 on CPUs without AVX512-BF16) live for the whole module.

Tokens are compared the way two numeric stacks can be: vLLM's CPU attention kernels and our
PyTorch attention both run in fp32 but sum in different orders (and pick their SIMD path by CPU),
so a greedy choice between two tokens whose log-probabilities differ by less than ``TIE_NATS`` may
go either way. Each request's tokens must be equal up to the first position where the default
engine sees such a near-tie; there the fp_pages engine may pick the runner-up, and the comparison of
that request stops (its later tokens continue a different text). Log-probabilities of equal tokens
must agree within ``LOGPROB_NATS``.
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


#: A greedy choice between two tokens this close (nats, in the default engine) may go either way.
TIE_NATS = 1e-3
#: fp32 on both sides, no quantization: log-probabilities of the same token agree to rounding.
LOGPROB_NATS = 1e-3


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=2)


def generate(llm, prompts, n):
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy(n), use_tqdm=False)
    return [o.outputs[0] for o in outs], outs


def both(engines, prompts, n):
    got = {name: generate(llm, prompts, n) for name, llm in engines.items()}
    return got["default"], got["fp_pages"]


def mismatches(wants, gots) -> list[str]:
    """Requests whose fp_pages tokens differ from the default engine's other than at a near-tie."""
    bad = []
    for r, (want, got) in enumerate(zip(wants, gots)):
        if len(got.token_ids) != len(want.token_ids):
            bad.append(f"request {r}: {len(got.token_ids)} tokens, the default made {len(want.token_ids)}")
            continue
        for i, (w, g) in enumerate(zip(want.token_ids, got.token_ids)):
            wl, gl = want.logprobs[i], got.logprobs[i]
            if w == g:
                if abs(wl[w].logprob - gl[g].logprob) > LOGPROB_NATS:
                    bad.append(f"request {r} at {i}: log-prob {gl[g].logprob:.6f} vs {wl[w].logprob:.6f}")
                    break
                continue
            margin = wl[w].logprob - wl[g].logprob if g in wl else float("inf")
            if margin > TIE_NATS:
                bad.append(f"request {r} at {i}: token {g}, the default chose {w} by {margin:.3g} nats")
            break  # past a near-tie the two continue different texts
    return bad


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
    assert not mismatches(want, got)


def test_prefix_cache_hits_on_full_pages(engines, tok):
    prefix = T.prompt_windows(tok, [300], offset=500)[0]  # a prefix no earlier request used
    first = prefix + T.prompt_windows(tok, [20], offset=3)[0]
    second = prefix + T.prompt_windows(tok, [45], offset=9)[0][::-1]
    for prompt in (first, second):
        (want, w_out), (got, g_out) = both(engines, [prompt], 6)
        assert not mismatches(want, got)
    assert g_out[0].num_cached_tokens == 256 and w_out[0].num_cached_tokens == 256


def test_32_concurrent_requests_with_preemption(engines, tok):
    # 100..127 tokens: one page each, and a third of them cross into a second page while decoding,
    # when all 11 usable blocks are taken: the scheduler must preempt
    lengths = [100 + (i * 37) % 28 for i in range(32)]
    before = {name: llm.preemptions for name, llm in engines.items()}
    (want, _), (got, _) = both(engines, T.prompt_windows(tok, lengths, stride=29), 6)
    assert engines["fp_pages"].preemptions > before["fp_pages"], "the tiny cache should force preemption"
    preempted = {name: llm.preemptions - before[name] for name, llm in engines.items()}
    assert preempted["fp_pages"] == preempted["default"]
    assert not mismatches(want, got)


def run_with_aborts(llm, prompts, n, abort_after: dict[int, int]):
    """Step the engine by hand; abort request i once it has produced ``abort_after[i]`` tokens."""
    engine = llm.llm_engine
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, TokensPrompt(prompt_token_ids=p), greedy(n))
    outputs: dict[str, object] = {}
    aborted = set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out.outputs[0]
        for i, k in abort_after.items():
            rid = ids[i]
            if rid not in aborted and rid in outputs and len(outputs[rid].token_ids) >= k:
                engine.abort_request([rid])
                aborted.add(rid)
    return [outputs[rid] for rid in ids]


def test_abort_mid_generation(engines, tok):
    prompts = T.prompt_windows(tok, [150, 90, 260, 40], stride=101)
    runs = {name: run_with_aborts(llm, prompts, 8, {1: 2, 3: 5}) for name, llm in engines.items()}
    want, got = runs["default"], runs["fp_pages"]
    assert not mismatches(want, got)  # lengths included
    assert len(got[0].token_ids) == 8 and len(got[1].token_ids) < 8


def test_afterwards_no_slot_is_leaked_and_kv_usage_is_back(engines, tok):
    for llm in engines.values():
        assert T.kv_usage(llm) == pytest.approx(llm.baseline_usage)
    rep = T.staging_report(engines["fp_pages"])
    assert rep["mapped_blocks_held_by_requests"] == []
    assert rep["slots_mapped"] <= rep["slots_total"]
    assert rep["stats"].reclaimed > 0  # blocks of finished requests were handed out again
    # the pool is reclaimable: one more full batch runs and stays exact
    (want, _), (got, _) = both(engines, T.prompt_windows(tok, [70] * 4, stride=61), 3)
    assert not mismatches(want, got)
    assert T.staging_report(engines["fp_pages"])["mapped_blocks_held_by_requests"] == []
    # the engine is idle: releasing the slots of finished requests empties the pool
    assert T.staging_report(engines["fp_pages"])["slots_mapped"] > 0
    assert T.release_finished(engines["fp_pages"]).staging_slots_in_use == 0
