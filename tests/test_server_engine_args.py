"""The engine adapter without starting an engine: vLLM engine args from EngineConfig (backend
selection, block size, CPU KV budget, the staging-sized max_num_seqs), the backend stats merged
over workers, and the cache-facts arithmetic from real-shaped inputs."""

from __future__ import annotations

import pytest

from kivi_serve.backend.stats import BackendStats
from kivi_serve.engine import EngineConfig
from kivi_serve.engine.facts import compute_facts
from kivi_serve.engine.stats import SchedulerSnapshot

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
        EngineConfig(backend="default", page_size=64, kv_cache_space=0.5, max_num_seqs=7, seed=3),
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


def test_kivi_backend_args_use_the_backends_overrides_and_size_max_num_seqs(model_path, monkeypatch):
    pytest.importorskip("vllm")
    from kivi_serve.backend import engine_overrides
    from kivi_serve.engine.args import build_engine_args, is_cpu_platform

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("KIVI_SERVE_STAGING_DTYPE", raising=False)
    args = build_engine_args(EngineConfig(backend="kivi", page_size=128, kv_cache_space=2), model_path)
    for key, value in engine_overrides(128).items():
        got = getattr(args, key)
        assert str(got) == str(value) or got == value, (key, got, value)
    assert args.block_size == 128
    if is_cpu_platform():
        # SmolLM2, int8 staging rows (64 codes + a 4-byte scale): a slot is 30 layers x K,V x 3 heads
        # x 128 tokens x 68 B = 1,566,720 B; 1/16 of 2 GiB holds 85 slots, 4 of them the pool's
        # headroom (bf16 staging: 2,949,120 B, 45 slots, 41 sequences).
        assert args.max_num_seqs == 81
        monkeypatch.setenv("KIVI_SERVE_STAGING_DTYPE", "model")
        cfg = EngineConfig(backend="kivi", page_size=128, kv_cache_space=2)
        assert build_engine_args(cfg, model_path).max_num_seqs == 41
    assert build_engine_args(EngineConfig(max_num_seqs=9), model_path).max_num_seqs == 9


def test_default_max_num_seqs_keeps_staging_within_its_share():
    from kivi_serve.engine.args import MAX_DEFAULT_NUM_SEQS, STAGING_SHARE, default_max_num_seqs

    slot = 2_949_120
    for gib in (0.25, 1, 2, 4, 8):
        budget = int(gib * GiB)
        seqs = default_max_num_seqs(budget, slot)
        staging = (seqs + 4) * slot
        if 1 < seqs < MAX_DEFAULT_NUM_SEQS:
            assert staging <= STAGING_SHARE * budget < staging + slot, gib
    assert default_max_num_seqs(64 * GiB, slot) == MAX_DEFAULT_NUM_SEQS
    assert default_max_num_seqs(10 * slot, slot) == 1  # a budget too small for the share: still one


def test_kivi_page_size_is_one_the_backend_supports():
    from pydantic import ValidationError

    from kivi_serve.quant.layout import SUPPORTED_PAGE_SIZES

    for page in SUPPORTED_PAGE_SIZES:
        assert EngineConfig(page_size=page).page_size == page
    with pytest.raises(ValidationError, match="page sizes 64, 128, 256"):
        EngineConfig(page_size=96)
    assert EngineConfig(backend="default", page_size=96).page_size == 96  # vLLM's own block sizes


def test_scheme_is_an_engine_option_that_brings_its_page_size(monkeypatch):
    """`--scheme` alone serves a 256-token-page format at 256; a contradicting page size, an unknown or
    unquantized scheme are errors before any engine starts; the scheme reaches the backend's config."""
    from pydantic import ValidationError

    from kivi_serve.engine.args import backend_overrides
    from kivi_serve.server.settings import SettingsError, parse_args

    vr = "kivi-serve-2bit-p256-vr"
    assert EngineConfig().scheme == "kivi-serve-2bit" and EngineConfig().page_size == 128
    assert EngineConfig(scheme=vr).page_size == 256
    assert EngineConfig(scheme="kivi-serve-4bit").page_size == 128  # any page size: the default
    assert EngineConfig(scheme="kivi-serve-4bit", page_size=64).page_size == 64
    with pytest.raises(ValidationError, match="defined for 256-token pages, got page size 128"):
        EngineConfig(scheme=vr, page_size=128)
    for bad in ("fp16", "kivi-serve-1bit"):
        with pytest.raises(ValidationError, match="scheme"):
            EngineConfig(scheme=bad)
    # vLLM's own backend ignores the scheme (and does not take its page size)
    assert EngineConfig(backend="default", scheme=vr).page_size == 128
    assert backend_overrides(EngineConfig(backend="default", scheme=vr)) == {}

    over = backend_overrides(EngineConfig(scheme=vr))
    assert over["block_size"] == 256
    assert over["additional_config"]["kivi_serve"] == {"page_size": 256, "fp_pages": False, "scheme": vr}

    monkeypatch.setenv("KIVI_SERVE_SCHEME", vr)  # the environment layer of the server's settings
    assert (parse_args([]).scheme, parse_args([]).page_size) == (vr, 256)
    with pytest.raises(SettingsError, match="256-token pages"):
        parse_args(["--page-size", "64"])
    monkeypatch.delenv("KIVI_SERVE_SCHEME")
    with pytest.raises(SystemExit):  # argparse lists the choices
        parse_args(["--scheme", "nope"])


def test_backend_stats_merge_over_workers():
    a = BackendStats(active=True, page_bytes=5504, staging_slots_total=10, staging_bytes=100, reopened=1)
    b = BackendStats(active=True, page_bytes=5504, staging_slots_total=10, staging_bytes=100, reopened=2)
    merged = BackendStats.merged([a.as_dict(), b, BackendStats()])
    assert merged.page_bytes == 5504  # the same in every worker
    assert (merged.staging_slots_total, merged.staging_bytes, merged.reopened) == (20, 200, 3)
    assert BackendStats.merged([]) == BackendStats() and not BackendStats().active


