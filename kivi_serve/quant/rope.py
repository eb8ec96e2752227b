"""Rotary position embedding (RoPE) of cached keys, for pages that store keys *before* RoPE.

vLLM hands the attention backend keys after RoPE. A RoPE pair ``(d, d + D/2)`` (the rotate-half
convention of Llama, Qwen, Mistral) turns by ``position * inv_freq[d]``: within a 128- or 256-token
page the fast pairs turn many times, so each channel of the page sweeps ``±|pair|`` and the per-channel
range that 2-bit codes divide is set by the rotation, not by the key. Un-rotated (pre-RoPE) keys keep
their few large channels large with one sign, so the per-channel ranges shrink (KVQuant's
observation; the foundation issue's simulation found it too). A pre-RoPE page is quantized from
``rotate(k, positions, rope, inverse=True)`` and read back as ``rotate(k_hat, positions, rope)``.

The angles are computed in fp64 (``position * inv_freq`` reaches ~1e4 radians at 8K tokens), the
rotation is applied in fp64 and returned as fp32, so ``rotate(rotate(k), inverse=True)`` is ``k`` to
fp32 rounding. The model's own rotation rounds its angles (fp32 in transformers, ~1e-3 rad at 8K
positions; vLLM caches cos/sin in the model dtype): un-rotating its keys is exact to that rounding,
orders of magnitude below a 2-bit code's error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rope:
    """The rotation a model applies to its keys.

    inv_freq : tuple of float
        ``D/2`` angular frequencies (radians per position) of the pairs ``(d, d + D/2)``, as the model
        computes them (``rope_theta ** (-2d / D)``, times any position-independent scaling the rope
        type applies to the frequencies).
    """

    inv_freq: tuple[float, ...]

    @property
    def head_dim(self) -> int:
        return 2 * len(self.inv_freq)

    @classmethod
    def from_inv_freq(cls, inv_freq: torch.Tensor) -> Rope:
        return cls(tuple(float(f) for f in inv_freq.double().flatten().tolist()))

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> Rope:
        """The rotation of a transformers decoder whose layers all share one rotary embedding.

        ``ValueError`` (naming what is missing) for a model this module cannot invert exactly: no
        rotary embedding, more than one (per-layer ropes, e.g. Gemma 3's local and global layers),
        a rope type whose frequencies depend on the sequence length (``dynamic``), or an attention
        scaling other than 1 (YaRN scales cos and sin: the key is then not only rotated).
        """
        mods = [m for n, m in model.named_modules() if n.split(".")[-1].startswith("rotary_emb")]
        if len(mods) != 1 or not hasattr(mods[0], "inv_freq"):
            raise ValueError(f"pre-RoPE keys need one rotary embedding shared by every layer; the model has "
                             f"{len(mods)} rotary embedding module(s)")
        rot = mods[0]
        kind = getattr(rot, "rope_type", "default")
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(f"pre-RoPE keys support the rope types default, linear and llama3, not {kind!r}")
        if float(getattr(rot, "attention_scaling", 1.0)) != 1.0:
            raise ValueError("pre-RoPE keys need attention_scaling 1 (a scaled rope is not a pure rotation)")
        return cls.from_inv_freq(rot.inv_freq)


def rotate(x: torch.Tensor, positions: torch.Tensor, rope: Rope, inverse: bool = False) -> torch.Tensor:
    """Apply RoPE (``inverse``: undo it) to keys ``x`` at ``positions``.

    x : (..., D) float with ``D == rope.head_dim``; positions : integer, broadcastable to ``x.shape[:-1]``
    → (..., D) fp32. Pair ``(d, d + D/2)`` turns by ``positions * inv_freq[d]`` (``-`` for ``inverse``).
    """
    D = x.shape[-1]
    if D != rope.head_dim:
        raise ValueError(f"rope covers head_dim {rope.head_dim}, keys have head_dim {D}")
    if positions.is_floating_point():
        raise ValueError(f"positions must be integers, got {positions.dtype}")
    freq = torch.tensor(rope.inv_freq, dtype=torch.float64, device=x.device)
    angle = positions.to(x.device, torch.float64).unsqueeze(-1) * freq  # (..., D/2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    if inverse:
        sin = -sin
    h = D // 2
    xd = x.double()
    x1, x2 = xd[..., :h], xd[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).float()


def page_positions(page_index: torch.Tensor, page_size: int) -> torch.Tensor:
    """Token positions of pages: the page that is ``page_index`` -th in its sequence holds positions
    ``page_index * P + t``. page_index : (n,) integer → (n, P) int64."""
    idx = torch.as_tensor(page_index, dtype=torch.long)
    return idx.view(-1, 1) * page_size + torch.arange(page_size, device=idx.device).view(1, -1)
