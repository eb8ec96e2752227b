"""EngineConfig → vLLM ``AsyncEngineArgs``: the one place that knows vLLM's engine flags.

Our attention backend is selected by ``kivi_serve.backend.engine_overrides(page_size)`` (the
backend owns how it is selected: ``attention_backend``, block size, ...); vLLM's default backend
runs at the same block size so the two are comparable.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from kivi_serve.backend import engine_overrides
from kivi_serve.backend.settings import STAGING_HEADROOM, settings_from
from kivi_serve.config import EMBEDDED_MODEL
from kivi_serve.engine.config import EngineConfig
from kivi_serve.quant import staging as staging_format

log = logging.getLogger("kivi_serve.engine")

GiB = 1 << 30
#: KV cache budget on CPU when neither the config nor VLLM_CPU_KVCACHE_SPACE gives one.
DEFAULT_CPU_KV_GIB = 2.0
#: vLLM's CPU variable for the KV budget (whole GiB); read here, and nowhere else in kivi-serve.
CPU_KV_ENV = "VLLM_CPU_KVCACHE_SPACE"
WORKER_EXTENSION = "kivi_serve.engine.worker_ext.KiviWorkerExtension"
#: With our backend and an explicit KV budget, the default ``max_num_seqs`` keeps the staging pool
#: (one open page of every layer per sequence) within this share of the budget, so that the pages
#: keep the rest: 5.6x the tokens of a bf16 cache for SmolLM2 at 2 GiB.
STAGING_SHARE = 1 / 16
#: ... and never exceeds vLLM's own default for a CPU server.
MAX_DEFAULT_NUM_SEQS = 128


def backend_overrides(cfg: EngineConfig) -> dict[str, Any]:
    """Engine-arg overrides that select ``cfg.backend``."""
    return {} if cfg.backend == "default" else engine_overrides(cfg.page_size, scheme=cfg.scheme)


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def served_name(cfg: EngineConfig, model_path: Path) -> str:
    if cfg.served_model_name:
        return cfg.served_model_name
    return EMBEDDED_MODEL if cfg.model == EMBEDDED_MODEL else model_path.name


def cpu_kv_cache_bytes(cfg: EngineConfig) -> int:
    """The CPU KV budget in bytes: the config, else VLLM_CPU_KVCACHE_SPACE (GiB), else 2 GiB.

    vLLM's CPU platform lets the variable override the budget we pass; when the config gives one,
    the variable is removed from this process's environment so that the config wins.
    """
    env = os.environ.get(CPU_KV_ENV, "")
    if cfg.kv_cache_space is not None:
        os.environ.pop(CPU_KV_ENV, None)
        return int(cfg.kv_cache_space * GiB)
    return int(float(env) * GiB) if env else int(DEFAULT_CPU_KV_GIB * GiB)


def default_max_num_seqs(budget_bytes: int, slot_bytes: int) -> int:
    """The most sequences whose staging slots (plus the pool's headroom) fit in
    :data:`STAGING_SHARE` of the budget; at least 1, at most :data:`MAX_DEFAULT_NUM_SEQS`."""
    slots = int(STAGING_SHARE * budget_bytes) // slot_bytes
    return max(1, min(MAX_DEFAULT_NUM_SEQS, slots - STAGING_HEADROOM))


def staging_slot_bytes(model_config: Any, page_size: int, tensor_parallel_size: int) -> int:
    """Bytes of one staging slot in one worker: a page of K and V of every layer in the staging
    format the backend will use (int8 rows by default: ``layers · 2 · Hkv · P · (D + 4)``; model
    dtype: ``layers · 2 · Hkv · P · D · itemsize``; docs/design.md "Capacity")."""
    heads = max(1, model_config.get_total_num_kv_heads() // tensor_parallel_size)
    layers = model_config.get_total_num_hidden_layers()
    fmt = settings_from(None).staging_format
    head_size, dtype = model_config.get_head_size(), model_config.dtype
    return layers * staging_format.slot_bytes(fmt, head_size, page_size, heads, dtype)


def build_engine_args(cfg: EngineConfig, model_path: Path | None = None, **extra: Any):
    """The ``AsyncEngineArgs`` for ``cfg`` (``extra`` are raw vLLM engine args, for experiments).

    On CPU the KV budget is passed as ``kv_cache_memory_bytes``, and with our backend an unset
    ``max_num_seqs`` is sized from it (:func:`default_max_num_seqs`). On GPU the budget is only
    known once vLLM has profiled memory, so vLLM's default stands there.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs

    from kivi_serve.model.prepare import resolve_model

    path = model_path if model_path is not None else resolve_model(cfg.model)
    kwargs: dict[str, Any] = {
        "model": str(path),
        "tokenizer": str(path),
        "served_model_name": [served_name(cfg, Path(path))],
        "dtype": cfg.dtype,
        "seed": cfg.seed,
        "max_model_len": cfg.max_model_len,
        "block_size": cfg.page_size,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "pipeline_parallel_size": cfg.pipeline_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "max_num_seqs": cfg.max_num_seqs,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "enable_prefix_caching": cfg.enable_prefix_caching,
        "enforce_eager": cfg.enforce_eager,
        "worker_extension_cls": WORKER_EXTENSION,
        "disable_log_stats": False,
    }
    if is_cpu_platform():
        kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(cfg)
        if cfg.enforce_eager is None:
            # torch.compile on CPU costs startup time and needs a C++ toolchain; eager is what
            # the measurements in docs/performance.md use.
            kwargs["enforce_eager"] = True
    kwargs.update(backend_overrides(cfg))
    kwargs.update(extra)
    args = AsyncEngineArgs(**{k: v for k, v in kwargs.items() if v is not None})
    budget = kwargs.get("kv_cache_memory_bytes")
    if cfg.backend == "kivi" and args.max_num_seqs is None and budget:
        slot = staging_slot_bytes(args.create_model_config(), cfg.page_size, cfg.tensor_parallel_size)
        args.max_num_seqs = default_max_num_seqs(budget, slot)
        log.info(
            "max_num_seqs %d: the staging pool (%d slots of %.1f MiB) within 1/%d of the %.2f GiB KV budget",
            args.max_num_seqs,
            args.max_num_seqs + STAGING_HEADROOM,
            slot / 2**20,
            round(1 / STAGING_SHARE),
            budget / GiB,
        )
    return args
