"""The real thing: vLLM runs SmolLM2 with 2-bit pages, and its greedy output equals, token for token,
a standalone run of the same model whose attention goes through ``kivi_serve.kernels.reference``
with its own pages and staging pool (:class:`support.standalone.StandaloneRunner`).

Prompts fill several pages (during prefill straight from the input, during a later chunk from the
staging slot plus the input, during decode from the slot plus the new token) and stop mid-page. The
standalone runner replays vLLM's schedule for each case: one prefill step, 300-token chunks for
chunked prefill, a 256-token first chunk for a prefix-cache hit (the cached pages are exactly what
such a chunk writes). float32 on both sides, so
that vLLM's and transformers' kernels agree closely enough for the quantized pages to agree.
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


def generate(llm, prompts, n):
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], outs


def test_our_backend_ran(llm):
    layers = T.attention_layers(llm)
    blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    assert {type(layer.impl).__name__ for layer in layers.values()} == {"KiviAttentionImpl"}
    assert {(layer.kv_cache.dtype, tuple(layer.kv_cache.shape)) for layer in layers.values()} == {
        (torch.uint8, (blocks, 3, 128, PageLayout(64, 128).slot_bytes))
    }


def test_greedy_equals_standalone_reference(llm, runner, tok):
    # 250 + 12: page 0 finalised from the input at prefill, page 1 fills during decode and is
    # finalised from its staging slot + the new token; 40: stays in staging. One prefill step.
    prompts = T.prompt_windows(tok, [250, 40])
    got, _ = generate(llm, prompts, 12)
    for p, g in zip(prompts, got):
        assert g == runner.generate(p, 12)


def test_chunked_prefill_equals_standalone_reference(llm, runner, tok):
    # chunks of 300 + 100: the first finalises pages 0-1 and ends mid-page 2; the second completes
    # page 2 (its first 44 tokens from the staging slot) and opens page 3
    prompt = T.prompt_windows(tok, [400], offset=400)[0]
    got, outs = generate(llm, [prompt], 4)
    assert outs[0].num_cached_tokens == 0
    assert got[0] == runner.generate(prompt, 4, chunks=BUDGET)


def test_prefix_cache_hit_equals_standalone_reference(llm, runner, tok):
    prefix = T.prompt_windows(tok, [270], offset=600)[0]  # a prefix no earlier request used
    first = prefix + T.prompt_windows(tok, [10], offset=5)[0]
    second = prefix + T.prompt_windows(tok, [30], offset=7)[0][::-1]
    got, outs = generate(llm, [first], 4)
    assert outs[0].num_cached_tokens == 0
    assert got[0] == runner.generate(first, 4)
    got, outs = generate(llm, [second], 4)
    assert outs[0].num_cached_tokens == 256  # two full pages, read quantized
    assert got[0] == runner.generate(second, 4, chunks=[256, len(second) - 256])


def test_afterwards_staging_is_reclaimable_and_kv_usage_is_back(llm):
    assert T.kv_usage(llm) == pytest.approx(llm.baseline_usage)
    rep = T.staging_report(llm)
    assert rep["mapped_blocks_held_by_requests"] == []
    assert rep["layer_plan_ids"] == rep["group_plan_ids"]  # all 30 layers executed every plan
    st = rep["stats"]
    assert st.num_layers == 30
    assert st.mode == "quantized" and st.early_finalisations == 0  # 36 slots were plenty
    assert st.dequant_cache_bytes > 0
