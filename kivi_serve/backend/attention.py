"""The vLLM attention backend: ``KiviAttentionBackend`` (static facts), ``KiviMetadataBuilder``
(once per step: all of the step's planning) and ``KiviAttentionImpl`` (per layer: launches only).

What vLLM 0.32 calls, and when (see docs/design.md for the whole picture):

- model construction: ``get_impl_cls()(...)`` once per attention layer → :class:`KiviAttentionImpl`
  validates the layer, allocates its staging tensor and takes its bytes out of an explicit KV budget;
- ``get_kv_cache_spec``: :meth:`KiviAttentionBackend.customize_spec` → uint8, ``C`` bytes per slot;
- KV cache allocation: one uint8 ``[blocks, kv_heads, P, C]`` view per layer (layout LBHNC);
- every step: :meth:`KiviMetadataBuilder.build` once per KV-cache group — the decode/prefill split,
  the staging pool (on the device), the prefill context pages — then per layer
  ``do_kv_cache_update`` (one append) and ``forward`` (one decode launch, one prefill path).
  ``build()`` and ``forward()`` never read a device tensor on the host, so decode steps can run as
  CUDA graphs (``UNIFORM_SINGLE_TOKEN_DECODE``). ``attn_metadata`` is ``None`` in profiling /
  warm-up runs: nothing is written then.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.platforms import current_platform
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout, SlidingWindowSpec

from kivi_serve.backend import prefill_cpu
from kivi_serve.backend.executors import KernelExecutor, TorchExecutor, cpu_kernels, cuda_kernels, dense
from kivi_serve.backend.planner import NULL_BLOCK, StepPages, step_pages
from kivi_serve.backend.runtime import KiviRuntime, runtime_for, sizing_settings
from kivi_serve.backend.settings import KiviSettings, settings_from
from kivi_serve.backend.staging import AppendPlan
from kivi_serve.kernels import loader, reference, semantics
from kivi_serve.kernels.semantics import LayerAttention
from kivi_serve.quant.codec import QuantCodec, make_codec
from kivi_serve.quant.layout import SUPPORTED_HEAD_DIMS
from kivi_serve.quant.schemes import DEFAULT_SCHEME, get_scheme
from kivi_serve.quant.staging import read_rows

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
#: The CPU executor is plain PyTorch: it also runs float32 models (CI uses them: on CPUs without
#: AVX512-BF16, bf16 matmuls are many times slower, and fp32 makes engine-vs-reference runs agree).
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Page sizes the CUDA kernels are built for (:data:`kivi_serve.kernels.loader.PAGE_SIZES`).
CUDA_PAGE_SIZES = loader.PAGE_SIZES
#: The 2-bit decode kernel needs mma.m16n8k16 (Ampere or newer).
MIN_CUDA_CAPABILITY = (8, 0)


def current_settings() -> KiviSettings:
    """Settings of the engine being built or run in this process.

    The current vLLM config when one is set. vLLM calls ``customize_spec`` (and
    ``get_supported_kernel_block_sizes``) outside any config context, while it sizes an engine's KV
    cache: then the settings of that engine (:func:`~kivi_serve.backend.runtime.sizing_settings`,
    which refuses to guess between engines with different settings); else environment and defaults.
    """
    cfg = get_current_vllm_config_or_none()
    if cfg is not None and cfg.model_config is not None:
        return settings_from(cfg.additional_config)
    settings = sizing_settings()
    return settings if settings is not None else settings_from(None)


#: Layer features kivi-serve refuses (keywords of :func:`unsupported_reasons`, vLLM's selector flags
#: among them), with the reason it gives.
_REFUSED = {
    "use_mla": "MLA (multi-head latent attention) is not supported",
    "use_sparse": "sparse attention is not supported",
    "use_non_causal": "non-causal (bidirectional) attention is not supported",
    "use_mm_prefix": "non-causal (bidirectional) attention is not supported",
    "use_alibi": "ALiBi position biases are not supported",
    "kv_sharing": "cross-layer KV sharing is not supported",
    "use_per_head_quant_scales": "per-head KV quantization scales are not supported",
    "use_batch_invariant": "batch-invariant mode is not supported",
    "use_kv_connector": "KV transfer connectors are not supported (the page format is kivi-serve's own)",
    "use_pcp": "context parallelism (PCP/DCP) is not supported",
    "use_dcp": "context parallelism (PCP/DCP) is not supported",
    "use_rswa": "R-SWA attention is not supported",
    "use_adaptive_verification": "speculative decoding with adaptive verification is not supported",
}
#: Features every executor takes: windows and sinks (the soft-cap everywhere but the CUDA kernels).
_TAKEN = ("has_sink", "has_sliding_window", "use_softcap")


def unsupported_reasons(
    head_size: int,
    dtype: torch.dtype,
    kv_cache_dtype: str | None,
    block_size: int | None,
    page_size: int,
    *,
    scheme: str = DEFAULT_SCHEME,
    attn_type: str = AttentionType.DECODER,
    device_capability=None,
    query_group: int | None = None,
    **features: bool,
) -> list[str]:
    """Why kivi-serve cannot run a layer, as sentences a user can act on (empty: it can).

    ``features``: the flags of :data:`_REFUSED` and :data:`_TAKEN` (default False); any other is a
    TypeError. ``device_capability``: given when the layer runs on the CUDA 2-bit kernels;
    ``query_group``: query heads per KV head, when known (:func:`cuda_kernel_reasons`)."""
    unknown = set(features) - set(_REFUSED) - set(_TAKEN)
    if unknown:
        raise TypeError(f"unsupported_reasons() got unexpected keyword arguments {sorted(unknown)}")
    r: list[str] = []
    if head_size not in SUPPORTED_HEAD_DIMS:
        r.append(
            f"head_dim {head_size} is not supported (kivi-serve pages support head_dim "
            f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))})"
        )
    on_cpu = current_platform.is_cpu()
    if dtype not in (CPU_DTYPES if on_cpu else SUPPORTED_DTYPES):
        r.append(
            f"model dtype {str(dtype).replace('torch.', '')} is not supported (run the model in "
            f"bfloat16 or float16{' (or float32 on CPU)' if on_cpu else ''}: --dtype bfloat16)"
        )
    if kv_cache_dtype not in (None, "auto"):
        r.append(
            f"kv_cache_dtype {kv_cache_dtype!r} is not supported: kivi-serve stores its own 2-bit "
            "page format; leave kv_cache_dtype at 'auto'"
        )
    if block_size is not None and block_size != page_size:
        r.append(
            f"block size {block_size} does not match the kivi-serve page size {page_size} "
            f"(set --block-size {page_size}, or choose the page size with the kivi-serve settings)"
        )
    if attn_type != AttentionType.DECODER:
        r.append(
            f"attention type {attn_type!r} is not supported: kivi-serve serves decoder-only "
            "models (no encoder or cross attention)"
        )
    r += list(dict.fromkeys(why for flag, why in _REFUSED.items() if features.get(flag)))  # each once
    # The PyTorch executor (CPU, fp_pages) does windows, sinks and soft-cap; the CUDA 2-bit decode
    # kernel (``device_capability`` given) does windows and sinks, not the soft-cap.
    if features.get("use_softcap") and device_capability is not None:
        cuda = "the CUDA 2-bit kernels yet (run on CPU, or with fp_pages)"
        r.append(f"logits soft-capping is not supported by {cuda}")
    if device_capability is not None:
        r += cuda_kernel_reasons(head_size, dtype, page_size, scheme, tuple(device_capability), query_group)
    return r


def cuda_kernel_reasons(
    head_size: int,
    dtype: torch.dtype,
    page_size: int,
    scheme: str,
    device_capability: tuple[int, int],
    query_group: int | None = None,
) -> list[str]:
    """Why the CUDA 2-bit kernels cannot store and read ``scheme``'s pages of one layer on a GPU of
    compute capability ``device_capability`` ``(major, minor)`` (empty: they can). Decided from the
    kernels' own configuration checks (:class:`~kivi_serve.kernels.loader.KernelSpec`, which refuses
    what no GPU can hold, and :meth:`~kivi_serve.kernels.loader.KernelSpec.check_arch`, what this GPU's
    shared memory cannot: :func:`~kivi_serve.kernels.loader.smem_bytes` against
    :func:`~kivi_serve.kernels.loader.smem_optin`), without a GPU, so that a layer is refused when the
    engine is built rather than at its first launch. Head sizes and dtypes the pages do not support are
    :func:`unsupported_reasons`' to report; here they stand in as 128 and bfloat16.

    ``query_group``: query heads per KV head. The decode kernel launches its 16-row build above 8
    (:func:`kivi_serve.kernels.decode_attention.decode`), whose shared memory differs from the 8-row
    one (larger or smaller); that build is checked. Unknown (vLLM's selector check): refused only where
    neither build fits, the layer's own check (the impl, which knows the group) decides the rest."""
    r: list[str] = []
    layout = get_scheme(scheme).layout(head_size if head_size in SUPPORTED_HEAD_DIMS else 128, page_size)
    two_bit = (layout.k_bits, layout.v_bits) == (2, 2)
    if not two_bit:
        r.append(
            f"scheme {scheme!r} has {layout.k_bits}-bit keys and {layout.v_bits}-bit values; the CUDA decode "
            "kernel reads 2-bit codes only (use kivi-serve-2bit or kivi2-uniform on a GPU)"
        )
    if page_size not in CUDA_PAGE_SIZES:
        r.append(
            f"page size {page_size} is not supported by the CUDA kernels (use one of "
            f"{', '.join(map(str, CUDA_PAGE_SIZES))})"
        )
        return r
    major, minor = device_capability
    if device_capability < MIN_CUDA_CAPABILITY:
        r.append(
            f"GPU compute capability {major}.{minor} is too old "
            f"(kivi-serve's kernels need {MIN_CUDA_CAPABILITY[0]}.{MIN_CUDA_CAPABILITY[1]} or newer)"
        )
        return r
    arch = loader.capability_arch(device_capability)
    name = str(dtype).removeprefix("torch.")
    kernel_dtype = name if name in loader.DTYPES else "bfloat16"
    where = f"scheme {scheme!r} at head_dim {layout.head_dim} x page {page_size}"
    rows16 = (False, True) if query_group is None else (query_group > 8,)
    builds = [("quantize_append", {})] + [("decode_attention", {"rows16": x}) for x in rows16 if two_bit]
    misfits: dict[str, str] = {}  # source -> the first refusal of its builds on this GPU
    settled: set[str] = set()  # sources one build of which fits this GPU, or that no GPU can run
    for source, build in builds:
        try:
            spec = loader.KernelSpec.for_layout(source, layout, kernel_dtype, **build)
        except ValueError as exc:
            why = f"the CUDA kernels cannot serve {where} on any GPU: {exc} (or run it on CPU)"
            r += [why] if why not in r else []
            settled.add(source)
            continue
        try:
            spec.check_arch(arch)
            settled.add(source)
        except ValueError as exc:
            misfits.setdefault(source, str(exc))
    gpu = f"this GPU (compute capability {major}.{minor}, {arch})"
    for source, why in misfits.items():
        if source not in settled:
            r.append(f"the CUDA kernels cannot serve {where} on {gpu}: {why} (or run it on CPU)")
    return r


class KiviAttentionBackend(AttentionBackend):
    """kivi-serve's paged 2-bit KV cache, as a vLLM attention backend (decoder-only)."""

    forward_includes_kv_cache_update: bool = False
    #: CUDA: fp16/bf16 (validate_configuration)
    supported_dtypes: ClassVar[list[torch.dtype]] = list(CPU_DTYPES)
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        # The enum member we are registered as: CPU_ATTN on the CPU platform (which ignores
        # CUSTOM), CUSTOM elsewhere. vLLM maps layers back to the enum by this name.
        return "CPU_ATTN" if current_platform.is_cpu() else "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[KiviAttentionImpl]:
        return KiviAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KiviMetadataBuilder]:
        return KiviMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        # One vLLM kernel block is one page; C does not depend on the block size, so it is fixed. Once
        # a layer's spec exists its block size is the page size (the impl refused any other).
        if kv_cache_spec is not None and getattr(kv_cache_spec, "block_size", None):
            return [kv_cache_spec.block_size]
        return [current_settings().page_size]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_DIMS)

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # LBHNC: each (block, head) page is one contiguous run of P * C bytes.
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """uint8 pages of exactly the bytes the page format needs: ``C`` bytes per token slot."""
        if spec.dtype == torch.uint8 and spec.state_content_bytes is not None:
            return spec  # already ours
        s = current_settings()
        codec = make_codec(spec.head_size, s.page_size, spec.dtype, scheme=s.scheme, fp_pages=s.fp_pages)
        return replace(spec, dtype=torch.uint8, state_content_bytes=codec.slot_bytes)

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        return current_settings().page_size

    @classmethod
    def validate_configuration(
        cls, head_size, dtype, kv_cache_dtype, block_size, device_capability=None, **features
    ) -> list[str]:
        """vLLM's selector check (called with keywords: its ``AttentionSelectorConfig`` fields)."""
        s = current_settings()
        capability = _kernel_capability(device_capability)
        reasons = unsupported_reasons(
            head_size, dtype, kv_cache_dtype, block_size, s.page_size, scheme=s.scheme,
            device_capability=capability, **features,
        )  # fmt: skip
        return [f"kivi-serve: {r}" for r in reasons]


