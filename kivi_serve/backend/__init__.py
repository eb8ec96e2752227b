"""kivi-serve's vLLM attention backend: paged 2-bit KV blocks (one page per vLLM block).

Importing this package is cheap (no vLLM, no torch): vLLM loads it through the entry point
``vllm.general_plugins: kivi_serve = "kivi_serve.backend:register"`` in every process that builds
or runs an engine. The heavy parts live in submodules:

- :mod:`~kivi_serve.backend.attention` — ``KiviAttentionBackend`` / ``KiviMetadataBuilder`` /
  ``KiviAttentionImpl`` (the only module here that imports vLLM classes, with ``cpu_selector``);
- :mod:`~kivi_serve.backend.prefill_cpu` — CPU prefill through vLLM's own CPU attention op;
- :mod:`~kivi_serve.backend.planner` — the staging pool on the device: each step's plan, no host sync;
- :mod:`~kivi_serve.backend.executors` — the kernels a layer calls: CUDA or C++ (CPU), or the reference;
- :mod:`~kivi_serve.backend.runtime` — per-engine state: settings, codec, pools, stats;
- :mod:`~kivi_serve.backend.staging` — the plan's types and the staging pool's rules in plain Python;
- :mod:`~kivi_serve.backend.settings` — page size, scheme, fp_pages debug pages, staging slots, debug;
- :mod:`~kivi_serve.backend.stats` — :class:`BackendStats`, what :func:`cache_stats` reports.

Public API (stable): :func:`register`, :func:`engine_overrides`, :func:`cache_stats`,
:func:`release_finished`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from kivi_serve.backend.stats import BackendStats

__all__ = [
    "register",
    "engine_overrides",
    "cache_stats",
    "release_finished",
    "BackendStats",
    "BACKEND_PATH",
    "ENV_DISABLE",
]

#: Dotted path of the backend class (what ``CUSTOM`` resolves to).
BACKEND_PATH = "kivi_serve.backend.attention.KiviAttentionBackend"
#: Set to 1 to make :func:`register` a no-op (plain vLLM in a process where kivi-serve is installed).
ENV_DISABLE = "KIVI_SERVE_DISABLE"


def register() -> None:
    """Register the backend with vLLM (idempotent; the ``vllm.general_plugins`` entry point).

    - ``AttentionBackendEnum.CUSTOM`` → :data:`BACKEND_PATH` (GPU: ``--attention-backend CUSTOM``);
    - on the CPU platform, which ignores CUSTOM, ``CPU_ATTN`` → ``kivi_serve.backend.cpu_selector``, which
      hands out our backend to engines that asked for CUSTOM and vLLM's own CPU backend to all others.

    Does nothing when ``KIVI_SERVE_DISABLE=1``.
    """
    if os.environ.get(ENV_DISABLE, "").strip().lower() in {"1", "true", "yes", "on"}:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from kivi_serve.backend.cpu_selector import CPU_ATTN_PATH

        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_ATTN_PATH)


def engine_overrides(
    page_size: int | None = None,
    *,
    scheme: str | None = None,
    fp_pages: bool = False,
    staging_slots: int | None = None,
    staging_dtype: str | None = None,
) -> dict[str, Any]:
    """vLLM engine arguments that run an engine on kivi-serve's backend.

    Parameters
    ----------
    page_size : int
        Tokens per page == vLLM block size: 64, 128 or 256; ``None``: the scheme's own page size
        (256 for the ``-p256`` schemes, else 128).
    scheme : str or None, keyword-only
        The page format (a quantized scheme of ``kivi_serve.quant.schemes``); default ``kivi-serve-2bit``.
    fp_pages : bool, keyword-only
        Debug mode: pages hold full-precision K/V (same wiring, no quantization; ~6x less capacity).
    staging_slots : int or None, keyword-only
        Staging-pool slots; default ``max_num_seqs + 4``.
    staging_dtype : str or None, keyword-only
        ``int8`` (compact, the default) or ``model`` (exact; the default with ``fp_pages``).

    Returns
    -------
    dict
        ``{"attention_backend": "CUSTOM", "block_size": page_size, "additional_config":
        {"kivi_serve": {"page_size": page_size, "fp_pages": fp_pages[, "staging_slots": n]}}}``, to merge into
        ``EngineArgs`` / ``AsyncEngineArgs`` / ``LLM(...)`` keyword arguments. The same dict selects the
        backend on CPU and GPU (on CPU, vLLM logs "Cannot use CUSTOM backend on CPU" and then resolves
        ``CPU_ATTN``, which the plugin routes to kivi-serve for this engine only). If the caller has its
        own ``additional_config``, merge the ``"kivi_serve"`` key into it.
    """
    from kivi_serve.backend.settings import KiviSettings

    extra = {} if scheme is None else {"scheme": scheme}
    if staging_dtype is not None:
        extra["staging_dtype"] = staging_dtype
    settings = KiviSettings(
        page_size=None if page_size is None else int(page_size),
        fp_pages=bool(fp_pages),
        staging_slots=staging_slots,
        **extra,
    )
    return {
        "attention_backend": "CUSTOM",
        "block_size": settings.page_size,
        "additional_config": {"kivi_serve": settings.as_config()},
    }


def cache_stats(vllm_config: Any = None) -> BackendStats:
    """Live numbers of the kivi-serve engine of ``vllm_config`` in *this process* (default: the newest).

    With vLLM multiprocessing (``AsyncLLM``, ``VLLM_ENABLE_V1_MULTIPROCESSING=1``) the backend runs
    in the engine-core / worker process, so call this there (e.g. through a worker extension and
    ``collective_rpc``); in the front-end process it reports ``active=False``.

    Returns
    -------
    BackendStats
        See :class:`kivi_serve.backend.stats.BackendStats` (all zero, ``active=False``, when no
        kivi-serve engine exists in this process).
    """
    from kivi_serve.backend.runtime import INACTIVE_STATS, latest_runtime, runtime_of

    rt = latest_runtime() if vllm_config is None else runtime_of(vllm_config)
    return INACTIVE_STATS if rt is None else rt.stats()


def release_finished(model_runner: Any) -> None:
    """Free the staging slots of requests vLLM has finished, aborted or preempted.

    Call it in the worker, between steps, with the worker's model runner (the engine adapter's stats
    probe does, so ``staging_slots_in_use`` returns to 0 once the engine is idle). A slot whose block no
    live request holds belongs to a request that is gone; without this call such slots are reclaimed
    only when vLLM hands their block out again, or taken back when the pool runs short.
    """
    from kivi_serve.backend.runtime import live_blocks, runtime_of

    config = getattr(model_runner, "vllm_config", None)
    rt = runtime_of(config) if config is not None else None
    if rt is None:
        return
    blocks = live_blocks(model_runner)
    if blocks is not None:
        rt.release_finished(blocks)


def paged_bf16_decode() -> Any:
    """vLLM's ``flash_attn_with_kvcache`` (the bf16 paged decode baseline of ``kivi-serve bench
    kernels``), or ``None`` where vLLM's GPU build is not installed. Lives here because only the
    backend and the engine adapter import vLLM."""
    try:
        from vllm.vllm_flash_attn import flash_attn_with_kvcache  # type: ignore
    except Exception:  # noqa: BLE001 — any import failure means "baseline not available"
        return None
    return flash_attn_with_kvcache


@functools.cache
def paged_bf16_decode_cpu() -> Any:
    """vLLM's own CPU paged attention (the baseline of ``kivi-serve bench kernels --device cpu``), or
    ``None`` where vLLM's CPU build is not installed: a namespace with ``scheduler_metadata``
    (``_custom_ops.cpu_attn_get_scheduler_metadata``), ``attention``
    (``_custom_ops.cpu_attention_with_kv_cache``), ``reshape_and_cache``
    (``_custom_ops.cpu_attn_reshape_and_cache``) and ``isa(dtype, block_size, head_size)`` (the kernel
    variant vLLM's CPU backend picks, ``cpu_attn._get_attn_isa``). Looked up once (the prefill path
    asks for it every layer)."""
    try:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        if not hasattr(ops, "cpu_attention_with_kv_cache"):
            return None
    except Exception:  # noqa: BLE001 — any import failure means "baseline not available"
        return None
    from types import SimpleNamespace

    return SimpleNamespace(
        scheduler_metadata=ops.cpu_attn_get_scheduler_metadata,
        attention=ops.cpu_attention_with_kv_cache,
        reshape_and_cache=ops.cpu_attn_reshape_and_cache,
        isa=_get_attn_isa,
    )
