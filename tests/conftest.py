"""Shared pytest setup.

Markers (declared in pyproject.toml): ``cuda`` tests are skipped when torch sees no NVIDIA GPU;
``vllm`` marks tests that start a real vLLM engine; ``slow`` marks tests that take more than a few
seconds.
"""

from __future__ import annotations

import functools

import pytest


@functools.cache
def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs_gpu = [item for item in items if item.get_closest_marker("cuda") is not None]
    if needs_gpu and not cuda_available():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
        for item in needs_gpu:
            item.add_marker(skip)