def _kernel_capability(device_capability=None):
    """The GPU capability when this engine's pages run on the CUDA kernels, else None (CPU, or fp_pages
    debug pages on any device: the PyTorch executor)."""
    if not current_platform.is_cuda() or current_settings().fp_pages:
        return None
    return device_capability if device_capability is not None else current_platform.get_device_capability()


@dataclass
class PrefillMetadata:
    """The prefill part of a step (rows ``num_decodes`` on): their context pages, built once per step.

    rows : per prefill row with new tokens, ``(q0, q1, ctx, page0, start)`` host ints — its tokens are
        ``[q0, q1)`` of the batch, it attends cached tokens ``[start, ctx)`` (``start`` > 0 only in a
        sliding-window group: the pages before its first window are not read), the first of its
        context pages (position ``start``, a page boundary) is entry ``page0`` of ``blocks``.
    blocks : (n,) int32, device — block of every context page of every row (dequantized to a scratch).
    tail_rows, tail_pages : (m,) int64, device — rows whose last context page is still open after the
        step (read from its staging slot, ``tail_slots[row]``), and that page's entry in ``blocks``.
    cu_q, cu_k : (len(rows) + 1,) int32, device — cumulative query and key lengths (varlen attention).
    paged : on the CPU, the rows' layout in the scratch cache that vLLM's CPU attention op reads
        (:mod:`kivi_serve.backend.prefill_cpu`); None on other devices.
    """

    rows: list[tuple[int, int, int, int]]
    blocks: torch.Tensor
    tail_rows: torch.Tensor
    tail_pages: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    paged: prefill_cpu.PagedPrefill | None = None

    @property
    def num_tails(self) -> int:
        return int(self.tail_rows.shape[0])