def facts(backend: str, num_blocks: int, head_page_bytes: int, stats=BackendStats(), **snapshot):
    """What the adapter computes for SmolLM2 with ``num_blocks`` blocks of 3 heads x ``head_page_bytes``."""
    layers, heads = DIMS[0], DIMS[1]
    layout = {
        "num_blocks": num_blocks,
        "tensor_bytes": num_blocks * heads * head_page_bytes * layers,
        "page_size_bytes": heads * head_page_bytes,
        "num_kv_heads": heads,
    }
    return compute_facts(
        backend=backend,
        attention_impl="x",
        kv_cache_dtype="x",
        block_size=128,
        num_blocks=num_blocks,
        layouts=[layout],
        stats=stats,
        snapshot=SchedulerSnapshot(**snapshot),
        model_dims=DIMS,
    )


def test_facts_for_vllms_default_backend_are_bf16():
    # what vLLM allocates for SmolLM2 at 2 GiB: 728 blocks of 128 tokens x 64 x 2 (K,V) x 2 B per head
    f = facts("default", 728, 128 * 64 * 2 * 2, kv_usage=0.25)
    assert f.capacity_tokens == 93184
    assert f.compression_vs_bf16 == pytest.approx(1.0) and f.bits_per_element == pytest.approx(16.0)
    assert f.page_bytes == 128 * 64 * 2 * 2
    assert f.kv_bytes_used == round(0.25 * f.kv_bytes_total)
    assert f.kv_bytes_free == f.kv_bytes_total - f.kv_bytes_used


def test_facts_for_kivi_count_the_staging_pool():
    page_bytes = 5376  # one kivi page (one layer, one head) at P=128, D=64
    stats = BackendStats(
        active=True,
        page_bytes=page_bytes,
        staging_slots_total=10,
        staging_slots_in_use=2,
        staging_bytes=10 * 30 * 3 * 128 * 64 * 2 * 2,
        early_finalisations=4,
    )
    f = facts("kivi", 3633, page_bytes, stats, running=1)
    pages = 3633 * 3 * page_bytes * 30
    assert f.kv_bytes_total == pages + stats.staging_bytes
    assert f.compression_vs_bf16 == pytest.approx(23040 * 3633 * 128 / f.kv_bytes_total)
    assert f.page_bits_per_element == pytest.approx(page_bytes * 8 / (2 * 128 * 64))
    assert f.bits_per_element == pytest.approx(16 / f.compression_vs_bf16)
    assert f.kv_bytes_used == 2 * stats.staging_bytes // 10
    assert f.early_finalisations == 4 and f.running == 1


def test_scheduler_numbers_are_idle_when_nothing_is_in_flight():
    from kivi_serve.engine import Engine

    engine = Engine(EngineConfig())
    engine._snapshot = SchedulerSnapshot(running=2, waiting=1, kv_usage=0.3, preemptions=5, updated=12.0)
    # vLLM's last report still counts a request that was aborted since (no engine step followed)
    assert engine.scheduler_snapshot() == SchedulerSnapshot(preemptions=5, updated=12.0)
    engine._inflight.add("r1")
    assert engine.scheduler_snapshot() == engine._snapshot


def test_sampling_options_become_vllms_sampling_params():
    pytest.importorskip("vllm")
    from kivi_serve.engine import Engine
    from kivi_serve.engine.types import EngineRequestError, SamplingOptions

    engine = Engine(EngineConfig())
    opts = SamplingOptions(max_tokens=7, temperature=0.5, top_k=3, n=2, stop=["x"], seed=11, logprobs=2)
    params = engine.sampling_params(opts)
    got = {
        k: getattr(params, k) for k in ("max_tokens", "temperature", "top_k", "n", "stop", "seed", "logprobs")
    }
    assert got == {
        "max_tokens": 7,
        "temperature": 0.5,
        "top_k": 3,
        "n": 2,
        "stop": ["x"],
        "seed": 11,
        "logprobs": 2,
    }
    assert params.output_kind.name == "DELTA" and engine.sampling_params(SamplingOptions()).stop == []
    with pytest.raises(EngineRequestError, match="top_p") as info:
        engine.sampling_params(SamplingOptions(top_p=0.0))  # vLLM's own validation: a 400, not a 500
    assert info.value.param == "top_p"


def test_facts_for_a_hybrid_model_count_the_shared_allocation_once():
    """Gemma 3 270M (18 layers: 6 KV-cache groups of 3, 1 KV head, head_dim 256) on vLLM's default
    backend: one allocation backs all six groups' tensors and a block holds one page of 3 layers."""
    page = 128 * 256 * 2 * 2  # one block of one layer: P tokens x K,V x D x bf16
    num_blocks = 1000
    layout = {"num_blocks": num_blocks, "tensor_bytes": num_blocks * 3 * page, "page_size_bytes": page,
              "num_kv_heads": 1, "num_groups": 6}  # fmt: skip
    f = compute_facts(
        backend="default", attention_impl="x", kv_cache_dtype="x", block_size=128, num_blocks=num_blocks,
        layouts=[layout], stats=BackendStats(), snapshot=SchedulerSnapshot(), model_dims=(18, 1, 256),
    )  # fmt: skip
    assert f.kv_bytes_total == num_blocks * 3 * page
    assert f.compression_vs_bf16 == pytest.approx(1.0) and f.bits_per_element == pytest.approx(16.0)
    assert f.capacity_tokens == num_blocks * 128 // 6  # every group holds a page per page of the sequence
