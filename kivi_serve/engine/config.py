"""What a user may choose about the engine; everything else about vLLM stays inside the adapter.

:class:`EngineConfig` is the one definition of these options: the server's settings
(:class:`kivi_serve.server.settings.ServeSettings`) derive from it, so a field here is also the
``kivi-serve serve`` flag ``--<field>`` and the variable ``KIVI_SERVE_<FIELD>``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kivi_serve.config import EMBEDDED_MODEL
from kivi_serve.quant.layout import DEFAULT_PAGE_SIZE, SUPPORTED_PAGE_SIZES

Backend = Literal["kivi", "default"]


class EngineConfig(BaseModel):
    """Engine settings.

    ``backend="kivi"`` runs our 2-bit paged attention backend (``kivi_serve.backend``), with a page
    size of :data:`~kivi_serve.quant.layout.SUPPORTED_PAGE_SIZES`; ``"default"`` runs vLLM's own
    backend at the same block size, for comparison. ``kv_cache_space`` is the KV cache budget on
    CPU in GiB (``None``: ``VLLM_CPU_KVCACHE_SPACE`` if set, else 2 GiB); on GPU the budget comes
    from ``gpu_memory_utilization``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = EMBEDDED_MODEL
    served_model_name: str | None = None
    backend: Backend = "kivi"
    page_size: int = Field(DEFAULT_PAGE_SIZE, ge=16)
    max_model_len: int | None = Field(None, ge=16)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    kv_cache_space: float | None = Field(None, gt=0.0)
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    enable_prefix_caching: bool | None = None
    seed: int = 0
    dtype: str = "auto"
    enforce_eager: bool | None = None

    @model_validator(mode="after")
    def _page_size_fits_the_backend(self):
        if self.backend == "kivi" and self.page_size not in SUPPORTED_PAGE_SIZES:
            raise ValueError(
                f"page_size {self.page_size} is not one of the kivi backend's page sizes "
                f"{', '.join(map(str, SUPPORTED_PAGE_SIZES))}"
            )
        return self