@dataclass
class KiviMetadata:
    """One step's batch for every layer of a KV-cache group (built once, shared by all of them).

    Rows ``[0, num_decodes)`` are decodes (one new token each, tokens ``[0, num_decode_tokens)``),
    the rest prefill chunks (vLLM reorders the batch so: ``reorder_batch_threshold = 1``). Tensors are
    on the model's device; ``query_start_loc``, ``seq_lens`` and ``block_table`` are vLLM's own,
    ``plan`` and ``tail_slots`` views of the planner's persistent buffers. ``plan_id`` numbers the
    group's plans (checked per layer only with the ``debug`` setting). ``decode_batch``: the decode
    rows' metadata as the C++ CPU kernels take it, made by the step's first decoding layer
    (:meth:`KernelExecutor.decode_step`) and used by all of them.
    """

    num_actual_tokens: int
    num_reqs: int
    max_query_len: int
    num_decodes: int
    num_decode_tokens: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    tail_slots: torch.Tensor
    plan: AppendPlan
    prefill: PrefillMetadata | None
    plan_id: int
    decode_batch: object | None = None


class KiviMetadataBuilder(AttentionMetadataBuilder[KiviMetadata]):
    """All of a step's host work, once: the decode/prefill split, the staging pool's plan (on the
    device), the prefill context pages. Reads only what vLLM gives a builder on the host
    (``query_start_loc_cpu``, ``seq_lens_cpu_upper_bound``); block ids stay on the device."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    reorder_batch_threshold: int | None = 1

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if vllm_config.speculative_config is not None:
            raise ValueError(
                "kivi-serve: speculative decoding is not supported (the builder plans pages from the "
                "host's sequence lengths, which async speculative decoding only bounds from above)"
            )
        self.runtime = engine_runtime(vllm_config, kv_cache_spec.head_size, kv_cache_spec.num_kv_heads)
        if kv_cache_spec.block_size != self.runtime.page_size:
            raise ValueError(
                f"kivi-serve: vLLM block size {kv_cache_spec.block_size} "
                f"!= page size {self.runtime.page_size}"
            )
        self.group = self.runtime.group(layer_names)
        self.debug = self.runtime.settings.debug
        # A sliding-window group (vLLM's SlidingWindowSpec: every layer of it has this window): vLLM
        # frees the pages wholly before a step's first window, so prefill rows do not read them.
        window = kv_cache_spec.sliding_window if isinstance(kv_cache_spec, SlidingWindowSpec) else None
        self.window = LayerAttention(window=window) if window else None

    @classmethod
    def get_cudagraph_support(cls, vllm_config: VllmConfig, kv_cache_spec) -> AttentionCGSupport:
        """Decode steps are graph-safe with the CUDA kernels; the debug checks and the PyTorch
        executor (fp_pages debug pages) read device data on the host, so they run eagerly."""
        s = settings_from(vllm_config.additional_config)
        if s.debug or s.fp_pages:
            return AttentionCGSupport.NEVER
        return cls._cudagraph_support

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> KiviMetadata:
        return self._build(common_attn_metadata, capture=False)

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> KiviMetadata:
        """Metadata over the persistent buffers with a plan that does nothing: the captured launches
        read the buffers that every later :meth:`build` fills."""
        return self._build(common_attn_metadata, capture=True)

    def _build(self, cm: CommonAttentionMetadata, capture: bool) -> KiviMetadata:
        B, T = cm.num_reqs, cm.num_actual_tokens
        if cm.seq_lens_cpu_upper_bound is None:
            raise ValueError(
                "kivi-serve: vLLM gave the builder no host sequence lengths (seq_lens_cpu_upper_bound)"
            )
        qsl = cm.query_start_loc_cpu[: B + 1].numpy()
        lens = cm.seq_lens_cpu_upper_bound[:B].numpy()
        num_decodes, _, num_decode_tokens, _ = split_decodes_and_prefills(cm, decode_threshold=1)
        if num_decode_tokens != num_decodes:  # rows without tokens among the decodes: no decode launch
            num_decodes = num_decode_tokens = 0
        pages = step_pages(qsl, lens, self.runtime.page_size, T)
        pool = self.group.pool
        if capture:
            plan = pool.idle(pages.num_entries, T, B)
        else:
            plan = pool.plan(pages, cm.block_table_tensor)
            self.group.steps += 1
            self.group.plan_id += 1
        block_table = cm.block_table_tensor[:B]
        if self.debug and not capture:
            check_slot_mapping(pages, block_table, cm.slot_mapping[:T], self.runtime.page_size)
        prefill = None
        if num_decodes < B:
            prefill = self._prefill(qsl, lens, num_decodes, block_table)
        return KiviMetadata(
            num_actual_tokens=T,
            num_reqs=B,
            max_query_len=cm.max_query_len,
            num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens,
            query_start_loc=cm.query_start_loc[: B + 1],
            seq_lens=cm.seq_lens[:B],
            block_table=block_table,
            tail_slots=plan.tail_slots,
            plan=plan,
            prefill=prefill,
            plan_id=self.group.plan_id,
        )

    def _prefill(
        self, qsl: np.ndarray, lens: np.ndarray, first: int, block_table: torch.Tensor
    ) -> PrefillMetadata:
        """Context pages of the prefill rows, from host lengths; their block ids gathered on the device."""
        P = self.runtime.page_size
        rows, page_rows, page_ids, tail_rows, tail_pages = [], [], [], [], []
        cu_q, cu_k = [0], [0]
        for b in range(first, len(lens)):
            q0, q1 = int(qsl[b]), int(qsl[b + 1])
            n, L = q1 - q0, int(lens[b])
            if n <= 0:
                continue
            ctx = L - n
            n_pages = -(-ctx // P)
            first = min(semantics.first_visible(self.window, ctx) // P, n_pages)
            page0 = len(page_ids)
            rows.append((q0, q1, ctx, page0, first * P))
            page_rows += [b] * (n_pages - first)
            page_ids += range(first, n_pages)
            if ctx % P and n_pages * P > L:  # the last context page stays open: its slot has it
                tail_rows.append(b)
                tail_pages.append(page0 + n_pages - first - 1)
            cu_q.append(cu_q[-1] + n)
            cu_k.append(cu_k[-1] + L - first * P)
        dev = block_table.device
        up = _uploader(dev)
        index = up(np.array([page_rows, page_ids], dtype=np.int64).reshape(2, -1))
        blocks = block_table[index[0], index[1]]
        return PrefillMetadata(
            rows=rows,
            blocks=blocks,
            tail_rows=up(np.array(tail_rows, dtype=np.int64)),
            tail_pages=up(np.array(tail_pages, dtype=np.int64)),
            cu_q=up(np.array(cu_q, dtype=np.int32)),
            cu_k=up(np.array(cu_k, dtype=np.int32)),
            max_q=max((r[1] - r[0] for r in rows), default=0),
            max_k=max((r[1] - r[0] + r[2] - r[4] for r in rows), default=0),
            paged=prefill_cpu.plan_paged_prefill(rows, len(page_ids), P)
            if rows and dev.type == "cpu"
            else None,
        )


def _uploader(device: torch.device):
    """Host numpy array → tensor on ``device`` (pinned, asynchronous on CUDA)."""

    def up(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if device.type == "cuda":
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)

    return up


def check_slot_mapping(
    pages: StepPages, block_table: torch.Tensor, slot_mapping: torch.Tensor, P: int
) -> None:
    """Raise if vLLM's slot mapping disagrees with ``block_table[pos // P] * P + pos % P`` (debug
    setting only: it reads the comparison on the host). Tokens of rows whose pages point at the null
    block (dummy and padding rows) are not checked."""
    entries = torch.from_numpy(pages.token_entries.astype(np.int64)).to(block_table.device)
    live = entries >= 0
    at = entries.clamp(min=0)
    rows = torch.from_numpy(pages.rows.astype(np.int64)).to(block_table.device)[at]
    page = torch.from_numpy(pages.pages.astype(np.int64)).to(block_table.device)[at].clamp(min=0)
    offs = torch.from_numpy(pages.token_offsets.astype(np.int64)).to(block_table.device)
    blk = block_table[rows, page].long()
    want = blk * P + offs
    bad = live & (blk != NULL_BLOCK) & (slot_mapping.long() != want)
    if bool(bad.any()):
        t = int(bad.int().argmax())
        raise RuntimeError(
            f"kivi-serve: vLLM slot mapping disagrees with the block table for token {t} of the batch: "
            f"slot {int(slot_mapping[t])}, expected {int(want[t])}. The attention backend would write "
            "this token to the wrong page."
        )


def engine_runtime(vllm_config: VllmConfig, head_dim: int, num_kv_heads: int) -> KiviRuntime:
    """The :class:`KiviRuntime` of ``vllm_config``'s engine in this process (created once)."""

    def make() -> KiviRuntime:
        sched = vllm_config.scheduler_config
        return KiviRuntime(
            settings_from(vllm_config.additional_config),
            head_dim=head_dim,
            num_kv_heads=num_kv_heads,
            dtype=vllm_config.model_config.dtype,
            device=vllm_config.device_config.device,
            max_num_seqs=sched.max_num_seqs,
            max_num_batched_tokens=max(sched.max_num_batched_tokens, sched.max_num_seqs),
        )

    rt = runtime_for(vllm_config, make)
    if (rt.head_dim, rt.num_kv_heads) != (head_dim, num_kv_heads):
        raise ValueError(
            "kivi-serve: all attention layers must share head_dim and KV heads; "
            f"got {(head_dim, num_kv_heads)} "
            f"after {(rt.head_dim, rt.num_kv_heads)}"
        )
    return rt


