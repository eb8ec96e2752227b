"""What the backend is told: page size, page format, staging slots. No vLLM import.

Settings come from, in order of precedence:

1. ``vllm_config.additional_config["kivi_serve"]`` — a dict with any of ``page_size``, ``scheme``,
   ``fp_pages``, ``staging_slots``, ``staging_dtype``, ``debug`` (what
   :func:`kivi_serve.backend.engine_overrides` writes);
2. environment variables ``KIVI_SERVE_PAGE_SIZE``, ``KIVI_SERVE_SCHEME``, ``KIVI_SERVE_FP_PAGES``
   (``1`` = full-precision debug pages), ``KIVI_SERVE_STAGING_SLOTS``, ``KIVI_SERVE_STAGING_DTYPE``
   (``int8`` or ``model``), ``KIVI_SERVE_DEBUG``
   (``1`` = check every step against vLLM's slot mapping; costs host syncs);
3. defaults: the ``kivi-serve-2bit`` scheme, the scheme's page size (128 tokens; 256 for a scheme
   defined for 256-token pages, so ``KIVI_SERVE_SCHEME`` alone selects a complete format),
   ``max_num_seqs + 4`` staging slots, int8 staging (model-dtype staging with ``fp_pages``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from kivi_serve.quant import staging as staging_format
from kivi_serve.quant.layout import SUPPORTED_PAGE_SIZES
from kivi_serve.quant.schemes import DEFAULT_SCHEME, REFERENCE_SCHEMES, SCHEMES, SERVED_SCHEMES

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
    page_size : int or None
        Tokens per page == vLLM block size (one of 64, 128, 256). ``None`` (the default): the scheme's
        own page size (:attr:`~kivi_serve.quant.schemes.Scheme.default_page_size`); after
        construction it is always an int.
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

    page_size: int | None = None
    scheme: str = DEFAULT_SCHEME
    fp_pages: bool = False
    staging_slots: int | None = None
    staging_dtype: str | None = None
    debug: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in SERVED_SCHEMES:
            why = (" (a reference-only format: the accuracy harness reads it, no kernel does yet)"
                   if self.scheme in REFERENCE_SCHEMES else "")
            raise ValueError(
                f"kivi-serve scheme must be one of {list(SERVED_SCHEMES)}, got {self.scheme!r}{why}"
            )
        if self.page_size is None:  # the scheme brings its page size (frozen: set once, here)
            object.__setattr__(self, "page_size", SCHEMES[self.scheme].default_page_size)
        if self.page_size not in SUPPORTED_PAGE_SIZES:
            raise ValueError(
                f"kivi-serve page_size must be one of {SUPPORTED_PAGE_SIZES}, got {self.page_size}"
            )
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


def _flag(text: str) -> bool:
    return text.strip().lower() in _TRUE


def _optional(kind):
    return lambda v: None if v is None else kind(v)


#: Each setting: its environment variable, how the variable's text is read, and how a value from
#: ``additional_config`` is taken.
_SOURCES = {
    "page_size": ("KIVI_SERVE_PAGE_SIZE", int, int),
    "scheme": ("KIVI_SERVE_SCHEME", str.strip, str),
    "fp_pages": ("KIVI_SERVE_FP_PAGES", _flag, bool),
    "staging_slots": ("KIVI_SERVE_STAGING_SLOTS", int, _optional(int)),
    "staging_dtype": ("KIVI_SERVE_STAGING_DTYPE", str.strip, _optional(str)),
    "debug": ("KIVI_SERVE_DEBUG", _flag, bool),
}


def settings_from(additional_config: Any) -> KiviSettings:
    """Resolve settings from a vLLM ``additional_config`` (dict or None) plus the environment."""
    values = {name: read(text) for name, (var, read, _) in _SOURCES.items() if (text := os.environ.get(var))}
    section = additional_config.get(CONFIG_KEY) if isinstance(additional_config, dict) else None
    if section is not None:
        if not isinstance(section, dict):
            raise ValueError(
                f"additional_config[{CONFIG_KEY!r}] must be a dict, got {type(section).__name__}"
            )
        unknown = set(section) - set(_SOURCES)
        if unknown:
            raise ValueError(f"unknown kivi-serve settings in additional_config: {sorted(unknown)}")
        values.update({name: _SOURCES[name][2](v) for name, v in section.items()})
    return KiviSettings(**values)
