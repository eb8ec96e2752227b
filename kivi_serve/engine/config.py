"""What a user may choose about the engine; everything else about vLLM stays inside the adapter.

:class:`EngineConfig` is the one definition of these options: the server's settings
(:class:`kivi_serve.server.settings.ServeSettings`) derive from it, so a field here is also the
``kivi-serve serve`` flag ``--<field>`` and the variable ``KIVI_SERVE_<FIELD>``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kivi_serve.config import EMBEDDED_MODEL
from kivi_serve.quant.layout import DEFAULT_PAGE_SIZE, SUPPORTED_PAGE_SIZES
from kivi_serve.quant.schemes import DEFAULT_SCHEME, SCHEMES, SERVED_SCHEMES

Backend = Literal["kivi", "default"]
SchemeName = Literal[SERVED_SCHEMES]  # type: ignore[valid-type]  (the choices, built from SCHEMES)


class EngineConfig(BaseModel):
    """Engine settings; each field's description is its ``--help`` text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(
        EMBEDDED_MODEL,
        description=f"Model folder (Hugging Face layout), or '{EMBEDDED_MODEL}' for the embedded "
        "SmolLM2-135M-Instruct.",
    )
    served_model_name: str | None = Field(
        None, description="Model name clients pass as `model` (default: the model's name)."
    )
    backend: Backend = Field(
        "kivi",
        description="KV cache: 'kivi' (2-bit paged, this project) or 'default' (vLLM's own, bf16; for "
        "comparison).",
    )
    scheme: SchemeName = Field(
        DEFAULT_SCHEME,
        description="kivi: the page format (docs/accuracy.md); kivi-serve-2bit-p256-vr (256-token pages) "
        "keeps long-context facts best at the same 2.5 bits.",
    )
    page_size: int = Field(
        DEFAULT_PAGE_SIZE,
        ge=16,
        description=f"Tokens per KV page = vLLM block size (kivi: {str(SUPPORTED_PAGE_SIZES)[1:-1]}; "
        "default: the scheme's own page size, else 128).",
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Context length in tokens (prompt + completion); default: the model's."
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="GPU only: fraction of GPU memory for weights, activations and KV cache.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="Number of GPUs to shard each layer over.")
    pipeline_parallel_size: int = Field(1, ge=1, description="Number of pipeline stages.")
    kv_cache_space: float | None = Field(
        None,
        gt=0.0,
        description="CPU only: KV cache budget in GiB (default: VLLM_CPU_KVCACHE_SPACE, else 2).",
    )
    max_num_seqs: int | None = Field(
        None,
        ge=1,
        description="Most sequences the engine runs at once (default: with backend 'kivi' on CPU, as many "
        "as keep the staging pool within 1/16 of the KV budget, at most 128; else vLLM's).",
    )
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="Most tokens per engine step (default: vLLM's)."
    )
    enable_prefix_caching: bool | None = Field(
        None, description="Reuse KV pages of identical prompt prefixes (default: vLLM's)."
    )
    seed: int = Field(0, description="Engine random seed (a request's `seed` overrides it for that request).")
    dtype: str = Field(
        "auto", description="Model weights/activations dtype: auto, bfloat16, float16, float32."
    )
    enforce_eager: bool | None = Field(
        None, description="Run the model eagerly, no torch.compile / CUDA graphs (default: on for CPU)."
    )

    @model_validator(mode="before")
    @classmethod
    def _page_size_from_the_scheme(cls, data: Any) -> Any:
        # A scheme defined for one page size (kivi-serve-2bit-p256*: 256) brings it along when the
        # user did not choose one, so `--scheme` alone is enough.
        if isinstance(data, dict) and data.get("page_size") is None and data.get("backend", "kivi") == "kivi":
            scheme = SCHEMES.get(str(data.get("scheme", DEFAULT_SCHEME)))
            if scheme is not None:
                data = {**data, "page_size": scheme.default_page_size}
        return data

    @model_validator(mode="after")
    def _page_size_fits_the_backend(self):
        if self.backend != "kivi":
            return self
        if self.page_size not in SUPPORTED_PAGE_SIZES:
            raise ValueError(
                f"page_size {self.page_size} is not one of the kivi backend's page sizes "
                f"{', '.join(map(str, SUPPORTED_PAGE_SIZES))}"
            )
        SCHEMES[self.scheme].check_page_size(self.page_size)
        return self
