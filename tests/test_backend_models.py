"""Sliding-window, head_dim-256 and attention-sink models served by a real vLLM engine on our backend.

Tiny random-init models (``support/tiny_models.py``: Gemma 3 with 3 sliding-window layers of 96 tokens
+ 1 full one at head_dim 256; gpt-oss with sink logits on every layer and a window on every other),
page size 64, chunked prefill of 128 tokens (chunks cross the window boundary and end mid-page),
prefix caching on. vLLM puts the sliding layers in their own KV-cache groups (``SlidingWindowSpec``)
and frees the pages that fall wholly out of the window; our backend masks the window, adds the sink
logits and skips the freed pages.

- fp_pages mode (our whole backend, full-precision pages) equals vLLM's default CPU backend token for
  token (up to near-ties, as in ``test_backend_fp_pages.py``);
- 2-bit pages: every page the engine fills equals the reference encoding of the keys and values vLLM
  handed the backend, and open pages' staged tokens equal them (``support/capture.py``).
"""

from __future__ import annotations

import random

import pytest

pytest.importorskip("vllm")

from support import engines as T  # noqa: E402
from support import tiny_models  # noqa: E402
from support.capture import AppendCapture  # noqa: E402
from test_backend_fp_pages import greedy, mismatches  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ENGINE = dict(
    page_size=64,
    dtype="float32",
    max_model_len=1024,
    max_num_batched_tokens=128,
    max_num_seqs=8,
    enable_prefix_caching=True,
)


@pytest.fixture(scope="module")
def folders(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {n: tiny_models.build(n, root, model) for n in ("gemma3", "gpt_oss")}


def prompts():
    rnd = random.Random(0)
    ps = [[rnd.randrange(100, 40000) for _ in range(n)] for n in (300, 40, 150)]
    return ps, ps[0][:200] + [5, 6, 7]  # the last one shares 3 full pages with the first: a prefix hit


def run(folder, backend):
    """Tokens of the prompts (one batch, then the prefix-sharing one), and facts about the layers."""
    llm = T.make_llm(str(folder), backend, **ENGINE)
    try:
        batch, again = prompts()
        outs = [
            o.outputs[0]
            for o in llm.generate(
                [TokensPrompt(prompt_token_ids=p) for p in batch], greedy(10), use_tqdm=False
            )
        ]
        outs += [
            o.outputs[0]
            for o in llm.generate([TokensPrompt(prompt_token_ids=again)], greedy(10), use_tqdm=False)
        ]
        impls = [layer.impl for layer in T.attention_layers(llm).values()]
        groups = [
            type(g.kv_cache_spec).__name__ for g in T.worker(llm).model_runner.kv_cache_config.kv_cache_groups
        ]
        return outs, impls, groups
    finally:
        T.shutdown(llm)


@pytest.mark.parametrize(
    "name, windows",
    [("gemma3", [96, 96, 96, None]), ("gpt_oss", [96, None])],
)
def test_fp_pages_equal_the_default_backend(folders, name, windows):
    want, *_ = run(folders[name], "default")
    # a model that lost weights at load (e.g. an lm_head left uninitialised) degenerates: one token, or
    # the same one repeated; random-init weights from a fixed seed give varied tokens
    tokens = [list(o.token_ids) for o in want]
    assert all(len(t) == 10 and len(set(t)) > 1 for t in tokens), tokens
    got, impls, groups = run(folders[name], "fp_pages")
    assert {type(i).__name__ for i in impls} == {"KiviAttentionImpl"}
    assert [i.attn.window for i in impls] == windows
    assert all((i.attn.sinks is not None) == (name == "gpt_oss") for i in impls)
    assert "SlidingWindowSpec" in groups and "FullAttentionSpec" in groups
    assert mismatches(want, got) == []


def test_2bit_pages_equal_the_reference_across_the_window(folders):
    """One 300-token request (3 chunks, pages freed behind the window) then 12 decode steps on 2-bit pages:
    every filled page of every layer is the reference encoding of what vLLM handed us, and the open page
    is staged token for token."""
    llm = T.make_llm(str(folders["gemma3"]), "kivi", **ENGINE)
    try:
        batch, _ = prompts()
        with AppendCapture() as cap:
            out = llm.generate([TokensPrompt(prompt_token_ids=batch[0])], greedy(12), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 12
        assert cap.check_pages() >= 4  # the full layer's 4 pages at least; sliding pages unless reused
        assert cap.staged_checks > 0
        impls = [layer.impl for layer in T.attention_layers(llm).values()]
        assert all(i.quantized for i in impls) and impls[0].head_size == 256
    finally:
        T.shutdown(llm)
