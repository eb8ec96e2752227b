"""The vLLM attention backend: ``KiviAttentionBackend`` (static facts), ``KiviMetadataBuilder``
(once per step, CPU) and ``KiviAttentionImpl`` (per layer: append, then attend).

What vLLM 0.32 calls, and when (see docs/design.md for the whole picture):

- model construction: ``get_impl_cls()(...)`` once per attention layer → :class:`KiviAttentionImpl`
  validates the layer, allocates its staging tensor and takes its bytes out of an explicit KV budget;
- ``get_kv_cache_spec``: :meth:`KiviAttentionBackend.customize_spec` → uint8, ``C`` bytes per slot;
- KV cache allocation: one uint8 ``[blocks, kv_heads, P, C]`` view per layer (layout LBHNC);
- every step: :meth:`KiviMetadataBuilder.build` once per KV-cache group (runs the staging pool),
  then per layer ``do_kv_cache_update`` (append) and ``forward`` (attention). ``attn_metadata`` is
  ``None`` in profiling / warm-up runs: nothing is written then.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.logger import init_logger
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
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from kivi_serve.backend import ops
from kivi_serve.backend.runtime import HostBatch, KiviRuntime, latest_runtime, runtime_for
from kivi_serve.backend.settings import KiviSettings, settings_from
from kivi_serve.backend.staging import AppendPlan
from kivi_serve.kernels import reference
from kivi_serve.quant.codec import QuantCodec, make_codec
from kivi_serve.quant.layout import SUPPORTED_HEAD_DIMS
from kivi_serve.quant.schemes import DEFAULT_SCHEME, get_scheme

logger = init_logger(__name__)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
#: The CPU executor is plain PyTorch: it also runs float32 models (CI uses them: on CPUs without
#: AVX512-BF16, bf16 matmuls are many times slower, and fp32 makes engine-vs-reference runs agree).
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Page sizes the CUDA kernels are built for (kivi_serve/kernels/quantize_append.py).
CUDA_PAGE_SIZES = (64, 128)
#: The 2-bit decode kernel needs mma.m16n8k16 (Ampere or newer).
MIN_CUDA_CAPABILITY = (8, 0)


def current_settings() -> KiviSettings:
    """Settings of the engine being built or run in this process.

    The current vLLM config when one is set; else the settings of the most recently created
    runtime (vLLM calls some class methods, e.g. ``customize_spec``, outside any config context,
    always after the model's layers — and so the runtime — exist); else environment and defaults.
    """
    cfg = get_current_vllm_config_or_none()
    if cfg is not None and cfg.model_config is not None:
        return settings_from(cfg.additional_config)
    rt = latest_runtime()
    if rt is not None:
        return rt.settings
    return settings_from(None)


def unsupported_reasons(
    head_size: int,
    dtype: torch.dtype,
    kv_cache_dtype: str | None,
    block_size: int | None,
    page_size: int,
    *,
    scheme: str = DEFAULT_SCHEME,
    use_mla: bool = False,
    has_sink: bool = False,
    use_sparse: bool = False,
    attn_type: str = AttentionType.DECODER,
    has_sliding_window: bool = False,
    use_non_causal: bool = False,
    use_mm_prefix: bool = False,
    use_per_head_quant_scales: bool = False,
    use_alibi: bool = False,
    use_softcap: bool = False,
    kv_sharing: bool = False,
    use_batch_invariant: bool = False,
    use_kv_connector: bool = False,
    use_pcp: bool = False,
    use_dcp: bool = False,
    use_rswa: bool = False,
    use_adaptive_verification: bool = False,
    device_capability=None,
) -> list[str]:
    """Why kivi-serve cannot run a layer, as sentences a user can act on (empty: it can)."""
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
    if use_mla:
        r.append("MLA (multi-head latent attention) is not supported")
    if use_sparse:
        r.append("sparse attention is not supported")
    if attn_type != AttentionType.DECODER:
        r.append(
            f"attention type {attn_type!r} is not supported: kivi-serve serves decoder-only "
            "models (no encoder or cross attention)"
        )
    if has_sliding_window:
        r.append("sliding-window attention is not supported (pages are kept for the whole context)")
    if has_sink:
        r.append("learned attention sinks are not supported")
    if use_non_causal or use_mm_prefix:
        r.append("non-causal (bidirectional) attention is not supported")
    if use_alibi:
        r.append("ALiBi position biases are not supported")
    if use_softcap:
        r.append("logits soft-capping is not supported")
    if kv_sharing:
        r.append("cross-layer KV sharing is not supported")
    if use_per_head_quant_scales:
        r.append("per-head KV quantization scales are not supported")
    if use_batch_invariant:
        r.append("batch-invariant mode is not supported")
    if use_kv_connector:
        r.append("KV transfer connectors are not supported (the page format is kivi-serve's own)")
    if use_pcp or use_dcp:
        r.append("context parallelism (PCP/DCP) is not supported")
    if use_rswa:
        r.append("R-SWA attention is not supported")
    if use_adaptive_verification:
        r.append("speculative decoding with adaptive verification is not supported")
    layout = get_scheme(scheme).layout(head_size if head_size in SUPPORTED_HEAD_DIMS else 128, page_size)
    if device_capability is not None and (layout.k_bits, layout.v_bits) != (2, 2):
        r.append(
            f"scheme {scheme!r} has {layout.k_bits}-bit keys and {layout.v_bits}-bit values; the CUDA decode "
            "kernel reads 2-bit codes only (use kivi-serve-2bit or kivi2-uniform on a GPU)"
        )
    if device_capability is not None and page_size not in CUDA_PAGE_SIZES:
        r.append(
            f"page size {page_size} is not supported by the CUDA kernels (use one of "
            f"{', '.join(map(str, CUDA_PAGE_SIZES))})"
        )
    if device_capability is not None and tuple(device_capability) < MIN_CUDA_CAPABILITY:
        r.append(
            f"GPU compute capability {device_capability[0]}.{device_capability[1]} is too old "
            f"(kivi-serve's kernels need {MIN_CUDA_CAPABILITY[0]}.{MIN_CUDA_CAPABILITY[1]} or newer)"
        )
    return r


class KiviAttentionBackend(AttentionBackend):
    """kivi-serve's paged 2-bit KV cache, as a vLLM attention backend (decoder-only)."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = list(
        CPU_DTYPES
    )  # CUDA: fp16/bf16 (validate_configuration)
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
        # One vLLM kernel block is one page; C does not depend on the block size, so it is fixed.
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
        cls,
        head_size,
        dtype,
        kv_cache_dtype,
        block_size,
        use_mla,
        has_sink,
        use_sparse,
        use_mm_prefix,
        use_per_head_quant_scales,
        device_capability,
        attn_type,
        has_sliding_window=False,
        use_non_causal=False,
        use_batch_invariant=False,
        use_kv_connector=False,
        use_pcp=False,
        use_adaptive_verification=False,
        use_dcp=False,
        use_rswa=False,
    ) -> list[str]:
        return [
            f"kivi-serve: {r}"
            for r in unsupported_reasons(
                head_size,
                dtype,
                kv_cache_dtype,
                block_size,
                current_settings().page_size,
                scheme=current_settings().scheme,
                use_mla=use_mla,
                has_sink=has_sink,
                use_sparse=use_sparse,
                attn_type=attn_type,
                has_sliding_window=has_sliding_window,
                use_non_causal=use_non_causal,
                use_mm_prefix=use_mm_prefix,
                use_per_head_quant_scales=use_per_head_quant_scales,
                use_batch_invariant=use_batch_invariant,
                use_kv_connector=use_kv_connector,
                use_pcp=use_pcp,
                use_dcp=use_dcp,
                use_rswa=use_rswa,
                use_adaptive_verification=use_adaptive_verification,
                device_capability=device_capability if current_platform.is_cuda() else None,
            )
        ]


