"""The ``kivi-serve`` command line: layout, the embedded model, and clean errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from typer.testing import CliRunner

from kivi_serve import __version__
from kivi_serve.cli import app
from kivi_serve.model.prepare import ModelError, embedded_model_dir, resolve_model
from kivi_serve.quant.layout import PageLayout

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), prog_name="kivi-serve")


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"kivi-serve {__version__}"


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("page_size", [64, 128])
def test_layout_json_is_describe(head_dim, page_size):
    result = invoke("layout", "--json", "--head-dim", str(head_dim), "--page-size", str(page_size))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == PageLayout(head_dim, page_size=page_size).describe()


def test_layout_json_bits_options():
    result = invoke("layout", "--json", "--k-bits", "3", "--v-bits", "2", "--exact-tokens", "0")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == PageLayout(128, k_bits=3, v_bits=2, exact_tokens=0).describe()


def test_layout_default_is_the_2_5_bit_page():
    desc = json.loads(invoke("layout", "--json").stdout)
    assert (desc["head_dim"], desc["page_size"], desc["bits_per_element"]) == (128, 128, 2.5)


def test_layout_table_names_every_section():
    result = invoke("layout", "--head-dim", "64")
    assert result.exit_code == 0, result.output
    for name in PageLayout(64).sections:
        assert name in result.stdout
    assert "bits_per_element" in result.stdout


@pytest.mark.parametrize(
    "args, word",
    [
        (("--head-dim", "100"), "head_dim"),
        (("--page-size", "96"), "page_size"),
        (("--k-bits", "1"), "k_bits"),
    ],
)
def test_layout_bad_argument_is_a_clean_exit_2(args, word):
    result = invoke("layout", *args)
    assert result.exit_code == 2
    assert word in result.stderr
    assert "Traceback" not in result.output


def test_real_process_exits_2_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "kivi_serve.cli", "layout", "--head-dim", "100"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "kivi-serve: error: head_dim must be one of" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ embedded model
def test_model_prepare_is_idempotent():
    first = invoke("model", "prepare")  # converts on a cold cache (~35 s); `make test` prepares it first
    assert first.exit_code == 0, first.output
    folder = embedded_model_dir()
    assert first.stdout.strip().splitlines()[-1] == str(folder)

    assert (folder / "config.json").is_file()
    weights = sorted(folder.glob("*.safetensors"))
    assert weights and weights[0].stat().st_size > 100_000_000  # 135M parameters in bf16
    assert (folder / "tokenizer.json").is_file()
    mtime = weights[0].stat().st_mtime_ns

    start = time.perf_counter()
    second = invoke("model", "prepare")
    elapsed = time.perf_counter() - start
    assert second.exit_code == 0, second.output
    assert second.stdout.strip().splitlines()[-1] == str(folder)
    assert elapsed < 2.0, f"a prepared model should be found at once, took {elapsed:.1f} s"
    assert weights[0].stat().st_mtime_ns == mtime, "the second call rewrote the weights"

    path = invoke("model", "path")
    assert path.exit_code == 0 and path.stdout.strip() == str(folder)
    assert resolve_model("smollm2") == folder


def test_prepared_model_is_bf16_with_a_chat_template():
    from transformers import AutoConfig, AutoTokenizer

    folder = resolve_model("smollm2")
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama"
    assert str(getattr(config, "dtype", None) or config.torch_dtype).endswith("bfloat16")
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert "What is the capital of France?" in text
    assert text.rstrip().endswith("assistant")  # SmolLM2's ChatML: ...<|im_start|>assistant\n


def test_model_path_before_prepare_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("KIVI_SERVE_CACHE", str(tmp_path))
    result = invoke("model", "path")
    assert result.exit_code == 1
    assert result.stdout.strip() == str(tmp_path / "models" / "SmolLM2-135M-Instruct-bf16")
    assert "kivi-serve model prepare" in result.stderr


def test_resolve_model_without_weights(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no weights"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelError, match="not found"):
        resolve_model(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------ eval / serve / bench
def test_eval_model_without_weights_is_a_clean_exit_2(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = invoke("eval", "--model", str(tmp_path))
    assert result.exit_code == 2
    assert "no weights" in result.stderr
    assert "Traceback" not in result.output


def test_eval_missing_corpus_is_a_clean_exit_2(tmp_path):
    result = invoke("eval", "--corpus", str(tmp_path / "nope.txt"))
    assert result.exit_code == 2
    assert "corpus file not found" in result.stderr


def test_eval_rejects_empty_schemes():
    result = invoke("eval", "--schemes", " , ")
    assert result.exit_code == 2
    assert "--schemes" in result.stderr


def test_eval_passes_the_options_to_the_harness(tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text("x" * 2000)
    seen = {}

    def fake_run_cli(**kwargs):
        seen.update(kwargs)
        return 0

    import kivi_serve.cli as cli

    monkeypatch.setattr(cli, "load_entry", lambda module: fake_run_cli)
    args = ["eval", "--corpus", str(corpus), "--windows", "2", "--window-len", "64", "--page-size", "64"]
    result = invoke(*args, "--schemes", "fp16,kivi2-uniform", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert seen == {
        "model": "smollm2",
        "corpus": corpus,
        "windows": 2,
        "window_len": 64,
        "page_size": 64,
        "schemes": ["fp16", "kivi2-uniform"],
        "json_out": True,
        "device": "cpu",
        "staging": "model",  # the open page at the model dtype unless --staging asks for int8/fp8
    }


def test_serve_passes_every_argument_through(monkeypatch):
    seen = []
    import kivi_serve.cli as cli

    monkeypatch.setattr(
        cli, "load_entry", lambda module: lambda args: seen.append((module, args))
    )
    result = invoke("serve", "--port", "9000", "--help", "-x")
    assert result.exit_code == 0, result.output
    assert seen == [("kivi_serve.server.app", ["--port", "9000", "--help", "-x"])]


def test_missing_dependency_is_named(tmp_path, monkeypatch, capsys):
    from kivi_serve import cli

    (tmp_path / "kivi_probe_mod.py").write_text(
        textwrap.dedent(
            """
            import kivi_definitely_missing_dependency
            def run_cli(args):
                return 0
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(cli.typer.Exit) as exc:
        cli.load_entry("kivi_probe_mod")
    assert exc.value.exit_code == 2
    assert "kivi_definitely_missing_dependency" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "kivi-serve")
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"kivi-serve {__version__}"
