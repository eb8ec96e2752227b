"""The adapter around vLLM's async engine that the server calls (the only part besides
``kivi_serve.backend`` that imports vLLM; importing this package itself does not).

:class:`Engine` (vLLM's ``AsyncLLM`` behind a small API) and :class:`EngineConfig` live here; the
plain data that crosses the boundary (requests, steps, cache facts, errors) in
:mod:`kivi_serve.engine.types`.
"""

from kivi_serve.engine.config import EngineConfig

__all__ = ["Engine", "EngineConfig"]


def __getattr__(name: str):
    # Engine imports vLLM: load it on first use only.
    if name == "Engine":
        from kivi_serve.engine.adapter import Engine

        return Engine
    raise AttributeError(name)
