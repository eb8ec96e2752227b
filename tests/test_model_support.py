"""The config check that runs before any engine: what kivi-serve serves, and one line for what it does not."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kivi_serve.cli import app
from kivi_serve.model.support import UnsupportedModel, check_config, check_model, require_supported

transformers = pytest.importorskip("transformers")


def save(tmp_path, name, config, weights=True):
    folder = tmp_path / name
    folder.mkdir()
    config.save_pretrained(folder)
    if weights:
        (folder / "model.safetensors").write_bytes(b"")
    return folder


def gemma3(**kw):
    return transformers.Gemma3TextConfig(num_hidden_layers=12, head_dim=256, sliding_window=512, **kw)


def test_gemma3_layer_kinds_and_support(tmp_path):
    s = check_model(save(tmp_path, "g", gemma3()), cuda=False)
    assert s.ok, s.problems
    # Gemma 3: five sliding layers then one full one
    assert s.layer_kinds == {"sliding_attention(512)": 10, "full_attention": 2}
    assert (s.head_dim, s.sliding_window, s.sinks) == (256, 512, False)
    assert "10 sliding_attention(512) + 2 full_attention" in s.describe()


def test_gpt_oss_has_sinks_and_alternating_windows():
    cfg = transformers.GptOssConfig(num_hidden_layers=4).to_dict()
    s = check_config(cfg)
    assert s.ok and s.sinks
    assert s.layer_kinds == {"sliding_attention(128)": 2, "full_attention": 2}


def test_scale_and_softcap_are_read():
    cfg = transformers.Gemma2Config(num_hidden_layers=2, head_dim=256, query_pre_attn_scalar=144).to_dict()
    s = check_config(cfg)
    assert s.ok
    assert s.scale == pytest.approx(144**-0.5)
    assert s.softcap == cfg["attn_logit_softcapping"]


def test_mistral_and_qwen2_windows():
    mistral = check_config(transformers.MistralConfig(num_hidden_layers=3, sliding_window=64).to_dict())
    assert mistral.layer_kinds == {"sliding_attention(64)": 3}
    qwen = check_config(transformers.Qwen2Config(num_hidden_layers=3).to_dict())  # use_sliding_window False
    assert qwen.layer_kinds == {"full_attention": 3} and qwen.sliding_window is None


@pytest.mark.parametrize(
    "cfg, word",
    [
        (lambda: transformers.MambaConfig(num_hidden_layers=2).to_dict(), "layer kind mamba"),
        (lambda: transformers.DeepseekV3Config(num_hidden_layers=2).to_dict(), "MLA"),
        (lambda: transformers.LlamaConfig(num_hidden_layers=2, head_dim=96).to_dict(), "head_dim 96"),
        (lambda: transformers.Llama4TextConfig(num_hidden_layers=2).to_dict(), "chunked local attention"),
    ],
)
def test_unsupported_features_are_named(cfg, word):
    s = check_config(cfg())
    assert not s.ok
    assert any(word in p for p in s.problems), s.problems


def test_cuda_refuses_what_its_kernels_lack():
    # the CUDA decode kernel applies sliding windows and sink logits (issue 15), not the soft-cap
    s = check_config(gemma3().to_dict(), cuda=True)
    assert s.ok, s.problems
    oss = check_config(transformers.GptOssConfig(num_hidden_layers=2).to_dict(), cuda=True)
    assert oss.ok, oss.problems
    capped = transformers.Gemma2Config(num_hidden_layers=2, attn_logit_softcapping=50.0).to_dict()
    g2 = check_config(capped, cuda=True)
    assert not g2.ok and any("soft-capping" in p and "CUDA" in p for p in g2.problems), g2.problems
    assert check_config(capped).ok


def test_require_supported_is_one_line(tmp_path):
    folder = save(tmp_path, "m", transformers.MambaConfig(num_hidden_layers=2))
    with pytest.raises(UnsupportedModel) as e:
        require_supported(folder, cuda=False)
    msg = str(e.value)
    assert "\n" not in msg and "mamba" in msg and "layers: 2 mamba" in msg


def test_cli_check(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["check", "--model", str(save(tmp_path, "g", gemma3())), "--device", "cpu"])
    assert ok.exit_code == 0, ok.output
    assert "supported" in ok.stdout and "sliding_attention(512)" in ok.stdout
    bad = save(tmp_path, "d", transformers.DeepseekV3Config(num_hidden_layers=2), weights=False)
    res = runner.invoke(app, ["check", "--model", str(bad), "--json"])
    assert res.exit_code == 1
    assert json.loads(res.stdout)["supported"] is False
    missing = runner.invoke(app, ["check", "--model", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not found" in missing.stderr


def test_serve_refuses_before_the_engine_starts(tmp_path, capsys, monkeypatch):
    from kivi_serve.server import app as server_app

    monkeypatch.setattr(server_app, "serve", lambda *a, **k: pytest.fail("the server must not start"))
    folder = save(tmp_path, "m", transformers.MambaConfig(num_hidden_layers=2))
    assert server_app.run_cli(["--model", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "mamba" in err[0] and "not supported" in err[0]
