"""The real thing: vLLM runs SmolLM2 with 2-bit pages, checked two ways.

1. **Exact, our part.** Every key and value vLLM hands the backend is recorded
   (:class:`support.capture.AppendCapture`); each page the request fills must equal, byte for byte,
   the reference encoding of exactly those tokens, and each open page's staged tokens must equal them.
   Nothing numeric sits between vLLM's tensors and our bytes, so this holds on any CPU.
2. **Within a stated tolerance, the model.** A standalone run of the same model (transformers, its
   attention through ``kivi_serve.kernels.reference`` with its own pages and staging pool,
   :class:`support.standalone.StandaloneRunner`) is fed the engine's tokens on vLLM's schedule
   (teacher forcing). At every position the engine's greedy token must be the oracle's argmax unless
   the oracle itself sees a near-tie (its preference for another token is below ``TIE_NATS``), and
   the engine's log-probability of its token must be within ``LOGPROB_NATS`` of the oracle's.
   vLLM's CPU kernels and transformers' fp32 kernels pick their SIMD path by CPU (AVX-512 vs AVX2)
   and differ in the last bits; after 2-bit quantization that can move a code and flip a token
   whose top-2 margin is tiny, so exact token equality would be a verdict on the CPU, not on us.

Prompts fill several pages (during prefill straight from the input, during a later chunk from the
staging slot plus the input, during decode from the slot plus the new token) and stop mid-page. The
standalone runner replays vLLM's schedule for each case: one prefill step, 300-token chunks for
chunked prefill, a 256-token first chunk for a prefix-cache hit (the cached pages are exactly what
such a chunk writes). float32 on both sides.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from support import engines as T  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from kivi_serve.quant.layout import PageLayout  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BUDGET = 300  # max_num_batched_tokens: not a multiple of the page size, so chunks end mid-page
ENGINE = dict(
    dtype="float32",
    max_num_seqs=32,
    max_model_len=2048,
    max_num_batched_tokens=BUDGET,
    enable_prefix_caching=True,
)


@pytest.fixture(scope="module")
def llm(model):
    engine = T.make_llm(model, "kivi", **ENGINE)
    engine.baseline_usage = T.kv_usage(engine)
    yield engine
    T.shutdown(engine)


@pytest.fixture(scope="module")
def runner(model):
    from support.standalone import StandaloneRunner

    return StandaloneRunner(model, page_size=128, num_blocks=64, staging_slots=4, dtype=torch.float32)


#: |engine log-prob - oracle log-prob| of the engine's token, at every position (nats). Measured on
#: these cases and four longer ones (Xeon, AVX-512 and AVX2 kernels): up to 0.037, where a rounding
#: difference moved codes of a page finalised mid-chunk; 0 where every token was still staged
#: (full precision). The bound leaves 4x room; a page read wrong costs nats, not hundredths.
LOGPROB_NATS = 0.15
#: Where the engine's token is not the oracle's argmax, the oracle may prefer its own by at most this
#: much (nats): a near-tie the two stacks' differences (bounded above) may flip.
TIE_NATS = 2 * LOGPROB_NATS


def generate(llm, prompt, n, cached=0):
    """One request (greedy, n tokens) with its appends checked; returns (tokens, log-probs, output)."""
    from support.capture import AppendCapture

    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=1)
    with AppendCapture(first_position=cached) as cap:
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
    assert out.num_cached_tokens == cached
    assert cap.staged_checks > 0  # every call that left a page open was checked against staging
    tokens = list(out.outputs[0].token_ids)
    logprobs = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, tokens)]
    return tokens, logprobs, cap


def assert_agrees(runner, prompt, tokens, logprobs, chunks=None):
    """The engine's tokens against the oracle fed the same tokens (see the module docstring)."""
    ref = runner.score(prompt, tokens, chunks)  # (n, vocab) float64
    for i, (t, lp) in enumerate(zip(tokens, logprobs)):
        best = int(ref[i].argmax())
        prefers = float(ref[i, best] - ref[i, t])
        assert prefers <= TIE_NATS, (
            f"position {i}: the engine chose {t}, the oracle prefers {best} by {prefers:.3g} nats"
        )
        assert abs(lp - float(ref[i, t])) <= LOGPROB_NATS, (
            f"position {i}: log-prob of {t} is {lp:.5f} in the engine, {float(ref[i, t]):.5f} in the oracle"
        )


def test_our_backend_ran(llm):
    layers = T.attention_layers(llm)
    blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    assert {type(layer.impl).__name__ for layer in layers.values()} == {"KiviAttentionImpl"}
    assert {(layer.kv_cache.dtype, tuple(layer.kv_cache.shape)) for layer in layers.values()} == {
        (torch.uint8, (blocks, 3, 128, PageLayout(64, 128).slot_bytes))
    }


def test_decode_equals_reference(llm, runner, tok):
    # 250 + 12: page 0 finalised from the input at prefill, page 1 fills during decode and is
    # finalised from its staging slot + the new token; 40 + 12: stays in staging. One prefill step.
    for prompt in T.prompt_windows(tok, [250, 40]):
        tokens, logprobs, cap = generate(llm, prompt, 12)
        assert cap.check_pages() == (30 * 2 if len(prompt) == 250 else 0)
        assert_agrees(runner, prompt, tokens, logprobs)


def test_chunked_prefill_equals_reference(llm, runner, tok):
    # chunks of 300 + 100: the first finalises pages 0-1 and ends mid-page 2; the second completes
    # page 2 (its first 44 tokens from the staging slot) and opens page 3
    prompt = T.prompt_windows(tok, [400], offset=400)[0]
    tokens, logprobs, cap = generate(llm, prompt, 4)
    assert cap.check_pages() == 30 * 3
    assert_agrees(runner, prompt, tokens, logprobs, chunks=BUDGET)


def test_prefix_cache_hit_equals_reference(llm, runner, tok):
    prefix = T.prompt_windows(tok, [270], offset=600)[0]  # a prefix no earlier request used
    first = prefix + T.prompt_windows(tok, [10], offset=5)[0]
    second = prefix + T.prompt_windows(tok, [30], offset=7)[0][::-1]
    tokens, logprobs, cap = generate(llm, first, 4)
    assert cap.check_pages() == 30 * 2
    assert_agrees(runner, first, tokens, logprobs)
    tokens, logprobs, cap = generate(llm, second, 4, cached=256)  # two full pages, read quantized
    assert cap.check_pages() == 0  # nothing filled: the hit's pages were checked above
    assert_agrees(runner, second, tokens, logprobs, chunks=[256, len(second) - 256])


def test_afterwards_staging_is_reclaimable_and_kv_usage_is_back(llm):
    assert T.kv_usage(llm) == pytest.approx(llm.baseline_usage)
    rep = T.staging_report(llm)
    assert rep["mapped_blocks_held_by_requests"] == []
    assert rep["layer_plan_ids"] == rep["group_plan_ids"]  # all 30 layers executed every plan
    st = rep["stats"]
    assert st.num_layers == 30
    assert st.mode == "quantized" and st.early_finalisations == 0  # 36 slots were plenty
    assert st.dequant_cache_bytes > 0
    # idle engine: the slots of the finished requests are released (the adapter's stats probe does it)
    assert st.staging_slots_in_use > 0
    assert T.release_finished(llm).staging_slots_in_use == 0
