"""Who runs a layer's three kernel entry points: the compiled kernels, or the PyTorch reference.

The impl calls the same three functions on every device, with the CUDA wrappers' signatures
(:mod:`kivi_serve.kernels.quantize_append`, :mod:`kivi_serve.kernels.decode_attention`):

- ``append(plan, key, value, kv_pages, staging)`` — execute the step's AppendPlan (padded op lists);
- ``decode(query, key, value, kv_pages, staging, block_tables, seq_lens, query_start_loc, tail_slots,
  scale, out)`` — attention of decode rows (one new token each; rows with another count are ignored);
  the impl calls it through ``decode_step(md, ...)``, which on the CPU checks and packs the step's
  metadata once for every layer (:class:`kivi_serve.kernels.cpu.DecodeBatch`, kept on the step's
  metadata) so that a layer's call passes only its own tensors;
- ``dequantize(kv_pages, blocks, dtype)`` — whole blocks to ``(n, Hkv, P, D)`` (prefill context).

Everything else of a step (planning, the split, prefill attention) is the same code on CPU and GPU.
:class:`KernelExecutor` runs 2-bit pages through compiled kernels: CuPy on a GPU (no host sync), the
C++ kernels of :mod:`kivi_serve.kernels.cpu` on the CPU (which fall back to the reference, after one
warning, where no compiler is found). :class:`TorchExecutor` is the PyTorch reference, for the debug
``fp_pages`` mode anywhere and for the 3/4-bit comparison schemes on the CPU; being host code it reads
its index tensors on the host (on a GPU that would sync: fp_pages is a debug mode).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kivi_serve.kernels import reference
from kivi_serve.kernels.semantics import LayerAttention
from kivi_serve.quant.codec import PageCodec, QuantCodec


def cuda_kernels() -> SimpleNamespace:
    """The CUDA kernels (``append_kv``, ``paged_attention``, ``dequantize_blocks``), imported lazily."""
    try:
        from kivi_serve.kernels import decode_attention, quantize_append
    except ImportError as e:
        raise RuntimeError(
            "kivi-serve: the KV cache is on a CUDA device but the CUDA kernels "
            "(kivi_serve.kernels.quantize_append / kivi_serve.kernels.decode_attention) cannot be imported "
            f"({e}). Install the GPU extra (pip install 'kivi-serve[gpu]') or run on CPU."
        ) from e
    return SimpleNamespace(
        append_kv=quantize_append.append_kv,
        paged_attention=decode_attention.paged_attention,
        dequantize_blocks=quantize_append.dequantize_blocks,
        # the layer semantics the decode kernel applies (its ``attn`` argument): no soft-cap
        attn_features=frozenset({"window", "sinks"}),
    )


def cpu_kernels():
    """The C++ CPU kernels (same three functions, on CPU tensors)."""
    from kivi_serve.kernels import cpu

    return cpu


class KernelExecutor:
    """2-bit pages through ``kernels`` (:func:`cuda_kernels` or :func:`cpu_kernels`).

    ``kernels.attn_features`` names the layer semantics its decode applies (the CUDA kernel: sliding
    window and sink logits; the C++ CPU kernel: none, the impl routes such layers to
    :class:`TorchExecutor` on CPU). A layer needing anything else (e.g. a soft-cap on CUDA) is
    refused here, so no path can drop it silently.
    """

    def __init__(self, codec: QuantCodec, kernels, attn: LayerAttention | None = None) -> None:
        if attn is not None and not attn.plain:
            have = getattr(kernels, "attn_features", frozenset())
            need = {"window": attn.window is not None, "softcap": attn.softcap is not None,
                    "sinks": attn.sinks is not None}  # fmt: skip
            missing = [name for name, used in need.items() if used and name not in have]
            if missing:
                raise ValueError(
                    f"kivi-serve: the compiled 2-bit kernels do not apply {' or '.join(missing)}; this "
                    f"layer has {attn.describe()} (on a GPU: run it with fp_pages)"
                )
        self.attn = attn if attn is not None and not attn.plain else None
        self.layout, self.codebook, self.kernels = codec.layout, codec.codebook, kernels
        #: The C++ kernels' once-per-step decode metadata (plain layers; None: per-call arguments)
        self._batch = getattr(kernels, "DecodeBatch", None) if self.attn is None else None

    def append(self, plan, key, value, kv_pages, staging) -> None:
        self.kernels.append_kv(plan, key, value, kv_pages, staging, self.layout, self.codebook)

    def decode(self, *args) -> None:
        *batch, scale, out = args  # query ... tail_slots, scale, out (the module docstring)
        if self.attn is None:
            self.kernels.paged_attention(*batch, self.layout, scale, out=out)
        else:
            self.kernels.paged_attention(*batch, self.layout, scale, self.attn, out=out)

    def decode_step(self, md, query, key, value, kv_pages, staging, scale, out) -> None:
        """The step's decode rows (``md.num_decodes`` first rows of ``query``/``key``/``value``/``out``,
        which may be row-strided views) for this layer. With the C++ kernels the step's metadata is
        checked and packed once, by the first layer that decodes, into ``md.decode_batch``; every
        layer's call then checks and passes only its own tensors. A batch whose metadata changed
        since it checked it (``md`` reused over in-place refreshed buffers, as a captured graph
        replays) is refused by the kernel before it reads anything, and made again here."""
        if self._batch is None:
            decode_rows(self.decode, md, query, key, value, kv_pages, staging, scale, out)
            return
        batch = md.decode_batch
        if batch is not None and batch.layout is self.layout:
            try:
                batch.attend(query, key, value, kv_pages, staging, scale, out)
                return
            except self.kernels.StaleMetadata:
                pass  # the step's buffers were refreshed in place (metadata reused as by a graph replay)
        batch = md.decode_batch = self._batch(*decode_metadata(md), self.layout, kv_pages, staging)
        batch.attend(query, key, value, kv_pages, staging, scale, out)

    def dequantize(self, kv_pages, blocks, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels.dequantize_blocks(kv_pages, blocks, self.layout, dtype)


def dense(x: torch.Tensor) -> torch.Tensor:
    """``x``, or a contiguous copy of it."""
    return x if x.is_contiguous() else x.contiguous()


def decode_metadata(md) -> tuple:
    """The step's metadata of its ``md.num_decodes`` decode rows (the first ones): ``(block_table,
    seq_lens, query_start_loc, tail_slots)`` sliced to them, views."""
    nd = md.num_decodes
    return md.block_table[:nd], md.seq_lens[:nd], md.query_start_loc[: nd + 1], md.tail_slots[:nd]


def decode_rows(decode, md, query, key, value, kv_pages, staging, scale, out) -> None:
    """``decode`` (an executor's, module docstring) of the step's ``md.num_decodes`` decode rows, with
    the step's metadata sliced to them and dense copies of strided inputs."""
    nd = md.num_decodes
    decode(
        dense(query[:nd]), dense(key[:nd]), dense(value[:nd]), kv_pages, staging, *decode_metadata(md), scale,
        out[:nd],
    )  # fmt: skip


class TorchExecutor:
    """:mod:`kivi_serve.kernels.reference` itself, with the page codec as a parameter (so the
    full-precision debug pages run through the very same steps as the quantized formats)."""

    def __init__(self, codec: PageCodec, attn: LayerAttention | None = None) -> None:
        self.codec, self.attn = codec, attn  # attn: the layer's window, soft-cap, sinks (None: plain)

    def append(self, plan, key, value, kv_pages, staging) -> None:
        reference.append_kv(plan, key, value, kv_pages, staging, self.codec)

    def decode(self, *args) -> None:
        *batch, scale, out = args
        reference.decode_rows(*batch, self.codec, scale, out, self.attn)

    def decode_step(self, md, query, key, value, kv_pages, staging, scale, out) -> None:
        decode_rows(self.decode, md, query, key, value, kv_pages, staging, scale, out)

    def dequantize(self, kv_pages, blocks, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return reference.dequantize_blocks(kv_pages, blocks, self.codec, dtype)
