"""Shared pytest setup.

Markers (declared in pyproject.toml): ``cuda`` tests are skipped when torch sees no NVIDIA GPU;
``vllm`` marks tests that start a real vLLM engine; ``slow`` marks tests that take more than a few
seconds.
"""

from __future__ import annotations

import functools
import os

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


# The vLLM engine tests' shared inputs (a module that needs another model defines its own `model`).
@pytest.fixture(scope="module")
def model():
    if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        pytest.skip("set VLLM_CPU_KVCACHE_SPACE (GiB) to run vLLM engine tests on CPU")
    from kivi_serve.model.prepare import resolve_model

    return str(resolve_model("smollm2"))


@pytest.fixture(scope="module")
def tok(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)
