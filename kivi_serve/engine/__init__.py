"""The adapter around vLLM's async engine that the server calls (the only part besides
``kivi_serve.backend`` that imports vLLM; importing this package itself does not)."""

from kivi_serve.engine.config import Backend, EngineConfig
from kivi_serve.engine.types import (
    BackendUnavailableError,
    CacheFacts,
    CompletionDelta,
    EngineError,
    EngineOverloadedError,
    EngineRequestError,
    EngineUnavailableError,
    SamplingOptions,
    StepOutput,
    TokenLogprob,
)

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "CacheFacts",
    "CompletionDelta",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineOverloadedError",
    "EngineRequestError",
    "EngineUnavailableError",
    "SamplingOptions",
    "StepOutput",
    "TokenLogprob",
    "build_engine_args",
    "kivi_backend_available",
]


def __getattr__(name: str):
    # Engine and build_engine_args import vLLM: load them on first use only.
    if name == "Engine":
        from kivi_serve.engine.adapter import Engine

        return Engine
    if name in ("build_engine_args", "kivi_backend_available"):
        from kivi_serve.engine import args

        return getattr(args, name)
    raise AttributeError(name)
