"""Who runs a layer's three kernel entry points: the CUDA kernels, or the PyTorch executor.

The impl calls the same three functions on every device, with the CUDA wrappers' signatures
(:mod:`kivi_serve.kernels.quantize_append`, :mod:`kivi_serve.kernels.decode_attention`):

- ``append(plan, key, value, kv_pages, staging)`` — execute the step's AppendPlan (padded op lists);
- ``decode(query, key, value, kv_pages, staging, block_tables, seq_lens, query_start_loc, tail_slots,
  scale, out)`` — attention of decode rows (one new token each; rows with another count are ignored);
- ``dequantize(kv_pages, blocks, dtype)`` — whole blocks to ``(n, Hkv, P, D)`` (prefill context).

Everything else of a step (planning, the split, prefill attention) is the same code on CPU and GPU.
:class:`CudaExecutor` launches CuPy kernels (no host sync). :class:`TorchExecutor` is the PyTorch
executor of :mod:`kivi_serve.backend.ops` — the CPU path until the C++ CPU kernels land, and the
debug ``fp_pages`` mode anywhere; being host code on CPU it reads its index tensors on the host (on
a GPU that would sync: fp_pages is a debug mode).
"""

from __future__ import annotations

import torch

from kivi_serve.backend import ops
from kivi_serve.kernels.semantics import LayerAttention
from kivi_serve.quant.codec import PageCodec, QuantCodec


def cuda_kernels():
    """The CUDA kernel modules (``quantize_append``, ``decode_attention``), imported lazily."""
    try:
        from kivi_serve.kernels import decode_attention, quantize_append
    except ImportError as e:
        raise RuntimeError(
            "kivi-serve: the KV cache is on a CUDA device but the CUDA kernels "
            "(kivi_serve.kernels.quantize_append / kivi_serve.kernels.decode_attention) cannot be imported "
            f"({e}). Install the GPU extra (pip install 'kivi-serve[gpu]') or run on CPU."
        ) from e
    return quantize_append, decode_attention


class CudaExecutor:
    """2-bit pages on a CUDA device: the CuPy kernels, launched on torch's current stream.

    The decode kernel does plain causal attention: no sliding window, soft-cap or sink logits (the
    impl refuses such layers on CUDA; ``attn`` is checked here too so no path can skip them silently).
    """

    def __init__(self, codec: QuantCodec, attn: LayerAttention | None = None) -> None:
        if attn is not None and not attn.plain:
            raise ValueError(
                f"kivi-serve: the CUDA 2-bit kernels do plain causal attention only; this layer has "
                f"{attn.describe()} (run it on CPU, or with fp_pages)"
            )
        self.layout, self.codebook = codec.layout, codec.codebook
        self.quantize_append, self.decode_attention = cuda_kernels()

    def append(self, plan, key, value, kv_pages, staging) -> None:
        self.quantize_append.append_kv(plan, key, value, kv_pages, staging, self.layout, self.codebook)

    def decode(
        self, query, key, value, kv_pages, staging, block_tables, seq_lens, qsl, tail_slots, scale, out
    ):
        self.decode_attention.paged_attention(
            query,
            key,
            value,
            kv_pages,
            staging,
            block_tables,
            seq_lens,
            qsl,
            tail_slots,
            self.layout,
            scale,
            out=out,
        )

    def dequantize(self, kv_pages, blocks, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantize_append.dequantize_blocks(kv_pages, blocks, self.layout, dtype)


class TorchExecutor:
    """The PyTorch executor: :mod:`kivi_serve.kernels.reference` plus a decoded-page cache.

    ``cache`` (a :class:`~kivi_serve.backend.ops.DequantCache`, CPU) and ``workspace`` are the layer's;
    ``cache`` may be None (no cache: exactly the reference's operations). ``attn``: the layer's sliding
    window, soft-cap and sink logits (None: plain causal attention).
    """

    def __init__(
        self,
        codec: PageCodec,
        cache: ops.DequantCache | None,
        workspace: ops.Workspace | None,
        attn: LayerAttention | None = None,
    ) -> None:
        self.codec, self.cache, self.workspace, self.attn = codec, cache, workspace, attn

    def append(self, plan, key, value, kv_pages, staging) -> None:
        ops.append(plan, key, value, kv_pages, staging, self.codec, self.cache)

    def decode(
        self, query, key, value, kv_pages, staging, block_tables, seq_lens, qsl, tail_slots, scale, out
    ):
        starts = qsl.tolist()
        rows = [b for b in range(len(starts) - 1) if starts[b + 1] - starts[b] == 1]
        if not rows:
            return
        tables, lens, tails = block_tables.tolist(), seq_lens.tolist(), tail_slots.tolist()
        idx = torch.tensor([starts[b] for b in rows], dtype=torch.long, device=query.device)
        res = ops.attend(
            query[idx],
            key[idx],
            value[idx],
            kv_pages,
            staging,
            [tables[b] for b in rows],
            [lens[b] for b in rows],
            list(range(len(rows) + 1)),
            [tails[b] for b in rows],
            self.codec,
            scale,
            self.cache,
            self.workspace,
            self.attn,
        )
        out[idx] = res.to(out.dtype)

    def dequantize(self, kv_pages, blocks, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.dequantize_blocks(kv_pages, blocks, self.codec, dtype, self.cache)
