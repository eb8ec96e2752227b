"""``make gpu-check OUT=dir``: what can be checked without a GPU — the plan, the preflight, the
vLLM block, the bar's verdict on measured rows, and the refusal to run where no GPU is."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kivi_serve.bench import kernels as bench_kernels
from scripts import gpu_check


def test_dry_run_plans_the_bar_shapes_without_vllm(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path), "--dry-run"]) == 0
    info = json.loads((tmp_path / "preflight.json").read_text())
    assert {"torch", "cuda_available", "compilers", "disassembler", "missing"} <= set(info)
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = [s["name"] for s in plan["steps"]]
    assert names == ["precompile", "gpu_tests", "bench_kernels", "bench_kernels_p256_vr", "static_model"]
    assert sum(s["timeout_s"] for s in plan["steps"]) <= 8 * 60
    for step in plan["steps"]:
        assert step["cmd"][1] == "-c" and step["cmd"][2].startswith(gpu_check.NO_VLLM)
    steps = {s["name"]: s["cmd"] for s in plan["steps"]}

    def opt(cmd, name):
        return cmd[cmd.index(name) + 1] if name in cmd else None

    bench, long = steps["bench_kernels"], steps["bench_kernels_p256_vr"]
    assert opt(bench, "--scheme") is None and opt(bench, "--page-sizes") == "128,64"  # the default format
    assert opt(long, "--scheme") == "kivi-serve-2bit-p256-vr" and opt(long, "--page-sizes") == "256"
    for cmd, out in ((bench, "kernels"), (long, "kernels-p256-vr")):
        assert opt(cmd, "--batches") == "1,8" and opt(cmd, "--contexts") == "2048,32768,131072"
        assert "--no-vllm" in cmd and opt(cmd, "--out") == str(tmp_path / out)
    assert opt(steps["static_model"], "--configs") == "128:128:8,128:64:8,128:256:8"
    assert "precompile_specs" in steps["precompile"][2]


def test_precompile_covers_what_the_benchmarks_load_first():
    """The precompile step compiles the kernels both benchmarks launch (the decode kernel as
    ``paged_attention`` picks it for 32 query / 8 KV heads and bf16 staging rows), before the
    default configurations, each once, and each fits an H100 (what the step compiles for there)."""
    from kivi_serve.kernels import loader
    from kivi_serve.quant.schemes import get_scheme

    specs, DECODE = gpu_check.precompile_specs(), "decode_attention"
    assert len(specs) == len(set(specs)) and set(loader.default_specs()) <= set(specs)
    vr = get_scheme("kivi-serve-2bit-p256-vr").layout(128, 256)
    first = {(s.source, s.page_size, s.v_rotate, s.v_pin_ends, s.wide_channels, s.rows16, s.staging)
             for s in specs[:6]}  # fmt: skip
    assert first == {
        *((src, p, False, True, 24, False, 0) for p in (128, 64) for src in ("quantize_append", DECODE)),
        ("quantize_append", 256, True, False, vr.wide_channels, False, 0),
        (DECODE, 256, True, False, 56, False, 0),
    }
    assert all(s.dtype == "bfloat16" and s.head_dim == 128 for s in specs[:6])
    assert all(loader.fits(s, "sm_90a") for s in specs)


def test_summary_judges_both_formats_on_their_own_rows(tmp_path, monkeypatch, capsys):
    """A whole (faked) run: every step's command is run through ``_run``; the summary's schema, the
    default format's bar from ``kernels.json`` and the p256-vr rows' from ``kernels-p256-vr.json``."""
    monkeypatch.setattr(gpu_check, "preflight", lambda: {"missing": [], "gpu": "fake", "compilers": ["nvcc"],
                                                         "disassembler": "nvdisasm"})  # fmt: skip
    ran = []

    def fake_run(cmd, log, timeout):
        ran.append(log.stem)
        rows = {"bench_kernels": [_row(128, 8, 32768, 5.5, 0.85)],
                "bench_kernels_p256_vr": [_row(256, 8, 32768, 4.0, 0.7)]}  # fmt: skip
        out = {"bench_kernels": "kernels.json", "bench_kernels_p256_vr": "kernels-p256-vr.json"}
        if log.stem in out:
            (tmp_path / out[log.stem]).write_text(json.dumps({"rows": rows[log.stem]}))
        if log.stem == "static_model":
            log.write_text(json.dumps({"results": []}) + "\n")
        return {"cmd": cmd, "rc": 0, "seconds": 0.0, "log": log.name}

    monkeypatch.setattr(gpu_check, "_run", fake_run)
    assert gpu_check.main([str(tmp_path)]) == 0
    assert ran == ["precompile", "gpu_tests", "bench_kernels", "bench_kernels_p256_vr", "static_model"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"gpu", "preflight", "steps", "bar", "bar_p256_vr"} and summary["gpu"] == "fake"
    assert set(summary["steps"]) == set(ran)
    assert json.loads((tmp_path / "static.json").read_text()) == {"results": []}
    five = "speed-up vs best bf16 >= 5.0 at batch 8, 32K"
    bar = {b["criterion"]: b for b in summary["bar"]}
    long = {b["criterion"]: b for b in summary["bar_p256_vr"]}
    assert bar[five]["met"] is True and bar[five]["cells"][0]["page_size"] == 128
    assert long[five]["met"] is False and long[five]["worst"] == 4.0
    assert long[five]["cells"][0]["page_size"] == 256
    assert long["speed-up vs best bf16 >= 3.5 at batch 1, 128K"]["source"] == "not run"


def test_every_step_runs_with_vllm_blocked():
    code = gpu_check.NO_VLLM + "import vllm"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0 and "import of vllm halted" in run.stderr
    # the kernel benchmark's module and its vLLM baseline probe load with vLLM blocked
    code = gpu_check.NO_VLLM + (
        "import kivi_serve.bench.kernels, scripts.gpu_check; from kivi_serve.backend import "
        "paged_bf16_decode; assert paged_bf16_decode() is None; assert sys.modules['vllm'] is None; "
        "from scripts.gpu_check import precompile_specs; assert precompile_specs()"  # the precompile step's
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=gpu_check.ROOT)
    assert run.returncode == 0, run.stderr


def test_refuses_to_run_without_a_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "preflight", lambda: {"missing": ["an NVIDIA GPU visible to torch"]})
    assert gpu_check.main([str(tmp_path)]) == 2
    assert "missing: an NVIDIA GPU" in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists()


def _row(P, B, ctx, speedup, frac):
    return {"page_size": P, "batch": B, "context": ctx + 1 - P // 2, "speedup_vs_best_bf16": speedup,
            "fraction_of_copy_bw": frac}  # fmt: skip


def test_bar_is_judged_on_measured_rows_only():
    rows = [
        _row(128, 8, 32768, 5.5, 0.85),
        _row(64, 8, 32768, 4.9, 0.81),  # one page size misses the 5x
        _row(128, 1, 2048, 1.2, 0.3),
        _row(64, 8, 2048, 0.9, 0.4),  # slower than bf16 at 2K
    ]
    verdict = {b["criterion"]: b for b in gpu_check.bar(rows)}
    assert verdict["speed-up vs best bf16 >= 5.0 at batch 8, 32K"]["worst"] == pytest.approx(4.9)
    assert verdict["speed-up vs best bf16 >= 5.0 at batch 8, 32K"]["met"] is False
    assert verdict["fraction of copy bandwidth >= 0.8 at batch 8, 32K"]["met"] is True
    assert verdict["speed-up vs best bf16 >= 1.0 at every context <= 2K"]["met"] is False
    b1 = verdict["speed-up vs best bf16 >= 3.5 at batch 1, 128K"]
    assert b1["met"] is None and b1["source"] == "not run" and b1["cells"] == []


def test_list_prints_the_cells_a_gpu_run_measures(capsys):
    argv = ["--list", "--page-sizes", "128,64", "--batches", "1,8", "--contexts", "2048,32768,131072"]
    assert bench_kernels.run_cli(argv) == 0
    cells = json.loads(capsys.readouterr().out)["cells"]
    assert len(cells) == 12
    big = [c for c in cells if c["page_size"] == 128 and c["batch"] == 8 and c["context"] == 32768 + 1 - 64]
    # 8 sequences x 8 KV heads x 256 pages; bf16 K+V of 8 x 32K tokens x 8 heads x 128 channels = 1 GiB
    assert big and big[0]["pages"] == 8 * 8 * 256 and big[0]["bf16_kv_mib"] == 1024


def test_list_takes_the_scheme_and_its_page_size(capsys):
    """``--scheme``: the layout comes from the scheme (a p256 format at its 256-token page by default,
    any other page refused before anything runs); the default stays kivi-serve-2bit at 64 and 128."""
    from kivi_serve.quant.schemes import get_scheme

    assert bench_kernels.default_page_sizes("kivi-serve-2bit") == [64, 128]
    name = "kivi-serve-2bit-p256-vr"
    argv = ["--list", "--scheme", name, "--batches", "1,8", "--contexts", "2048,131072"]
    assert bench_kernels.run_cli(argv) == 0
    cells = json.loads(capsys.readouterr().out)["cells"]
    assert [(c["scheme"], c["page_size"], c["batch"]) for c in cells] == [
        (name, 256, b) for b in (1, 1, 8, 8)
    ]
    big = cells[-1]  # batch 8 at 128K: 512 pages of 256 tokens per sequence and KV head
    layout = get_scheme(name).layout(128, 256)
    assert big["context"] == 131072 + 1 - 128 and big["pages"] == 8 * 8 * 512
    assert big["kivi_pool_mib"] * 2**20 == (1 + 8 * 512) * 8 * layout.page_bytes
    assert layout.page_bytes <= 2.5 * 2 * 128 * 256 / 8  # K and V at 2.5 bits, all metadata included
    assert bench_kernels.run_cli(["--list", "--batches", "1", "--contexts", "2048"]) == 0
    assert [c["page_size"] for c in json.loads(capsys.readouterr().out)["cells"]] == [64, 128]
    for bad in (["--scheme", name, "--page-sizes", "128"], ["--scheme", "kivi-serve-3bit"]):
        with pytest.raises(SystemExit) as e:
            bench_kernels.run_cli(["--list", *bad])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "defined for 256-token pages" in err and "invalid choice: 'kivi-serve-3bit'" in err


def test_cpu_bench_takes_the_scheme(tmp_path, monkeypatch):
    """``--device cpu --scheme``: passed through to the CPU benchmark with the scheme's page size."""
    from kivi_serve.bench import kernels_cpu

    seen = {}
    monkeypatch.setattr(kernels_cpu, "run", lambda *a, **kw: seen.update(args=a, kw=kw) or {"rows": []})
    name = "kivi-serve-2bit-p256-vr"
    assert bench_kernels.run_cli(["--device", "cpu", "--scheme", name, "--out", str(tmp_path / "x")]) == 0
    assert seen["kw"]["scheme"] == name and seen["args"][6] == 256  # page_size
    assert bench_kernels.run_cli(["--device", "cpu", "--out", str(tmp_path / "x")]) == 0
    assert seen["kw"]["scheme"] == "kivi-serve-2bit" and seen["args"][6] == 128
    with pytest.raises(SystemExit):
        bench_kernels.run_cli(["--device", "cpu", "--scheme", name, "--page-size", "128"])


def test_cpu_bench_runs_the_vr_pages(tmp_path):
    """A smoke run of the CPU benchmark's decode and append on kivi-serve-2bit-p256-vr pages (a tiny
    shape; nothing timed is asserted): the C++ kernels take the rotated 256-token pages."""
    import torch

    from kivi_serve.bench import kernels_cpu
    from kivi_serve.kernels.cpu import loader as cpu_loader

    if cpu_loader.library() is None:
        pytest.skip(f"the C++ CPU kernels are unavailable: {cpu_loader.unavailable_reason()}")
    name, gen = "kivi-serve-2bit-p256-vr", torch.Generator().manual_seed(0)
    row = kernels_cpu.bench_decode("smollm2-135m", 1, 512, 256, 1, 0, None, gen, "int8", name)
    assert (row["scheme"], row["page_size"], row["seq_len"]) == (name, 256, 384) and row["kivi_ms"] > 0
    row = kernels_cpu.bench_append("smollm2-135m", 1, 256, 1, 0, None, gen, 0, "int8", name)
    assert row["scheme"] == name and row["finalize_step_ms"] > 0