@dataclass
class KiviMetadata:
    """One step's batch for every layer of a KV-cache group (built once, shared by all of them).

    ``plan`` and the tensors are on the model's device; ``host`` holds the same batch as lists.
    ``plan_id`` numbers non-empty plans (0: nothing to append); every layer must execute each one.
    """

    num_actual_tokens: int
    num_reqs: int
    max_query_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    tail_slots: torch.Tensor
    plan: AppendPlan
    host: HostBatch
    plan_id: int


class KiviMetadataBuilder(AttentionMetadataBuilder[KiviMetadata]):
    """Runs the staging pool once per step and packs the plan as small tensors."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    reorder_batch_threshold: int | None = None

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.runtime = engine_runtime(vllm_config, kv_cache_spec.head_size, kv_cache_spec.num_kv_heads)
        if kv_cache_spec.block_size != self.runtime.page_size:
            raise ValueError(
                f"kivi-serve: vLLM block size {kv_cache_spec.block_size} "
                f"!= page size {self.runtime.page_size}"
            )
        self.group = self.runtime.group(layer_names)
        self.check_slots = torch.device(device).type == "cpu"

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> KiviMetadata:
        cm = common_attn_metadata
        B = cm.num_reqs
        qsl = cm.query_start_loc_cpu[: B + 1].tolist()
        if cm.seq_lens.device.type == "cpu":
            seq_lens = cm.seq_lens[:B].tolist()
        elif cm.seq_lens_cpu_upper_bound is not None:  # exact without speculative decoding
            seq_lens = cm.seq_lens_cpu_upper_bound[:B].tolist()
        else:
            seq_lens = cm.seq_lens[:B].cpu().tolist()
        table = cm.block_table_tensor
        table_cpu = table if table.device.type == "cpu" else table.cpu()
        step = self.runtime.plan_step(self.group, table_cpu, seq_lens, qsl)
        T = step.host.num_tokens
        if self.check_slots and step.planned:
            self.runtime.check_slot_mapping(step.host, step.planned, cm.slot_mapping[:T])
        plan = step.plan if self.device.type == "cpu" else step.plan.to(self.device)
        return KiviMetadata(
            num_actual_tokens=T,
            num_reqs=B,
            max_query_len=cm.max_query_len,
            query_start_loc=cm.query_start_loc[: B + 1],
            seq_lens=cm.seq_lens[:B],
            block_table=table[:B],
            tail_slots=plan.tail_slots,
            plan=plan,
            host=step.host,
            plan_id=step.plan_id,
        )


def engine_runtime(vllm_config: VllmConfig, head_dim: int, num_kv_heads: int) -> KiviRuntime:
    """The :class:`KiviRuntime` of ``vllm_config``'s engine in this process (created once)."""

    def make() -> KiviRuntime:
        return KiviRuntime(
            settings_from(vllm_config.additional_config),
            head_dim=head_dim,
            num_kv_heads=num_kv_heads,
            dtype=vllm_config.model_config.dtype,
            device=vllm_config.device_config.device,
            max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
        )

    rt = runtime_for(vllm_config, make)
    if (rt.head_dim, rt.num_kv_heads) != (head_dim, num_kv_heads):
        raise ValueError(
            "kivi-serve: all attention layers must share head_dim and KV heads; "
            f"got {(head_dim, num_kv_heads)} "
            f"after {(rt.head_dim, rt.num_kv_heads)}"
        )
    return rt


