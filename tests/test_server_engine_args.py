"""The engine adapter without starting an engine: vLLM engine args from EngineConfig (backend
selection, block size, CPU KV budget) and the cache-facts arithmetic from real-shaped inputs."""

from __future__ import annotations

import pytest

from kivi_serve.engine import EngineConfig
from kivi_serve.engine.facts import compute_facts
from kivi_serve.engine.stats import SchedulerSnapshot
from kivi_serve.engine.types import BackendUnavailableError

GiB = 1 << 30
#: SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64 → 23040 bf16 K+V bytes per token.
DIMS = (30, 3, 64)


@pytest.fixture(scope="module")
def model_path():
    from kivi_serve.model.prepare import embedded_model_dir, is_prepared

    folder = embedded_model_dir()
    if not is_prepared(folder):
        pytest.skip("the embedded model is not prepared: run `kivi-serve model prepare` (make test does)")
    return folder


def test_default_backend_args(model_path, monkeypatch):
    pytest.importorskip("vllm")
    from kivi_serve.engine.args import WORKER_EXTENSION, build_engine_args, is_cpu_platform

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    args = build_engine_args(
        EngineConfig(backend="default", page_size=64, kv_cache_space_gib=0.5, max_num_seqs=7, seed=3),
        model_path,
    )
    assert args.block_size == 64 and args.max_num_seqs == 7 and args.seed == 3
    assert args.served_model_name == ["smollm2"]
    assert args.worker_extension_cls == WORKER_EXTENSION
    assert args.attention_backend is None  # vLLM picks its own
    if is_cpu_platform():
        assert args.kv_cache_memory_bytes == GiB // 2
        assert args.enforce_eager is True
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    if is_cpu_platform():
        assert build_engine_args(EngineConfig(backend="default"), model_path).kv_cache_memory_bytes == 3 * GiB


def test_kivi_backend_args_use_the_backends_overrides(model_path):
    pytest.importorskip("vllm")
    from kivi_serve.engine.args import build_engine_args, kivi_backend_api

    api = kivi_backend_api()
    if api is None:
        pytest.skip("kivi_serve.backend.engine_overrides does not exist yet")
    args = build_engine_args(EngineConfig(backend="kivi", page_size=128), model_path)
    for key, value in api.engine_overrides(128).items():
        got = getattr(args, key)
        assert str(got) == str(value) or got == value, (key, got, value)
    assert args.block_size == 128


def test_missing_kivi_backend_is_a_readable_error(monkeypatch):
    from kivi_serve.engine import args as engine_args

    monkeypatch.setattr(engine_args, "kivi_backend_api", lambda: None)
    with pytest.raises(BackendUnavailableError, match="--backend default"):
        engine_args.backend_overrides(EngineConfig(backend="kivi"))
    assert engine_args.backend_overrides(EngineConfig(backend="default")) == {}


def _layout(num_blocks: int, page_size_bytes: int, heads: int = 3, layers: int = 30) -> dict:
    return {
        "num_blocks": num_blocks,
        "tensor_bytes": num_blocks * page_size_bytes * layers,
        "groups": [{"layers": layers, "num_kv_heads": heads, "page_size_bytes": page_size_bytes}],
    }


def test_facts_for_vllms_default_backend_are_bf16():
    # what vLLM allocates for SmolLM2 at 2 GiB: 728 blocks of 128 tokens, 3 heads x 128 x 64 x 2 (K,V) x 2 B
    page = 3 * 128 * 64 * 2 * 2
    f = compute_facts(
        backend="default",
        attention_impl="x",
        kv_cache_dtype="torch.bfloat16",
        block_size=128,
        num_blocks=728,
        layouts=[_layout(728, page)],
        stats={},
        snapshot=SchedulerSnapshot(kv_usage=0.25),
        model_dims=DIMS,
    )
    assert f.capacity_tokens == 93184
    assert f.compression_vs_bf16 == pytest.approx(1.0) and f.bits_per_element == pytest.approx(16.0)
    assert f.page_bytes == 128 * 64 * 2 * 2
    assert (
        f.kv_bytes_used == round(0.25 * f.kv_bytes_total)
        and f.kv_bytes_free == f.kv_bytes_total - f.kv_bytes_used
    )


def test_facts_for_kivi_count_the_staging_pool():
    page_bytes = 5376  # one kivi page (one layer, one head) at P=128, D=64
    stats = {
        "page_bytes": page_bytes,
        "staging_slots_total": 10,
        "staging_slots_in_use": 2,
        "staging_bytes": 10 * 30 * 3 * 128 * 64 * 2 * 2,
        "early_finalisations": 4,
    }
    f = compute_facts(
        backend="kivi",
        attention_impl="kivi",
        kv_cache_dtype="torch.uint8",
        block_size=128,
        num_blocks=3633,
        layouts=[_layout(3633, 3 * page_bytes)],
        stats=stats,
        snapshot=SchedulerSnapshot(running=1),
        model_dims=DIMS,
    )
    pages = 3633 * 3 * page_bytes * 30
    assert f.kv_bytes_total == pages + stats["staging_bytes"]
    assert f.compression_vs_bf16 == pytest.approx(23040 * 3633 * 128 / f.kv_bytes_total)
    assert f.page_bits_per_element == pytest.approx(page_bytes * 8 / (2 * 128 * 64))
    assert f.bits_per_element == pytest.approx(16 / f.compression_vs_bf16)
    assert f.kv_bytes_used == 2 * stats["staging_bytes"] // 10
    assert f.early_finalisations == 4 and f.running == 1
