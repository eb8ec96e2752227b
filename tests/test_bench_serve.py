"""``kivi-serve bench serve``'s pure parts (no engine): percentiles, capacity sizing, the plot."""

from __future__ import annotations

import pytest

from kivi_serve.bench import serve as bench


def test_percentile_interpolates_like_numpy():
    assert bench._percentile([], 50) is None
    assert bench._percentile([3.0], 99) == 3.0
    assert bench._percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert bench._percentile(list(range(101)), 99) == pytest.approx(99.0)


def _probe(budget: int, seqs: int, headroom: int, slot: int, block: int) -> dict:
    """What a server with ``seqs`` sequences reports for a budget (pages + staging = the budget)."""
    slots = seqs + headroom
    blocks = (budget - slots * slot) // block
    return {
        "page_bytes": block // 90,
        "staging_slots_total": slots,
        "kv_bytes_total": blocks * block + slots * slot,
        "num_blocks": blocks,
    }


def test_best_max_num_seqs_is_the_largest_that_still_fits():
    slot, block, pages = 2_949_120, 90 * 5504, 16  # SmolLM2: 30 layers x 3 KV heads; 2K tokens
    budget = int(0.1 * 2**30)
    probe = _probe(budget, 1, 4, slot, block)
    best = bench.best_max_num_seqs(probe, 1, budget, pages, 90, limit=64)

    def fits(seqs: int) -> bool:
        return (budget - (seqs + 4) * slot) // block // pages >= seqs

    assert best >= 1 and fits(best) and not fits(best + 1)
    assert bench.best_max_num_seqs(probe, 1, budget, pages, 90, limit=best - 1) == best - 1
    # A budget that cannot hold one request's pages next to the pool: 0.
    assert bench.best_max_num_seqs(probe, 1, 6 * slot, pages, 90, limit=64) == 0


def test_capacity_ratio_prefers_the_measured_runs():
    def cap(requests: int, held: int | None, run: bool = True) -> dict:
        c = {"capacity_requests": requests}
        if run:
            c |= {"run": {}, "held_without_preemption": held}
        return c

    result = {"backends": {"kivi": {"capacity": cap(8, 8)}, "default": {"capacity": cap(2, 2)}}}
    assert bench._capacity_ratio(result) == 4.0
    result["backends"]["kivi"]["capacity"]["held_without_preemption"] = None  # preempted: no claim
    assert bench._capacity_ratio(result) is None
    result = {"backends": {"kivi": {"capacity": cap(9, 0, False)}, "default": {"capacity": cap(3, 0, False)}}}
    assert bench._capacity_ratio(result) == 3.0


def test_plot_writes_a_small_png(tmp_path):
    pytest.importorskip("matplotlib")
    level = {
        "concurrency": 1,
        "output_tokens_per_s": 10.0,
        "ttft_p50_s": 0.1,
        "ttft_p99_s": 0.2,
        "tpot_p50_s": 0.05,
        "tpot_p99_s": 0.06,
    }
    cap = {
        "capacity_requests": 8,
        "capacity_request_tokens": 8 * 2048,
        "held_without_preemption": 8,
        "request_tokens": 2048,
        "kv_cache_space_gib": 0.1,
    }
    result = {
        "settings": {"model": "smollm2"},
        "capacity_ratio": 4.0,
        "backends": {
            "kivi": {"levels": [level], "capacity": cap},
            "default": {"levels": [], "capacity": cap},
        },
    }
    out = tmp_path / "serve.png"
    bench.plot(result, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0 < out.stat().st_size < 200_000


def test_peak_memory_counts_the_child_processes():
    """A parent whose child holds 64 MiB: the tree's peak includes it, the largest process has it."""
    import subprocess
    import sys
    import time

    code = (
        "import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', "
        "\"import sys; b = b'x' * (64 << 20); print('ok', flush=True); sys.stdin.read()\"], "
        "stdout=sys.stdout, stdin=sys.stdin); c.wait()"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout.readline().strip() == "ok"  # the child has its 64 MiB
        with bench.PeakRss(parent.pid, period=0.05) as rss:
            for _ in range(200):  # until the first sample (bounded: 10 s)
                if rss.tree_mib:
                    break
                time.sleep(0.05)
        mem = rss.result()
    finally:
        parent.stdin.close()
        parent.wait(timeout=30)
    assert mem["processes"] == 2
    assert mem["peak_pss_tree_mib"] >= 64 and mem["peak_rss_process_mib"] >= 64


def test_server_args_pass_every_flag_and_the_gpu_one_only_when_set():
    import argparse

    a = argparse.Namespace(model="m", page_size=64, scheme=None, timeout=30.0, gpu_memory_utilization=None)
    args = bench._server_args(a, "kivi", 0.5, 8, 1024)
    assert args[0] == "--no-access-log" and "--gpu-memory-utilization" not in args
    flags = dict(zip(args[1::2], args[2::2]))
    assert flags == {
        "--model": "m", "--backend": "kivi", "--page-size": "64", "--kv-cache-space": "0.5",
        "--max-num-seqs": "8", "--max-model-len": "1024", "--max-queue": "4096",
        "--request-timeout": "30.0", "--max-tokens-limit": "1024",
    }  # fmt: skip
    a.gpu_memory_utilization = 0.8
    assert bench._server_args(a, "kivi", 0.5, 8, 1024)[-2:] == ["--gpu-memory-utilization", "0.8"]
    # a scheme reaches our backend only; without --page-size each server takes its own default
    a.scheme, a.page_size = "kivi-serve-2bit-p256-vr", None
    kivi = dict(zip(*[iter(bench._server_args(a, "kivi", 0.5, 8, 1024)[1:])] * 2))
    default = dict(zip(*[iter(bench._server_args(a, "default", 0.5, 8, 1024)[1:])] * 2))
    assert kivi["--scheme"] == a.scheme and "--page-size" not in kivi
    assert "--scheme" not in default and "--page-size" not in default


def test_clients_measure_a_real_server_process(tmp_path):
    """The latency and capacity clients against the real server process over the tests' FakeEngine."""
    import asyncio
    from pathlib import Path

    pytest.importorskip("httpx")
    from kivi_serve.bench.server_process import ServerProcess

    tests = Path(__file__).parent
    env = {"PYTHONPATH": f"{tests}:{tests.parent}", "KIVI_FAKE_DELAY": "0.01", "KIVI_FAKE_VOCAB": "50000"}
    with ServerProcess(["--max-num-seqs", "4"], module="support.fake_server", env=env, clean_env=True) as srv:
        srv.wait_ready(120)
        cpu0 = bench.tree_cpu_seconds(srv.proc.pid)
        level = asyncio.run(bench._level(srv.url, 2, 3, 8, 5, 60, 0))
        assert level["requests"] == 3 and level["output_tokens_per_s"] > 0
        assert level["generated_tokens"] == 15  # 3 requests x 5 tokens from the fake engine
        assert bench.tree_cpu_seconds(srv.proc.pid) > cpu0  # the server process did the work
        assert 0 < level["ttft_p50_s"] <= level["ttft_p99_s"] and level["tpot_p50_s"] > 0
        run = asyncio.run(bench._capacity_run(srv.url, 3, 12, 6, 60, 0))
        assert run["completed"] and run["finished"] == 3 and 1 <= run["peak_held"] <= 3
