"""vLLM serves ``kivi-serve-2bit-p256-vr`` (values quantized rotated, free V codebook ends) on the CPU,
checked as tests/test_backend_engine.py checks the default format: every page the request fills is,
byte for byte, the reference encoding of the tokens vLLM handed the backend, and the engine's greedy
tokens and log-probabilities agree with the standalone oracle (transformers over the reference's
pages of the same scheme) within that module's ``LOGPROB_NATS`` / ``TIE_NATS``. The C++ kernels
append, finalise and decode; the prefill of the second prompt reads the first's page through them.

One engine (256-token pages, ``KIVI_SERVE_SCHEME``), two short requests: the suite's time stays small.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from support import engines as T  # noqa: E402
from test_backend_engine import assert_agrees, generate  # noqa: E402

from kivi_serve.quant.schemes import get_scheme  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SCHEME = "kivi-serve-2bit-p256-vr"
P = 256


@pytest.fixture(scope="module")
def llm(model):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KIVI_SERVE_SCHEME", SCHEME)  # the settings' environment layer (engine_overrides sets none)
        engine = T.make_llm(model, "kivi", page_size=P, dtype="float32", max_num_seqs=4, max_model_len=1024,
                            max_num_batched_tokens=512, enable_prefix_caching=False)  # fmt: skip
        yield engine
        T.shutdown(engine)


@pytest.fixture(scope="module")
def runner(model):
    from support.standalone import StandaloneRunner

    return StandaloneRunner(
        model, page_size=P, num_blocks=16, staging_slots=2, dtype=torch.float32, scheme=SCHEME
    )


def test_rotated_value_pages_served_as_the_reference_encodes_and_reads_them(llm, runner, tok):
    layers = T.attention_layers(llm)
    layout = get_scheme(SCHEME).layout(64, P)
    assert {layer.impl.codec.layout for layer in layers.values()} == {layout}  # v_rotate, free V ends
    # 300 + 6: page 0 finalised from the input at prefill, decode reads it through the C++ kernel;
    # 250 + 10: page 0 fills during decode, finalised from its staging slot + the new token
    first, second = T.prompt_windows(tok, [300])[0], T.prompt_windows(tok, [250], offset=300)[0]
    for prompt, n in ((first, 6), (second, 10)):
        tokens, logprobs, cap = generate(llm, prompt, n)
        assert cap.check_pages() == 30  # page 0 of each of the 30 layers, byte for byte
        assert_agrees(runner, prompt, tokens, logprobs)
    assert T.staging_report(llm)["kernels"] == ["kivi_serve.kernels.cpu"]  # the C++ kernels, every layer