def _flash_varlen():
    """vLLM's varlen flash attention and its version on this GPU, or None (then torch SDPA)."""
    if not current_platform.is_cuda():
        return None
    try:
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func, get_flash_attn_version
        from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported

        version = get_flash_attn_version()
        if version is None or not is_fa_version_supported(version):
            return None
    except Exception:  # noqa: BLE001 — any failure means "not available here": SDPA does the work
        return None
    return flash_attn_varlen_func, version


class KiviAttentionImpl(AttentionImpl[KiviMetadata]):
    """Per layer: ``do_kv_cache_update`` appends this step's K/V (one launch of the plan),
    ``forward`` attends: one decode launch for the decode rows, the prefill path for the rest.

    The layer's state is its own: the staging tensor, the last plan id.
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **kwargs,
    ) -> None:
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
        settings = settings_from(vllm_config.additional_config)
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.sliding_window = sliding_window
        sinks = kwargs.get("sinks")
        dtype = vllm_config.model_config.dtype
        reasons = unsupported_reasons(
            head_size,
            dtype,
            kv_cache_dtype,
            vllm_config.cache_config.block_size,
            settings.page_size,
            scheme=settings.scheme,
            attn_type=attn_type,
            has_sliding_window=sliding_window is not None,
            has_sink=sinks is not None,
            use_alibi=alibi_slopes is not None,
            use_softcap=bool(logits_soft_cap),
            kv_sharing=kv_sharing_target_layer_name is not None,
            device_capability=_kernel_capability(),
            query_group=num_heads // self.num_kv_heads,
        )
        if num_heads % self.num_kv_heads:
            reasons.append(f"{num_heads} query heads are not a multiple of {self.num_kv_heads} KV heads")
        if sinks is not None and tuple(sinks.shape) != (num_heads,):
            reasons.append(f"attention sinks of shape {tuple(sinks.shape)}, expected ({num_heads},)")
        if reasons:
            raise ValueError("kivi-serve cannot run this model: " + "; ".join(reasons))
        #: Window, soft-cap and sink logits of this layer (``sinks`` is the model's parameter: vLLM
        #: loads its values after building the layer).
        self.attn = LayerAttention(
            window=sliding_window, softcap=float(logits_soft_cap) if logits_soft_cap else None, sinks=sinks
        )
        self.runtime = engine_runtime(vllm_config, head_size, self.num_kv_heads)
        self.settings = self.runtime.settings
        self.codec = self.runtime.codec
        self.quantized = isinstance(self.codec, QuantCodec)
        self.staging = self.runtime.new_staging()
        self.last_plan_id = 0
        self._executor = None
        self._pages: tuple[torch.Tensor, torch.Tensor] | None = None  # (kv_cache, its pages view)
        self._flash = _flash_varlen() if dtype in SUPPORTED_DTYPES and self.attn.plain else None
        # CPU prefill: vLLM's CPU attention op over the dequantized context (windows, soft-cap, sinks too)
        self._cpu_op = current_platform.is_cpu() and prefill_cpu.available(dtype)
        self._take_staging_from_budget(vllm_config)
        self.runtime.add_layer(self)

    def _take_staging_from_budget(self, vllm_config: VllmConfig) -> None:
        """Count this layer's staging tensor in the KV budget.

        With an explicit KV budget (``VLLM_CPU_KVCACHE_SPACE`` / ``kv_cache_memory_bytes``: always on
        CPU) the staging bytes are taken out of it, so vLLM sizes ``num_blocks`` from what is left and
        pages + staging together fit the budget. Without one (GPU profiling) the tensor exists before
        vLLM measures memory, so the profiler counts it as non-KV memory.
        """
        cache_config = vllm_config.cache_config
        budget = cache_config.kv_cache_memory_bytes
        if budget is None:
            return
        cost = self.staging.numel() * self.staging.element_size()
        if budget - cost <= 0:
            raise ValueError(
                f"kivi-serve: the KV cache budget ({budget / 2**30:.2f} GiB) cannot hold the "
                "staging pool "
                f"({self.runtime.num_slots} slots, {cost / 2**20:.1f} MiB for this layer alone); raise "
                "VLLM_CPU_KVCACHE_SPACE / kv_cache_memory_bytes or lower max_num_seqs"
            )
        cache_config.kv_cache_memory_bytes = budget - cost

    # ------------------------------------------------------------------ per step
    def executor(self, kv_cache: torch.Tensor):
        """The layer's kernels: compiled (CUDA, or C++ on the CPU) for 2-bit pages, else the reference."""
        if self._executor is None:
            layout = self.codec.layout if self.quantized else None
            # the C++ decode reads 2-bit codes and does plain causal attention; other formats and
            # windowed/soft-capped/sink layers take the reference on the CPU (on CUDA the kernels
            # refuse them: KernelExecutor)
            compiled_cpu = layout is not None and (layout.k_bits, layout.v_bits) == (2, 2) and self.attn.plain
            if layout is not None and (kv_cache.is_cuda or compiled_cpu):
                kernels = cuda_kernels() if kv_cache.is_cuda else cpu_kernels()
                self._executor = KernelExecutor(self.codec, kernels, self.attn)
            else:
                self._executor = TorchExecutor(self.codec, self.attn)
        return self._executor

    def layer_pages(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """The layer's cache as ``[NB, Hkv, page_bytes]`` (:func:`reference.pages_view`, checked once
        per cache tensor: vLLM hands every step the same one)."""
        seen = self._pages
        if seen is None or seen[0] is not kv_cache:
            seen = self._pages = (kv_cache, reference.pages_view(kv_cache, self.codec))
        return seen[1]

    @staticmethod
    def _metadata(layer: AttentionLayer) -> KiviMetadata | None:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            return None
        md = get_forward_context().attn_metadata
        if isinstance(md, list):
            md = md[0]
        if isinstance(md, dict):
            md = md.get(layer.layer_name)
        return md if isinstance(md, KiviMetadata) else None

    def do_kv_cache_update(
        self,
        layer: AttentionLayer,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        md = self._metadata(layer)
        if md is not None:
            self.append(key, value, kv_cache, md)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: KiviMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("kivi-serve: fused output quantization is not supported")
        if attn_metadata is None:
            return output  # profiling / warm-up run
        return self.attend(query, key, value, kv_cache, attn_metadata, output)

    # ------------------------------------------------------------------ the work (callable by hand)
    def append(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, md: KiviMetadata
    ) -> None:
        """Execute the step's plan for this layer: staging writes and page finalisation (one call).

        key, value : (≥T, Hkv, D) — this step's tokens (rows beyond ``md.num_actual_tokens`` are
        ignored) · kv_cache : uint8 ``[blocks, Hkv, P, C]``.
        """
        if self.settings.debug and self.last_plan_id != md.plan_id - 1:
            raise RuntimeError(
                f"kivi-serve: a layer is at plan {self.last_plan_id} but the step carries plan "
                f"{md.plan_id}; every layer must execute every step's plan (a page would be lost)"
            )
        T = md.num_actual_tokens
        pages = self.layer_pages(kv_cache)
        self.executor(kv_cache).append(md.plan, dense(key[:T]), dense(value[:T]), pages, self.staging)
        self.last_plan_id = md.plan_id

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        md: KiviMetadata,
        output: torch.Tensor,
    ) -> torch.Tensor:
        """Attention of this step's tokens into ``output[:T]`` (viewed as (≥T, Hq, D)); returns ``output``."""
        if self.settings.debug and self.last_plan_id != md.plan_id:
            raise RuntimeError(
                f"kivi-serve: a layer attends with plan {md.plan_id} but appended plan {self.last_plan_id}"
            )
        out = output.view(output.shape[0], self.num_heads, self.head_size)
        pages = self.layer_pages(kv_cache)
        if md.num_decodes:
            self.executor(kv_cache).decode_step(md, query, key, value, pages, self.staging, self.scale, out)
        if md.prefill is not None and md.prefill.rows:
            self._prefill(query, key, value, pages, kv_cache, md, out)
        return output

    def _context_pages(self, pages, kv_cache, md: KiviMetadata, dtype, spare: int = 0):
        """The prefill rows' context pages in ``dtype``: ``(k, v)``, each (n + spare, Hkv, P, D) for
        the n entries of ``md.prefill.blocks`` (dequantized; a still-open last page read from its
        staging slot) and ``spare`` pages after them (zeros, for :mod:`prefill_cpu` to fill)."""
        pf = md.prefill
        blocks = pf.blocks if not spare else torch.cat([pf.blocks, pf.blocks.new_full((spare,), -1)])
        kc, vc = self.executor(kv_cache).dequantize(pages, blocks, dtype)  # (n, H, P, D)
        if pf.num_tails:
            slots = md.tail_slots[pf.tail_rows]
            staged = read_rows(self.staging[slots.clamp(min=0).long()], dtype)  # (m, 2, H, P, D)
            use = (slots >= 0).view(-1, 1, 1, 1)
            kc[pf.tail_pages] = torch.where(use, staged[:, 0], kc[pf.tail_pages])
            vc[pf.tail_pages] = torch.where(use, staged[:, 1], vc[pf.tail_pages])
        return kc, vc

    def _prefill(self, query, key, value, pages, kv_cache, md: KiviMetadata, out) -> None:
        """Prefill rows: their context pages dequantized to a scratch (the still-open last page from its
        staging slot), then attention over (context + own tokens): on the CPU vLLM's CPU attention op
        over that scratch, on CUDA varlen flash attention, else SDPA per row (or, with soft-cap or
        sinks, the reference's chunk attention)."""
        pf = md.prefill
        P, H, D = self.runtime.page_size, self.num_kv_heads, self.head_size
        dtype = query.dtype
        if self._cpu_op and pf.paged is not None:
            lo, hi = pf.rows[0][0], pf.rows[-1][1]
            kc, vc = self._context_pages(pages, kv_cache, md, dtype, spare=pf.paged.num_spare)
            q, k, v = query[lo:hi], key[lo:hi], value[lo:hi]
            prefill_cpu.attend(pf.paged, q, k, v, kc, vc, self.scale, out[lo:hi], self.attn)
            return
        kc, vc = self._context_pages(pages, kv_cache, md, dtype)
        ctx_k = kc.transpose(1, 2).reshape(-1, H, D)  # token-major: page i's tokens at [i * P, (i + 1) * P)
        ctx_v = vc.transpose(1, 2).reshape(-1, H, D)

        def keys(q0, q1, ctx, page0, start):
            c0 = page0 * P
            return (
                torch.cat([ctx_k[c0 : c0 + ctx - start], key[q0:q1].to(dtype)]),
                torch.cat([ctx_v[c0 : c0 + ctx - start], value[q0:q1].to(dtype)]),
            )

        if self._flash is not None:
            fn, version = self._flash
            kv = [keys(*r) for r in pf.rows]
            lo, hi = pf.rows[0][0], pf.rows[-1][1]
            fn(
                dense(query[lo:hi]),
                torch.cat([k for k, _ in kv]),
                torch.cat([v for _, v in kv]),
                max_seqlen_q=pf.max_q,
                cu_seqlens_q=pf.cu_q,
                max_seqlen_k=pf.max_k,
                cu_seqlens_k=pf.cu_k,
                softmax_scale=self.scale,
                causal=True,
                out=out[lo:hi],
                fa_version=version,
            )
            return
        attn = self.attn
        for q0, q1, ctx, page0, start in pf.rows:
            k, v = keys(q0, q1, ctx, page0, start)
            n = q1 - q0
            if attn.sinks is not None or attn.softcap is not None:  # the reference's chunk attention (fp32)
                o = reference.attend_chunk(
                    query[q0:q1], key[q0:q1], value[q0:q1], k[: ctx - start].float(),
                    v[: ctx - start].float(), self.scale, attn=attn, ctx_start=start,
                )  # fmt: skip
                out[q0:q1] = o.to(out.dtype)
                continue
            dev = query.device  # query i sees the context and itself (inside its window):
            mask = semantics.visible(
                attn, ctx + torch.arange(n, device=dev), torch.arange(start, ctx + n, device=dev)
            )
            # no context and no window inside the chunk: SDPA's own causal mask (it skips the masked half)
            causal = not ctx and (attn.window is None or n <= attn.window)
            o = F.scaled_dot_product_attention(
                query[q0:q1].transpose(0, 1).unsqueeze(0),
                k.transpose(0, 1).unsqueeze(0),
                v.transpose(0, 1).unsqueeze(0),
                attn_mask=None if causal else mask,
                is_causal=causal,
                scale=self.scale,
                enable_gqa=True,
            )
            out[q0:q1] = o[0].transpose(0, 1).to(out.dtype)
