"""What vLLM resolves ``CPU_ATTN`` to once kivi-serve is registered (CPU platform only).

vLLM's CPU platform ignores ``--attention-backend CUSTOM`` and always asks for ``CPU_ATTN``. The
plugin registers :data:`CPU_ATTN_PATH` over ``CPU_ATTN``; vLLM imports this module and reads the
attribute ``CPUAttention`` while it builds the model, with the engine's config current. This
module's ``__getattr__`` then answers per engine:

- the engine asked for ``attention_backend="CUSTOM"`` (what
  :func:`kivi_serve.backend.engine_overrides` sets) → :class:`KiviAttentionBackend`;
- otherwise → vLLM's own ``CPUAttentionBackend``, untouched.

So installing kivi-serve never changes what a plain vLLM engine runs, and one process can hold a
kivi-serve engine and a stock one side by side (the capacity and exact-mode tests do).
"""

from __future__ import annotations

CPU_ATTN_PATH = "kivi_serve.backend.cpu_selector.CPUAttention"


def wants_kivi() -> bool:
    """Whether the engine whose config is current selected the CUSTOM backend."""
    from vllm.config import get_current_vllm_config_or_none
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    cfg = get_current_vllm_config_or_none()
    if cfg is None:
        return False
    return cfg.attention_config.backend == AttentionBackendEnum.CUSTOM


def __getattr__(name: str):
    if name != "CPUAttention":
        raise AttributeError(name)
    if wants_kivi():
        from kivi_serve.backend.attention import KiviAttentionBackend

        return KiviAttentionBackend
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return CPUAttentionBackend
