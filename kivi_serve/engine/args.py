"""EngineConfig → vLLM ``AsyncEngineArgs``: the one place that knows vLLM's engine flags.

Our attention backend is selected by ``kivi_serve.backend.engine_overrides(page_size)`` (the
backend owns how it is selected: ``attention_backend``, block size, ...); vLLM's default backend
runs at the same block size so the two are comparable.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from kivi_serve.config import EMBEDDED_MODEL
from kivi_serve.engine.config import EngineConfig
from kivi_serve.engine.types import BackendUnavailableError

GiB = 1 << 30
#: KV cache budget on CPU when neither the config nor VLLM_CPU_KVCACHE_SPACE gives one.
DEFAULT_CPU_KV_GIB = 2.0
WORKER_EXTENSION = "kivi_serve.engine.worker_ext.KiviWorkerExtension"


def kivi_backend_api() -> ModuleType | None:
    """``kivi_serve.backend`` if it provides ``engine_overrides`` and ``cache_stats``, else None."""
    try:
        mod = importlib.import_module("kivi_serve.backend")
    except ImportError:
        return None
    if callable(getattr(mod, "engine_overrides", None)) and callable(getattr(mod, "cache_stats", None)):
        return mod
    return None


def kivi_backend_available() -> bool:
    return kivi_backend_api() is not None


def backend_overrides(cfg: EngineConfig) -> dict[str, Any]:
    """Engine-arg overrides that select ``cfg.backend``; raises a readable error if it is missing."""
    if cfg.backend == "default":
        return {}
    api = kivi_backend_api()
    if api is None:
        raise BackendUnavailableError(
            "backend 'kivi' is not available in this build (kivi_serve.backend does not provide "
            "engine_overrides/cache_stats yet); run with --backend default to use vLLM's own attention"
        )
    return dict(api.engine_overrides(cfg.page_size))


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def served_name(cfg: EngineConfig, model_path: Path) -> str:
    if cfg.served_model_name:
        return cfg.served_model_name
    return EMBEDDED_MODEL if cfg.model == EMBEDDED_MODEL else model_path.name


def cpu_kv_cache_bytes(cfg: EngineConfig) -> int:
    """The CPU KV budget in bytes: the config, else VLLM_CPU_KVCACHE_SPACE (GiB), else 2 GiB."""
    if cfg.kv_cache_space_gib is not None:
        return int(cfg.kv_cache_space_gib * GiB)
    env = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
    return int(float(env) * GiB) if env else int(DEFAULT_CPU_KV_GIB * GiB)


def build_engine_args(cfg: EngineConfig, model_path: Path | None = None, **extra: Any):
    """The ``AsyncEngineArgs`` for ``cfg`` (``extra`` are raw vLLM engine args, for experiments).

    On CPU the KV budget is passed as ``kv_cache_memory_bytes``; vLLM's CPU platform lets
    ``VLLM_CPU_KVCACHE_SPACE`` override that, so :meth:`Engine.start` keeps the variable consistent.
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
        "shutdown_timeout": cfg.shutdown_timeout,
    }
    if is_cpu_platform():
        kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(cfg)
        if cfg.enforce_eager is None:
            # torch.compile on CPU costs startup time and needs a C++ toolchain; eager is what
            # the measurements in docs/performance.md use.
            kwargs["enforce_eager"] = True
    kwargs.update(backend_overrides(cfg))
    kwargs.update(extra)
    return AsyncEngineArgs(**{k: v for k, v in kwargs.items() if v is not None})