def _cuda_kernels():
    """The CUDA kernels (``kivi_serve.kernels.quantize_append`` / ``decode_attention``), imported lazily."""
    try:
        from kivi_serve.kernels import decode_attention, quantize_append
    except ImportError as e:
        raise RuntimeError(
            "kivi-serve: the KV cache is on a CUDA device but the CUDA kernels "
            "(kivi_serve.kernels.quantize_append / kivi_serve.kernels.decode_attention) cannot be imported "
            f"({e}). Install the GPU extra (pip install 'kivi-serve[gpu]') or run on CPU."
        ) from e
    return quantize_append, decode_attention


class KiviAttentionImpl(AttentionImpl[KiviMetadata]):
    """Per layer: ``do_kv_cache_update`` appends this step's K/V (staging + page finalisation),
    ``forward`` attends over finalised pages + the staged tail + this step's tokens."""

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
            has_sink=kwargs.get("sinks") is not None,
            use_alibi=alibi_slopes is not None,
            use_softcap=bool(logits_soft_cap),
            kv_sharing=kv_sharing_target_layer_name is not None,
        )
        if num_heads % self.num_kv_heads:
            reasons.append(f"{num_heads} query heads are not a multiple of {self.num_kv_heads} KV heads")
        if reasons:
            raise ValueError("kivi-serve cannot run this model: " + "; ".join(reasons))
        self.runtime = engine_runtime(vllm_config, head_size, self.num_kv_heads)
        self.codec = self.runtime.codec
        self.quantized = isinstance(self.codec, QuantCodec)
        self._account_staging(vllm_config)

    def _account_staging(self, vllm_config: VllmConfig) -> None:
        """Allocate this layer's staging tensor now and count it in the KV budget.

        With an explicit KV budget (``VLLM_CPU_KVCACHE_SPACE`` / ``kv_cache_memory_bytes``: always on
        CPU) the staging bytes are taken out of it, so vLLM sizes ``num_blocks`` from what is left and
        pages + staging together fit the budget. Without one (GPU profiling) the tensor exists before
        vLLM measures memory, so the profiler counts it as non-KV memory.
        """
        name = self._layer_name(vllm_config)
        self.layer_name = name
        self.runtime.add_layer(name)
        cache_config = vllm_config.cache_config
        budget = cache_config.kv_cache_memory_bytes
        if budget is not None and name not in self.runtime.budget_layers:
            cost = self.runtime.staging_layer_bytes
            if budget - cost <= 0:
                raise ValueError(
                    f"kivi-serve: the KV cache budget ({budget / 2**30:.2f} GiB) cannot hold the "
                    "staging pool "
                    f"({self.runtime.num_slots} slots, {cost / 2**20:.1f} MiB for this layer alone); raise "
                    "VLLM_CPU_KVCACHE_SPACE / kv_cache_memory_bytes or lower max_num_seqs"
                )
            cache_config.kv_cache_memory_bytes = budget - cost
            self.runtime.budget_layers.add(name)

    @staticmethod
    def _layer_name(vllm_config: VllmConfig) -> str:
        # The Attention layer registers itself in static_forward_context right after building its
        # impl; until then, the next layer name is the count of layers already registered.
        ctx = vllm_config.compilation_config.static_forward_context
        return f"__kivi_layer_{len(ctx)}"

    # ------------------------------------------------------------------ per step
    def _state(self, name: str):
        rt = self.runtime
        if name not in rt.layers and self.layer_name in rt.layers:
            # Re-key the staging tensor allocated at construction under the real layer name.
            with rt.lock:
                st = rt.layers.pop(self.layer_name)
                st.name = name
                rt.layers[name] = st
                if self.layer_name in rt.budget_layers:
                    rt.budget_layers.discard(self.layer_name)
                    rt.budget_layers.add(name)
            self.layer_name = name
        return rt.layer(name)

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
            self.append(layer.layer_name, key, value, kv_cache, md)

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
        return self.attend(layer.layer_name, query, key, value, kv_cache, attn_metadata, output)

    # ------------------------------------------------------------------ the work (callable by hand)
    def append(
        self,
        layer_name: str,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        md: KiviMetadata,
    ) -> None:
        """Execute the step's plan for this layer: staging writes and page finalisation.

        key, value : (≥T, Hkv, D) — this step's tokens (padding rows beyond ``md.num_actual_tokens``
        are ignored) · kv_cache : uint8 ``[blocks, Hkv, P, C]``.
        """
        if md.plan_id == 0:
            return  # nothing planned (e.g. a dummy batch)
        state = self._state(layer_name)
        if state.last_plan_id != md.plan_id - 1:
            raise RuntimeError(
                f"kivi-serve: layer {layer_name} is at plan {state.last_plan_id} but the step carries plan "
                f"{md.plan_id}; every layer must execute every step's plan (a page would be lost)"
            )
        T = md.num_actual_tokens
        pages = reference.pages_view(kv_cache, self.codec)
        if kv_cache.is_cuda and self.quantized:
            quantize_append, _ = _cuda_kernels()
            quantize_append.append_kv(
                md.plan, key[:T].contiguous(), value[:T].contiguous(), pages, state.staging, self.codec.layout
            )
        else:
            ops.append(md.plan, key[:T], value[:T], pages, state.staging, self.codec, state.cache)
        state.last_plan_id = md.plan_id

    def attend(
        self,
        layer_name: str,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        md: KiviMetadata,
        output: torch.Tensor,
    ) -> torch.Tensor:
        """Attention of this step's tokens; writes ``output[:T]`` ((≥T, Hq, D)) and returns ``output``."""
        state = self._state(layer_name)
        if md.plan_id and state.last_plan_id != md.plan_id:
            raise RuntimeError(
                f"kivi-serve: layer {layer_name} attends with plan {md.plan_id} "
                f"but appended plan {state.last_plan_id}"
            )
        T = md.num_actual_tokens
        if T == 0:
            return output
        pages = reference.pages_view(kv_cache, self.codec)
        q, k, v = query[:T], key[:T], value[:T]
        if kv_cache.is_cuda and self.quantized:
            out = self._attend_cuda(q.contiguous(), k.contiguous(), v.contiguous(), pages, state, md)
        else:
            h = md.host
            out = ops.attend(
                q,
                k,
                v,
                pages,
                state.staging,
                h.block_tables,
                h.seq_lens,
                h.query_start_loc,
                h.tail_slots,
                self.codec,
                self.scale,
                state.cache,
                self.runtime.workspace,
            )
        output[:T].copy_(out.view(T, self.num_heads, self.head_size))
        return output

    def _attend_cuda(self, q, k, v, pages, state, md: KiviMetadata) -> torch.Tensor:
        """CUDA, 2-bit pages: decode rows through the CuPy decode kernel; multi-token chunks (prefill)
        one sequence at a time through the reference math on the GPU (dequantize + dense attention)."""
        _, decode_attention = _cuda_kernels()
        fn = decode_attention.paged_attention
        h = md.host
        B, T = len(h.seq_lens), md.num_actual_tokens
        i32 = torch.int32
        qsl = h.query_start_loc
        single = [b for b in range(B) if qsl[b + 1] - qsl[b] == 1]
        layout, dev = self.codec.layout, q.device
        if len(single) == B and T == B:
            return fn(
                q,
                k,
                v,
                pages,
                state.staging,
                md.block_table.to(i32).contiguous(),
                md.seq_lens.to(i32),
                md.query_start_loc.to(i32),
                md.tail_slots.to(i32),
                layout,
                self.scale,
            )
        out = torch.empty(T, self.num_heads, self.head_size, dtype=q.dtype, device=dev)
        if single:
            idx = torch.tensor(single, dtype=torch.long, device=dev)
            rows = torch.tensor([qsl[b] for b in single], dtype=torch.long, device=dev)
            out[rows] = fn(
                q[rows],
                k[rows],
                v[rows],
                pages,
                state.staging,
                md.block_table[idx].to(i32).contiguous(),
                md.seq_lens[idx].to(i32),
                torch.arange(len(single) + 1, dtype=i32, device=dev),
                md.tail_slots[idx].to(i32),
                layout,
                self.scale,
            )
        rest = [b for b in range(B) if qsl[b + 1] - qsl[b] > 1]
        if rest:
            buf = torch.empty(T, self.num_heads, self.head_size, dtype=torch.float32, device=dev)
            for b in rest:
                ops._attend_one(
                    buf,
                    q,
                    k,
                    v,
                    pages,
                    state.staging,
                    h.block_tables[b],
                    h.seq_lens[b],
                    qsl[b],
                    qsl[b + 1],
                    h.tail_slots[b],
                    self.codec,
                    self.scale,
                    None,
                )
                out[qsl[b] : qsl[b + 1]] = buf[qsl[b] : qsl[b + 1]].to(q.dtype)
        return out
