"""What the backend is told: page size, page format, staging slots. No vLLM import.

Settings come from, in order of precedence:

1. ``vllm_config.additional_config["kivi_serve"]`` — a dict with any of ``page_size``, ``scheme``,
   ``fp_pages``, ``staging_slots``, ``staging_dtype``, ``debug`` (what
   :func:`kivi_serve.backend.engine_overrides` writes);
2. environment variables ``KIVI_SERVE_PAGE_SIZE``, ``KIVI_SERVE_SCHEME``, ``KIVI_SERVE_FP_PAGES``
   (``1`` = full-precision debug pages), ``KIVI_SERVE_STAGING_SLOTS``, ``KIVI_SERVE_STAGING_DTYPE``
   (``int8`` or ``model``), ``KIVI_SERVE_DEBUG``
   (``1`` = check every step against vLLM's slot mapping; costs host syncs);
3. defaults: 128-token pages, the ``kivi-serve-2bit`` scheme, ``max_num_seqs + 4`` staging slots,
   int8 staging (model-dtype staging with ``fp_pages``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from kivi_serve.quant import staging as staging_format
from kivi_serve.quant.layout import DEFAULT_PAGE_SIZE, SUPPORTED_PAGE_SIZES
from kivi_serve.quant.schemes import DEFAULT_SCHEME, SCHEMES

#: Key of our section in ``vllm_config.additional_config``.
CONFIG_KEY = "kivi_serve"
#: Staging slots beyond ``max_num_seqs``: a sequence whose chunk starts mid-page and ends in a later
#: page pins two slots in one step (only continuing chunked prefills do; vLLM runs at most a few).
STAGING_HEADROOM = 4

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class KiviSettings:
    """Per-engine backend settings.

    Parameters
    ----------
    page_size : int
        Tokens per page == vLLM block size (one of 64, 128, 256).
    scheme : str
        The page format, a quantized scheme of :data:`kivi_serve.quant.schemes.SCHEMES`
        (``kivi-serve-2bit`` by default; ``-3bit``, ``-4bit`` and ``kivi2-uniform`` for comparisons).
    fp_pages : bool
        Debug mode: pages hold the model-dtype K/V bytes instead of 2-bit codes (same wiring).
    staging_slots : int or None
        Slots in the staging pool; ``None`` sizes it as ``max_num_seqs + STAGING_HEADROOM``.
    staging_dtype : str or None
        How a staging slot holds the open page (:data:`kivi_serve.quant.staging.STAGING_DTYPES`):
        ``int8`` (per-(token, head) scale, about half the bytes of bf16) or ``model`` (the model
        dtype, exact). ``None``: ``int8``, or ``model`` with ``fp_pages`` (whose point is exactness).
    debug : bool
        Check each step's pages against vLLM's slot mapping and each layer's plan ids (reads device
        data on the host every step, and turns CUDA graphs off for attention).
    """

    page_size: int = DEFAULT_PAGE_SIZE
    scheme: str = DEFAULT_SCHEME
    fp_pages: bool = False
    staging_slots: int | None = None
    staging_dtype: str | None = None
    debug: bool = False

    def __post_init__(self) -> None:
        if self.page_size not in SUPPORTED_PAGE_SIZES:
            raise ValueError(
                f"kivi-serve page_size must be one of {SUPPORTED_PAGE_SIZES}, got {self.page_size}"
            )
        quantized = [name for name, s in SCHEMES.items() if s.quantized]
        if self.scheme not in quantized:
            raise ValueError(f"kivi-serve scheme must be one of {quantized}, got {self.scheme!r}")
        SCHEMES[self.scheme].check_page_size(self.page_size)  # kivi-serve-2bit-p256: 256-token pages only
        if self.staging_slots is not None and self.staging_slots < 1:
            raise ValueError(f"kivi-serve staging_slots must be >= 1, got {self.staging_slots}")
        if self.staging_dtype is not None:
            staging_format.check_staging_dtype(self.staging_dtype)

    @property
    def mode(self) -> str:
        return "fp_pages" if self.fp_pages else "quantized"

    @property
    def staging_format(self) -> str:
        """The staging format in effect (``staging_dtype`` resolved)."""
        if self.staging_dtype is not None:
            return self.staging_dtype
        return "model" if self.fp_pages else staging_format.DEFAULT_STAGING_DTYPE

    def slots_for(self, max_num_seqs: int) -> int:
        return self.staging_slots if self.staging_slots is not None else int(max_num_seqs) + STAGING_HEADROOM

    def as_config(self) -> dict[str, Any]:
        """The ``additional_config["kivi_serve"]`` dict that reproduces these settings."""
        out: dict[str, Any] = {"page_size": self.page_size, "fp_pages": self.fp_pages}
        if self.scheme != DEFAULT_SCHEME:
            out["scheme"] = self.scheme
        if self.staging_slots is not None:
            out["staging_slots"] = self.staging_slots
        if self.staging_dtype is not None:
            out["staging_dtype"] = self.staging_dtype
        if self.debug:
            out["debug"] = True
        return out


def _env_settings() -> dict[str, Any]:
    out: dict[str, Any] = {}
    if v := os.environ.get("KIVI_SERVE_PAGE_SIZE"):
        out["page_size"] = int(v)
    if v := os.environ.get("KIVI_SERVE_SCHEME"):
        out["scheme"] = v.strip()
    if v := os.environ.get("KIVI_SERVE_FP_PAGES"):
        out["fp_pages"] = v.strip().lower() in _TRUE
    if v := os.environ.get("KIVI_SERVE_STAGING_SLOTS"):
        out["staging_slots"] = int(v)
    if v := os.environ.get("KIVI_SERVE_STAGING_DTYPE"):
        out["staging_dtype"] = v.strip()
    if v := os.environ.get("KIVI_SERVE_DEBUG"):
        out["debug"] = v.strip().lower() in _TRUE
    return out


def settings_from(additional_config: Any) -> KiviSettings:
    """Resolve settings from a vLLM ``additional_config`` (dict or None) plus the environment."""
    values = _env_settings()
    section = additional_config.get(CONFIG_KEY) if isinstance(additional_config, dict) else None
    if section is not None:
        if not isinstance(section, dict):
            raise ValueError(
                f"additional_config[{CONFIG_KEY!r}] must be a dict, got {type(section).__name__}"
            )
        known = {"page_size", "scheme", "fp_pages", "staging_slots", "staging_dtype", "debug"}
        unknown = set(section) - known
        if unknown:
            raise ValueError(f"unknown kivi-serve settings in additional_config: {sorted(unknown)}")
        values.update(section)
    return KiviSettings(
        page_size=int(values.get("page_size", DEFAULT_PAGE_SIZE)),
        scheme=str(values.get("scheme", DEFAULT_SCHEME)),
        fp_pages=bool(values.get("fp_pages", False)),
        staging_slots=None if values.get("staging_slots") is None else int(values["staging_slots"]),
        staging_dtype=None if values.get("staging_dtype") is None else str(values["staging_dtype"]),
        debug=bool(values.get("debug", False)),
    )
