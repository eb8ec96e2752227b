"""`kivi-serve eval` computes the model itself: on each architecture (tiny random-init models: Gemma 3
with sliding + full layers and head_dim 256, gpt-oss with sink logits and sliding layers, a Qwen2
control), the harness's unquantized scheme reproduces transformers' own logits with its eager
attention (same windows, sinks, scale) to fp32 tolerance, over a sequence four times the window."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from support import tiny_models  # noqa: E402

from kivi_serve.eval import harness as H  # noqa: E402
from kivi_serve.quant.schemes import get_scheme  # noqa: E402

SEQ = 4 * tiny_models.WINDOW + 13


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from kivi_serve.model.prepare import embedded_model_dir, is_prepared

    if not is_prepared(embedded_model_dir()):
        pytest.skip("the embedded model (its tokenizer) is not prepared: kivi-serve model prepare")
    root = tmp_path_factory.mktemp("tiny")
    return {n: tiny_models.build(n, root, embedded_model_dir()) for n in ("gemma3", "gpt_oss", "qwen2")}


@pytest.mark.parametrize("name", ["gemma3", "gpt_oss", "qwen2"])
def test_fp16_scheme_reproduces_the_models_own_logits(folders, name):
    from transformers import AutoModelForCausalLM

    lm = H.load_model(folders[name], "cpu")
    ids = torch.randint(100, 40000, (1, SEQ), generator=torch.Generator().manual_seed(3))
    got = H.run_logits(lm, ids, get_scheme("fp16"), 64)
    own = AutoModelForCausalLM.from_pretrained(
        folders[name], dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        want = own.eval()(input_ids=ids, use_cache=False).logits.float()
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    if name != "qwen2":  # not vacuous: the harness with the layers' windows / sinks ignored differs
        orig = H.layer_attention
        H.layer_attention = lambda kwargs: None
        try:
            plain = H.run_logits(lm, ids, get_scheme("fp16"), 64)
        finally:
            H.layer_attention = orig
        assert (plain - want).abs().max() > 1e-2


def test_windows_start_with_bos_when_the_tokenizer_adds_it(folders):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders["gemma3"])
    text = "To be, or not to be, that is the question. " * 40
    assert not H.adds_bos(tok)  # SmolLM2's tokenizer adds no BOS
    plain = H.make_windows(tok, text, 2, 32)
    assert plain[0].tolist() == tok(text, add_special_tokens=False)["input_ids"][:32]
    tok.bos_token = tok.eos_token  # a tokenizer that adds BOS by default
    tok.add_bos_token = True
    assert H.adds_bos(tok)
    w = H.make_windows(tok, text, 2, 32)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert w.shape == (2, 32)
    assert w[:, 0].tolist() == [tok.bos_token_id] * 2
    assert w[0, 1:].tolist() == ids[:31] and w[1, 1:].tolist() == ids[31:62]
