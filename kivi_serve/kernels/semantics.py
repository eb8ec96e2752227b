"""A layer's attention semantics beyond causal softmax: sliding window, logit soft-cap, sink logits.

One object, :class:`LayerAttention`, carries them from the model (vLLM's impl arguments, or the
transformers config in the accuracy harness) to every place that computes attention: the reference
(:mod:`kivi_serve.kernels.reference`), the CPU executor's batched decode, the backend's prefill path
and the harness. The definitions, as vLLM and transformers use them:

- **window** ``W``: a query at position ``t`` sees the keys at ``s`` with ``t - W < s <= t``
  (``W`` tokens, itself included; FlashAttention's ``window_size=(W - 1, 0)``, transformers'
  ``sliding_window``). vLLM frees the pages wholly before ``t - W + 1`` for the earliest query of a
  step (:func:`first_visible`), so nothing there may be read.
- **softcap** ``c``: scores become ``c * tanh(score / c)`` after scaling (Gemma 2).
- **sinks**: one learned logit per query head (gpt-oss) that joins the softmax's denominator and
  carries no value: ``p_s = exp(score_s) / (exp(sink) + sum_s' exp(score_s'))``.
- **scale**: the softmax scale (``query_pre_attn_scalar ** -0.5`` for Gemma); ``None`` means
  ``head_dim ** -0.5``. vLLM hands the scale to the backend separately, so the backend's kernels keep
  their ``scale`` argument and only the harness reads this field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LayerAttention:
    """Per-layer attention semantics (plain causal attention when every field is ``None``).

    sinks : torch.Tensor, shape (Hq,), optional — the layer's sink logits (the model's parameter
        itself: vLLM fills it when it loads the weights, after the layer is built).
    """

    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = field(default=None, compare=False, hash=False)
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ValueError(f"sliding window must be >= 1 token, got {self.window}")
        if self.softcap is not None and self.softcap <= 0:
            raise ValueError(f"logit soft-cap must be > 0, got {self.softcap}")

    @property
    def plain(self) -> bool:
        """No window, soft-cap or sinks: full causal softmax attention."""
        return self.window is None and self.softcap is None and self.sinks is None

    def describe(self) -> str:
        parts = [f"window {self.window}" if self.window else "full"]
        if self.softcap:
            parts.append(f"soft-cap {self.softcap:g}")
        if self.sinks is not None:
            parts.append("sinks")
        return ", ".join(parts)


def first_visible(attn: LayerAttention | None, t: int) -> int:
    """The first key position a query at ``t`` sees (0 without a window)."""
    if attn is None or attn.window is None:
        return 0
    return max(0, t - attn.window + 1)


def visible(attn: LayerAttention | None, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Which keys each query sees: bool ``(n, m)`` for query positions ``(n,)`` and key positions ``(m,)``."""
    q, k = q_pos.unsqueeze(1), k_pos.unsqueeze(0)
    ok = k <= q
    if attn is not None and attn.window is not None:
        ok = ok & (q - k < attn.window)
    return ok


def cap_scores(attn: LayerAttention | None, s: torch.Tensor) -> torch.Tensor:
    """Soft-capped scores (``s`` already scaled); ``s`` itself without a soft-cap."""
    if attn is None or attn.softcap is None:
        return s
    c = float(attn.softcap)
    return torch.tanh(s / c) * c


def softmax(attn: LayerAttention | None, s: torch.Tensor, sink: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last dim of masked scores, with the sink logit in the denominator.

    s : (..., L) fp32, masked entries ``-inf`` · sink : broadcastable to ``s.shape[:-1]`` (the layer's
    sinks arranged like ``s``'s query-head dims by the caller), used only if ``attn`` has sinks.
    """
    if attn is None or attn.sinks is None or sink is None:
        return torch.softmax(s, dim=-1)
    col = sink.to(s.dtype).expand(s.shape[:-1]).unsqueeze(-1)
    return torch.softmax(torch.cat([s, col], -1), dim=-1)[..., :-1]
