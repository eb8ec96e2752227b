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
    assert names == ["precompile", "gpu_tests", "bench_kernels", "static_model"]
    assert sum(s["timeout_s"] for s in plan["steps"]) <= 8 * 60
    for step in plan["steps"]:
        assert step["cmd"][1] == "-c" and step["cmd"][2].startswith(gpu_check.NO_VLLM)
    bench = plan["steps"][2]["cmd"]
    assert bench[bench.index("--page-sizes") + 1] == "128,64"
    assert bench[bench.index("--batches") + 1] == "1,8"
    assert bench[bench.index("--contexts") + 1] == "2048,32768,131072"
    assert "--no-vllm" in bench and bench[bench.index("--out") + 1] == str(tmp_path / "kernels")


def test_every_step_runs_with_vllm_blocked():
    code = gpu_check.NO_VLLM + "import vllm"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0 and "import of vllm halted" in run.stderr
    # the kernel benchmark's module and its vLLM baseline probe load with vLLM blocked
    code = gpu_check.NO_VLLM + (
        "import kivi_serve.bench.kernels, scripts.gpu_check; from kivi_serve.backend import "
        "paged_bf16_decode; assert paged_bf16_decode() is None; assert sys.modules['vllm'] is None"
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
