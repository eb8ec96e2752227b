"""What a user may choose about the engine; everything else about vLLM stays inside the adapter."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kivi_serve.config import EMBEDDED_MODEL

Backend = Literal["kivi", "default"]


class EngineConfig(BaseModel):
    """Engine settings (the server's flags of the same names map here one to one).

    ``backend="kivi"`` runs our 2-bit paged attention backend (``kivi_serve.backend``);
    ``"default"`` runs vLLM's own backend at the same block size, for comparison.
    ``kv_cache_space_gib`` is the KV cache budget on CPU (``None``: ``VLLM_CPU_KVCACHE_SPACE`` if
    set, else 2 GiB); on GPU the budget comes from ``gpu_memory_utilization``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(EMBEDDED_MODEL, description="Model folder, or 'smollm2' for the embedded model.")
    served_model_name: str | None = Field(None, description="Name clients use (default: model name).")
    backend: Backend = "kivi"
    page_size: int = Field(128, ge=16, description="Tokens per KV page (= vLLM block size).")
    max_model_len: int | None = Field(None, ge=16)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    kv_cache_space_gib: float | None = Field(None, gt=0.0)
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    enable_prefix_caching: bool | None = None
    seed: int = 0
    dtype: str = "auto"
    enforce_eager: bool | None = None
    #: Seconds the engine process keeps draining in-flight requests when it gets SIGTERM itself
    #: (e.g. a signal sent to the whole process group); 0 aborts them at once.
    shutdown_timeout: int = Field(0, ge=0)
