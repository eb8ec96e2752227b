"""Can kivi-serve serve this model? Decided from the model's config alone, before any engine starts.

vLLM builds the attention layers only after it has started its engine core (and, with
multiprocessing, its workers), so a layer the backend refuses there surfaces as a worker traceback
ending in "Engine core initialization failed". :func:`check_model` reads the same facts from the
transformers config first and answers in one line: the unsupported feature and the model's layer
kinds. ``kivi-serve check --model PATH`` prints it; ``kivi-serve serve`` runs it before the port
opens and exits with code 2 when something is unsupported.

What the backend supports (the impl's own check, ``backend.attention.unsupported_reasons``, stays
the authority once the engine runs; this module mirrors it for the features a config declares):

- decoder-only attention with head_dim 64, 128 or 256, one head_dim and KV head count for all layers;
- full-attention and sliding-window layers (vLLM puts them in separate KV-cache groups and frees the
  pages that fall wholly out of the window), learned attention sinks (gpt-oss), a custom softmax scale
  (``query_pre_attn_scalar``) and logit soft-capping — on the PyTorch executor (CPU, and the fp_pages
  debug pages). The CUDA 2-bit decode kernel applies windows and sinks, not the soft-cap.

No torch, transformers or vLLM import at module level.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kivi_serve.model.prepare import ModelError
from kivi_serve.quant.layout import SUPPORTED_HEAD_DIMS

#: ``layer_types`` entries of transformers configs that are softmax attention over the KV cache.
FULL = "full_attention"
SLIDING = "sliding_attention"
ATTENTION_KINDS = (FULL, SLIDING)
#: Model types whose attention layers carry learned sink logits (no config flag says so).
SINK_MODEL_TYPES = ("gpt_oss",)


class UnsupportedModel(ModelError):
    """A model kivi-serve cannot serve; ``str()`` is the one line to show the user."""


@dataclass
class ModelSupport:
    """What :func:`check_model` found.

    layer_kinds : ``{"full_attention": 3, "sliding_attention(512)": 15, ...}`` in layer order of first
        appearance. problems : why it cannot be served (empty: it can).
    """

    model_type: str
    head_dim: int | None
    num_layers: int
    layer_kinds: dict[str, int]
    sliding_window: int | None = None
    sinks: bool = False
    softcap: float | None = None
    scale: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def kinds_text(self) -> str:
        return " + ".join(f"{n} {kind}" for kind, n in self.layer_kinds.items()) or "no attention layers"

    def describe(self) -> str:
        """One line: the model, its layer kinds, head_dim, and the verdict."""
        extras = []
        if self.sinks:
            extras.append("attention sinks")
        if self.softcap:
            extras.append(f"soft-cap {self.softcap:g}")
        if self.scale is not None:
            extras.append(f"scale {self.scale:.6g}")
        extra = f", {', '.join(extras)}" if extras else ""
        head = f"{self.model_type}: {self.num_layers} layers ({self.kinds_text()}), head_dim {self.head_dim}"
        head += extra
        if self.ok:
            return f"{head}: supported"
        return f"{head}: not supported: {'; '.join(self.problems)}"

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        problems = out.pop("problems")
        return out | {"supported": self.ok, "problems": problems}


def load_config(model: str | Path) -> dict[str, Any]:
    """The text model's config of a local folder as a plain dict (``config.json``; for multimodal
    configs, their ``text_config``)."""
    path = Path(model).expanduser()
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a transformers/vLLM model folder")
    cfg = json.loads(cfg_file.read_text())
    text = cfg.get("text_config")
    if isinstance(text, dict):
        merged = dict(text)
        merged.setdefault("model_type", cfg.get("model_type", ""))
        merged["_outer_model_type"] = cfg.get("model_type", "")
        merged["is_encoder_decoder"] = cfg.get("is_encoder_decoder", False)
        return merged
    return cfg


def layer_types(cfg: dict[str, Any]) -> list[str]:
    """Every decoder layer's kind, as transformers names them (``full_attention``, ``sliding_attention``,
    ``linear_attention``, ``mamba``, ...)."""
    n = int(cfg.get("num_hidden_layers") or 0)
    kinds = cfg.get("layer_types")
    if isinstance(kinds, list) and kinds:
        return [str(k) for k in kinds]
    block_types = cfg.get("layers_block_type") or cfg.get("hybrid_override_pattern")
    if isinstance(block_types, list) and block_types:
        return [FULL if str(k) in ("attention", "*") else str(k) for k in block_types]
    if "mamba" in str(cfg.get("model_type", "")):
        return ["mamba"] * n
    window = cfg.get("sliding_window")
    uses_window = window and cfg.get("use_sliding_window", True)
    if uses_window:
        first_full = cfg.get("max_window_layers")  # Qwen2-style: layers >= max_window_layers slide
        if cfg.get("use_sliding_window") is not None and first_full is not None:
            return [SLIDING if i >= int(first_full) else FULL for i in range(n)]
        return [SLIDING] * n
    return [FULL] * n


def head_dim_of(cfg: dict[str, Any]) -> int | None:
    hd = cfg.get("head_dim")
    if hd:
        return int(hd)
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    return int(hidden) // int(heads) if heads and hidden else None


def check_config(cfg: dict[str, Any], *, cuda: bool = False) -> ModelSupport:
    """Check a config dict (see :func:`load_config`). ``cuda``: the model would run on the CUDA
    2-bit kernels (which do full attention only), else on the PyTorch executor (CPU)."""
    model_type = str(cfg.get("model_type", "unknown"))
    kinds = layer_types(cfg)
    window = cfg.get("sliding_window")
    window = int(window) if window and SLIDING in kinds else None
    named = [f"sliding_attention({window})" if k == SLIDING else k for k in kinds]
    head_dim = head_dim_of(cfg)
    sinks = model_type in SINK_MODEL_TYPES
    softcap = cfg.get("attn_logit_softcapping") or None
    scalar = cfg.get("query_pre_attn_scalar")
    scale = float(scalar) ** -0.5 if scalar and head_dim and float(scalar) != head_dim else None
    out = ModelSupport(
        model_type=model_type,
        head_dim=head_dim,
        num_layers=len(kinds),
        layer_kinds=dict(Counter(named)),
        sliding_window=window,
        sinks=sinks,
        softcap=float(softcap) if softcap else None,
        scale=scale,
    )
    r = out.problems
    if cfg.get("is_encoder_decoder"):
        r.append("encoder-decoder models are not supported (kivi-serve serves decoder-only models)")
    other = sorted({k for k in kinds if k not in ATTENTION_KINDS})
    if other:
        r.append(
            f"layer kind {', '.join(other)} is not supported (kivi-serve pages hold softmax-attention "
            "KV only: full_attention and sliding_attention layers)"
        )
    if head_dim is not None and head_dim not in SUPPORTED_HEAD_DIMS:
        r.append(
            f"head_dim {head_dim} is not supported (kivi-serve pages support head_dim "
            f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))})"
        )
    for key, what in (
        ("global_head_dim", "a second head_dim for global layers"),
        ("num_global_key_value_heads", "a second KV head count for global layers"),
    ):
        if cfg.get(key) and cfg.get(key) not in (head_dim, cfg.get("num_key_value_heads")):
            r.append(f"{what} ({key} {cfg[key]}) is not supported: layers must share head_dim and KV heads")
    if cfg.get("kv_lora_rank"):
        r.append("MLA (multi-head latent attention) is not supported")
    if cfg.get("num_kv_shared_layers"):
        r.append("cross-layer KV sharing is not supported")
    if cfg.get("attention_chunk_size"):
        r.append("chunked local attention is not supported")
    if cfg.get("alibi") or cfg.get("position_embedding_type") == "alibi" or model_type == "bloom":
        r.append("ALiBi position biases are not supported")
    if cfg.get("is_causal") is False or cfg.get("use_bidirectional_attention"):
        r.append("non-causal (bidirectional) attention is not supported")
    if cuda:
        # the CUDA decode kernel applies sliding windows and sink logits, not the soft-cap
        if out.softcap:
            r.append("logit soft-capping is not supported by the CUDA 2-bit kernels yet (CPU only)")
    return out


def check_model(model: str | Path, *, cuda: bool | None = None) -> ModelSupport:
    """:func:`check_config` of a local model folder; ``cuda=None``: whether torch sees a GPU."""
    cfg = load_config(model)
    if cuda is None:
        cuda = cuda_available()
    return check_config(cfg, cuda=cuda)


def require_supported(model: str | Path, *, cuda: bool | None = None) -> ModelSupport:
    """:func:`check_model`, raising :class:`UnsupportedModel` (one line) when the model cannot be served."""
    support = check_model(model, cuda=cuda)
    if not support.ok:
        raise UnsupportedModel(
            f"kivi-serve cannot serve {Path(model).name}: {'; '.join(support.problems)} "
            f"(layers: {support.kinds_text()}; head_dim {support.head_dim})"
        )
    return support


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
