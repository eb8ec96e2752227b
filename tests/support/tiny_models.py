"""Tiny random-init models of the architectures kivi-serve serves, built on the fly (no download).

Each is saved (float32 weights) with the embedded SmolLM2 tokenizer, whose vocabulary the configs use.
Small on purpose: a vLLM engine on CPU starts in seconds, and a prompt of a few hundred tokens crosses
their sliding windows at a page size of 64.

- ``gemma3``: Gemma 3 text model, head_dim 256, 3 sliding-window (96 tokens) + 1 full-attention
  layers, ``query_pre_attn_scalar`` 64 (softmax scale 1/8, not head_dim ** -0.5), 2 query / 1 KV head;
- ``gpt_oss``: gpt-oss, learned sink logits on every layer, sliding window 96 on every other one,
  head_dim 64, 4 experts;
- ``qwen2``: a plain full-attention control.
"""

from __future__ import annotations

from pathlib import Path

WINDOW = 96


def configs(vocab: int) -> dict:
    import transformers

    common = dict(vocab_size=vocab, max_position_embeddings=2048, pad_token_id=0, tie_word_embeddings=True)
    return {
        "gemma3": (
            transformers.Gemma3TextConfig(
                hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, head_dim=256, sliding_window=WINDOW, query_pre_attn_scalar=64,
                layer_types=["sliding_attention"] * 3 + ["full_attention"], **common,
            ),
            transformers.Gemma3ForCausalLM,
        ),
        "gpt_oss": (
            transformers.GptOssConfig(
                hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, sliding_window=WINDOW, num_local_experts=4,
                num_experts_per_tok=2, rope_scaling=None, **{**common, "tie_word_embeddings": False},
            ),  # untied like the real gpt-oss: vLLM's GptOssForCausalLM never ties, so a tied
            transformers.GptOssForCausalLM,  # checkpoint (no lm_head) would leave its lm_head uninitialised
        ),
        "qwen2": (
            transformers.Qwen2Config(
                hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, **common,
            ),
            transformers.Qwen2ForCausalLM,
        ),
    }  # fmt: skip


def build(name: str, folder: Path, tokenizer_dir: str | Path, seed: int = 0) -> Path:
    """Save the tiny ``name`` model (random weights from ``seed``) with the tokenizer of ``tokenizer_dir``."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config, cls = configs(len(tok))[name]
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    if name == "gpt_oss":  # sinks start at zero: make them matter
        for layer in model.model.layers:
            layer.self_attn.sinks.data.normal_(0.0, 2.0)
    folder = Path(folder) / name
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
