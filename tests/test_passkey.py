"""Passkey retrieval (``kivi-serve eval --task passkey``): the prompts, the report, and one small grid
through real vLLM engines (fp16 = vLLM's default backend, and kivi-serve's 2-bit pages)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from kivi_serve.eval import passkey as PK

SCHEMA = {"scheme", "context", "depth", "accuracy", "key_logprob", "n"}


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from kivi_serve.model.prepare import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model("smollm2")))


@pytest.fixture(scope="module")
def builder(tok):
    from kivi_serve.eval.harness import read_corpus

    return PK.PromptBuilder(tok, read_corpus("hamlet")[1])


# --------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("fmt, filler", [("chat", "corpus"), ("completion", "corpus"), ("chat", "repeat")])
@pytest.mark.parametrize("context", [1024, 2048])
def test_trial_layout(tok, builder, fmt, filler, context):
    from kivi_serve.eval.harness import read_corpus

    if (fmt, filler) == ("chat", "corpus"):
        b = builder
    else:
        b = PK.PromptBuilder(tok, read_corpus("hamlet")[1], fmt, filler)
    for depth in (0, 50, 100):
        t = b.trial(context, depth, seed=3)
        assert len(t.prompt) == context - PK.ANSWER_ROOM
        assert len(t.key) == PK.KEY_DIGITS and t.key.isdigit()
        assert tok.decode(list(t.key_ids)) == t.key
        a, z = t.needle
        assert tok.decode(list(t.prompt[a:z])).strip() == PK.NEEDLE.format(key=t.key)
        assert tok.decode(list(t.prompt)).endswith(PK.ANSWER_PREFIX)
        assert t.prompt[: len(b.head)] == tuple(b.head) and t.prompt[t.doc_len :] == tuple(b.tail)
        assert t.scored == t.prompt + t.key_ids
        filler = t.doc_len - len(b.head) - (z - a)
        before = a - len(b.head)
        assert abs(before - depth / 100 * filler) <= 40  # the nearest unit boundary (a line of the play)
    assert b.trial(context, 0, 3).needle[0] == len(b.head)
    assert b.trial(context, 100, 3).needle[1] == b.trial(context, 100, 3).doc_len


def test_seeds_vary_the_key_and_filler_but_depths_only_move_the_needle(builder):
    a, b = builder.trial(1024, 25, 0), builder.trial(1024, 75, 0)
    assert a.key == b.key
    strip = lambda t: t.prompt[: t.needle[0]] + t.prompt[t.needle[1] :]  # noqa: E731
    assert strip(a) == strip(b)
    keys = {builder.trial(1024, 50, s).key for s in range(8)}
    assert len(keys) == 8
    assert builder.trial(1024, 50, 1).prompt != builder.trial(1024, 50, 2).prompt


def test_chat_prompt_uses_the_template(tok, builder):
    text = tok.decode(list(builder.trial(1024, 50, 0).prompt))
    assert text.startswith("<|im_start|>system") and "<|im_start|>user\n" + PK.INSTRUCTION in text
    assert text.endswith(PK.QUESTION + "<|im_end|>\n<|im_start|>assistant\n" + PK.ANSWER_PREFIX)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"fmt": "raw"}, "format"), ({"filler": "noise"}, "filler"),
     ({"corpus": "too short\n" * 20}, "too short")],
)
def test_builder_rejects_bad_settings(tok, kwargs, match):
    args = {"corpus": "A line of text.\n" * 2000} | kwargs
    with pytest.raises(ValueError, match=match):
        PK.PromptBuilder(tok, **args)


def test_trial_rejects_bad_depth_and_tiny_context(builder):
    with pytest.raises(ValueError, match="depth"):
        builder.trial(1024, 120, 0)
    with pytest.raises(ValueError, match="too short"):
        builder.trial(64, 50, 0)


def test_answer_digits():
    assert PK.answer_digits("48213. Remember it") == "48213"
    assert PK.answer_digits(" 4821 3") == "4821"
    assert PK.answer_digits("no idea") == ""


# --------------------------------------------------------------------------- the report
def _outcome(scheme, context, depth, seed, ok, lp, ranks=(1, 1, 1, 1, 1)):
    return PK.Outcome(scheme, context, depth, seed, "12345", "12345." if ok else "12845.", ok, lp, ranks, 896)


def test_summarize_rows_and_all_depths():
    q2 = "kivi-serve-2bit"
    outs = [
        _outcome(q2, 1024, 0, 0, True, -0.5), _outcome(q2, 1024, 0, 1, False, -4.5, (1, 9, 1, 1, 1)),
        _outcome(q2, 1024, 50, 0, True, -1.0), _outcome(q2, 1024, 50, 1, True, -1.0),
        _outcome("fp16", 1024, 0, 0, True, -0.1), _outcome("fp16", 1024, 0, 1, True, -0.3),
        _outcome("fp16", 1024, 50, 0, True, -0.2), _outcome("fp16", 1024, 50, 1, True, -0.2),
    ]  # fmt: skip
    rows = PK.summarize(outs, ["fp16", "kivi-serve-2bit"])
    assert [(r["scheme"], r["depth"]) for r in rows] == [
        ("fp16", 0), ("fp16", 50), ("fp16", "all"), ("kivi-serve-2bit", 0), ("kivi-serve-2bit", 50),
        ("kivi-serve-2bit", "all"),
    ]  # fmt: skip
    cell = {(r["scheme"], r["depth"]): r for r in rows}
    # Wilson interval of 1 of 2 at 95 %: centre (p + z²/2n) / (1 + z²/n), half-width
    # z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n), z = 1.959964
    z = 1.959964
    centre, half = (0.5 + z * z / 4) / (1 + z * z / 2), z * (0.25 / 2 + z * z / 16) ** 0.5 / (1 + z * z / 2)
    # paired with fp16 (same depth and seed): Δ log P = -0.4 and -4.2; t(0.975, 1 df) = 12.7062
    d_mean, d_half = -2.3, 12.7062 * (3.8 / 2**0.5) / 2**0.5
    row = dict(cell[("kivi-serve-2bit", 0)])
    assert row.pop("accuracy_ci") == pytest.approx([centre - half, centre + half], abs=2e-4)
    assert row.pop("key_logprob_delta_ci") == pytest.approx([d_mean - d_half, d_mean + d_half], abs=2e-3)
    assert row == pytest.approx({
        "scheme": "kivi-serve-2bit", "context": 1024, "depth": 0, "accuracy": 0.5, "key_logprob": -2.5,
        "key_rank": 5.0, "n": 2, "n_paired": 2, "accuracy_delta": -0.5, "lost": 1, "gained": 0,
        "mcnemar_p": 1.0, "key_logprob_delta": d_mean, "meets_bar": False,
    }, abs=1e-9)  # fmt: skip
    both = cell[("kivi-serve-2bit", "all")]
    assert (both["accuracy"], both["n"], both["n_paired"], both["lost"]) == (0.75, 4, 4, 1)
    assert both["accuracy_delta"] == -0.25 and both["key_logprob_delta"] == pytest.approx(-1.55)
    assert cell[("fp16", "all")]["key_logprob"] == pytest.approx(-0.2)
    assert "n_paired" not in cell[("fp16", "all")] and cell[("fp16", "all")]["accuracy_ci"][1] == 1.0
    assert outs[1].digits == "12845"


def test_paired_bar_and_mcnemar():
    """Within the bar: Δ accuracy ≥ -5 points and |mean Δ log P| ≤ 0.5 nats; McNemar's exact p for 6
    discordant trials all one way is 2 · 0.5⁶."""
    ref = [_outcome("fp16", 1024, 0, s, True, -0.2) for s in range(20)]
    close = [_outcome("q", 1024, 0, s, s != 0, -0.6) for s in range(20)]  # one miss: -5 points, -0.4 nats
    got = PK.paired(close, ref)
    assert (got["n_paired"], got["accuracy_delta"], got["lost"], got["gained"]) == (20, -0.05, 1, 0)
    assert got["key_logprob_delta"] == pytest.approx(-0.4) and got["meets_bar"]
    assert got["key_logprob_delta_ci"] == pytest.approx([-0.4, -0.4])  # no spread: a point
    far = [_outcome("q", 1024, 0, s, s >= 6, -0.2) for s in range(20)]
    got = PK.paired(far, ref)
    assert got["mcnemar_p"] == pytest.approx(2 * 0.5**6, abs=1e-4) and not got["meets_bar"]
    assert not PK.paired(close, [])  # nothing to pair
    assert not PK.paired([_outcome("q", 1024, 0, 0, True, -0.2)],
                         [_outcome("fp16", 1024, 0, 1, True, -0.2)])  # other seed: not the same prompt


def test_default_seeds_by_context():
    assert {c: PK.default_seeds(c) for c in (256, 1024, 2048, 4096, 8192)} == {
        256: 4, 1024: 4, 2048: 2, 4096: 1, 8192: 1}
    assert PK.seeds_per_context([1024, 8192], None) == {1024: 4, 8192: 1}
    assert PK.seeds_per_context([1024, 8192], 3) == {1024: 3, 8192: 3}


def test_table_and_heatmap(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps cells to the terminal's width
    outs = [_outcome(s, c, d, 0, d != 100 or s == "fp16", -0.5 * d / 100) for s in ("fp16", "kivi-serve-2bit")
            for c in (1024, 2048) for d in (0, 50, 100)]  # fmt: skip
    report = {"model": "smollm2", "format": "chat", "filler": "corpus", "seeds": 1, "contexts": [1024, 2048],
              "depths": [0, 50, 100], "results": PK.summarize(outs, ["fp16", "kivi-serve-2bit"])}  # fmt: skip
    PK.render_table(report)
    out = capsys.readouterr().out
    assert "kivi-serve-2bit" in out and "0.00 (-0.50)" in out
    assert "against fp16" in out and "(1/0, p=1.00)" in out and "not met" in out
    PK.plot_heatmap(report, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"schemes": ["fp16", "kivi-9bit"]}, "unknown scheme"),
        ({"schemes": ["fp16", "fp16"]}, "repeat"),
        ({"contexts": [16384]}, "context"),
        ({"depths": [0, 101]}, "depth"),
        ({"seeds": 0}, "seeds"),
        ({"page_size": 100}, "page_size"),
    ],
)
def test_bad_arguments_fail_before_any_engine_starts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PK.evaluate(**({"contexts": [1024], "depths": [0], "seeds": 1, "progress": False} | kwargs))


def test_a_reference_only_scheme_is_refused_before_any_engine_starts(monkeypatch):
    """A format the reference implements but the kernels do not (none at present: planted here) cannot
    reach the engine: the passkey task names the other tools instead."""
    import dataclasses

    from kivi_serve.quant import schemes

    planted = dataclasses.replace(schemes.SCHEMES["kivi-serve-2bit-p256-vr"], name="ref-only-test")
    monkeypatch.setitem(schemes.REFERENCE_SCHEMES, "ref-only-test", planted)
    with pytest.raises(ValueError, match="reference only"):
        PK.evaluate(contexts=[1024], depths=[0], seeds=1, progress=False, schemes=["fp16", "ref-only-test"])


def test_long_contexts_run_only_the_long_schemes(monkeypatch, tmp_path, capsys):
    """The grid's plan, with the engines replaced by a stand-in that answers every trial."""
    ran = {}

    def fake_run_scheme(model, scheme, trials, tokenizer, **kw):
        ran[scheme] = sorted({t.context for t in trials})
        kw["bar"].update(len(trials))
        outs = [PK.Outcome(scheme, t.context, t.depth, t.seed, t.key, t.key, True, -0.1, (1,) * 5, 0)
                for t in trials]  # fmt: skip
        kw["on_group"](outs)
        return outs

    monkeypatch.setattr(PK, "run_scheme", fake_run_scheme)
    args = dict(contexts=[1024, 8192], depths=[0, 100], seeds=1, progress=False)
    report = PK.evaluate(schemes=["fp16", "kivi-serve-2bit", "kivi-serve-4bit"],
                         long_schemes=["fp16", "kivi-serve-2bit"], **args)
    assert ran == {"fp16": [1024, 8192], "kivi-serve-2bit": [1024, 8192], "kivi-serve-4bit": [1024]}
    assert report["long_schemes"] == ["fp16", "kivi-serve-2bit"]
    assert {(r["scheme"], r["context"]) for r in report["results"]} == {
        ("fp16", 1024), ("fp16", 8192), ("kivi-serve-2bit", 1024), ("kivi-serve-2bit", 8192),
        ("kivi-serve-4bit", 1024),
    }  # fmt: skip
    PK.plot_heatmap(report, tmp_path / "h.png")  # a cell not run is drawn empty
    ran.clear()
    PK.evaluate(schemes=["fp16", "kivi-serve-4bit"], **args)  # default: every scheme at every context
    assert ran == {"fp16": [1024, 8192], "kivi-serve-4bit": [1024, 8192]}


def test_default_grid_keys_per_context_and_page_per_scheme(monkeypatch):
    """By default the cheap contexts get more keys, and each scheme runs at its own page size, so one
    fp16 run pairs with schemes of different page sizes."""
    ran = {}

    def fake_run_scheme(model, scheme, trials, tokenizer, **kw):
        ran[scheme] = (kw["page_size"], sorted({(t.context, t.seed) for t in trials}))
        outs = [PK.Outcome(scheme, t.context, t.depth, t.seed, t.key, t.key, True, -0.1, (1,) * 5, 0)
                for t in trials]  # fmt: skip
        kw["on_group"](outs)
        return outs

    monkeypatch.setattr(PK, "run_scheme", fake_run_scheme)
    report = PK.evaluate(schemes=["fp16", "kivi-serve-2bit-p256"], contexts=[1024, 4096], depths=[50],
                         progress=False)
    cells = [(1024, 0), (1024, 1), (1024, 2), (1024, 3), (4096, 0)]
    assert ran == {"fp16": (128, cells), "kivi-serve-2bit-p256": (256, cells)}
    assert report["seeds"] == {"1024": 4, "4096": 1}
    assert report["page_sizes"] == {"fp16": 128, "kivi-serve-2bit-p256": 256}
    assert {(r["context"], r["n_paired"]) for r in report["results"] if r["scheme"] != "fp16"} == {
        (1024, 4), (4096, 1)}
    assert PK.DEFAULT_SCHEMES == ("fp16", "kivi-serve-2bit")
    with pytest.raises(ValueError, match="256-token pages"):  # a forced page size still applies to all
        PK.evaluate(schemes=["fp16", "kivi-serve-2bit-p256"], contexts=[1024], depths=[50], page_size=128,
                    progress=False)


def test_cli_passes_the_passkey_options(monkeypatch):
    from typer.testing import CliRunner

    import kivi_serve.cli as cli

    seen = {}
    def load_entry(module, attr="run_cli"):
        return lambda **kw: seen.update(kw, m=module)

    monkeypatch.setattr(cli, "load_entry", load_entry)
    args = ["eval", "--task", "passkey", "--contexts", "1024,2048", "--depths", "0,50", "--seeds", "3",
            "--schemes", "fp16,kivi-serve-3bit", "--chunk", "512", "--long-schemes", "all", "--out", "x/pk",
            "--json"]  # fmt: skip
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert seen["m"] == "kivi_serve.eval.passkey"
    assert (seen["contexts"], seen["depths"], seen["seeds"], seen["schemes"]) == (
        [1024, 2048], [0, 50], 3, ["fp16", "kivi-serve-3bit"])
    assert (seen["chunk"], seen["long_schemes"], seen["out"], seen["json_out"]) == (512, None, "x/pk", True)
    CliRunner().invoke(cli.app, ["eval", "--task", "passkey"])  # the defaults
    assert (seen["seeds"], seen["page_size"], seen["long_schemes"], seen["schemes"]) == (None,) * 4
    bad = CliRunner().invoke(cli.app, ["eval", "--task", "passkey", "--seeds", "2,3"])
    assert bad.exit_code == 2 and "--seeds" in bad.output
    bad = CliRunner().invoke(cli.app, ["eval", "--task", "passkey", "--depths", "0,half"])
    assert bad.exit_code == 2 and "--depths" in bad.output
    bad = CliRunner().invoke(cli.app, ["eval", "--task", "recall"])
    assert bad.exit_code == 2 and "--task" in bad.output


def test_checkpoints_after_each_step_and_resume(monkeypatch, tmp_path):
    """``--out`` rewrites the report after each engine step (a grid cut short keeps what it finished);
    ``--resume`` runs only the trials the saved report lacks."""
    seen, ran = [], []

    def fake_run_scheme(model, scheme, trials, tokenizer, **kw):
        ran.append((scheme, [t.depth for t in trials]))
        for t in trials:  # one engine step per trial
            kw["bar"].update(1)
            answer = t.key if scheme == "fp16" else "1"
            ok = scheme == "fp16"
            kw["on_group"]([PK.Outcome(scheme, t.context, t.depth, t.seed, t.key, answer, ok, -0.1, (1,) * 5,
                                       0)])

    monkeypatch.setattr(PK, "run_scheme", fake_run_scheme)
    def plot(report, path):  # called right after each write of the JSON
        saved = json.loads((tmp_path / "pk.json").read_text())
        seen.append((saved["partial"], [r["scheme"] for r in report["results"]]))

    monkeypatch.setattr(PK, "plot_heatmap", plot)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        PK.run_cli(out=str(tmp_path / "pk"), json_out=True, contexts=[1024], depths=[0, 100], seeds=1,
                   schemes=["fp16", "kivi-serve-2bit"], progress=False)
    f, q = "fp16", "kivi-serve-2bit"  # rows per scheme: each depth run so far, then "all"
    assert seen == [(True, [f] * 2), (True, [f] * 3), (True, [f] * 3 + [q] * 2), (True, [f] * 3 + [q] * 3),
                    (False, [f] * 3 + [q] * 3)]
    report = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert report["partial"] is False and len(report["failures"]) == 2
    assert set(report["seconds"]) == set(report["cpu_seconds"]) == {"fp16", "kivi-serve-2bit"}
    assert report["corpus_path"] == "hamlet"  # what evidence_from_report reads the text from
    # a run cut after fp16's first trial, resumed: only the missing trials run, the report is whole
    saved = json.loads((tmp_path / "pk.json").read_text())
    saved["trials"] = saved["trials"][:1]
    (tmp_path / "pk.json").write_text(json.dumps(saved))
    ran.clear()
    with contextlib.redirect_stdout(io.StringIO()):
        PK.run_cli(out=str(tmp_path / "pk"), json_out=True, resume=True, contexts=[1024], depths=[0, 100],
                   seeds=1, schemes=["fp16", "kivi-serve-2bit"], progress=False)
    assert ran == [("fp16", [100]), ("kivi-serve-2bit", [0, 100])]
    again = json.loads((tmp_path / "pk.json").read_text())
    assert again["results"] == report["results"] and len(again["trials"]) == 4
    # resumed with a different grid (one more depth, the second scheme only): the saved trials are all
    # kept, and the saved schemes keep their place in the rows
    ran.clear()
    with contextlib.redirect_stdout(io.StringIO()):
        PK.run_cli(out=str(tmp_path / "pk"), resume=True, contexts=[1024], depths=[50], seeds=1,
                   schemes=[q], progress=False)
    assert ran == [(q, [50])]
    grown = json.loads((tmp_path / "pk.json").read_text())
    assert len(grown["trials"]) == 5 and grown["depths"] == [0, 50, 100] and grown["contexts"] == [1024]

    def rows(rep, scheme):
        return [r for r in rep["results"] if r["scheme"] == scheme]

    assert grown["results"][: len(rows(report, f))] == rows(report, f)  # fp16 first, unchanged
    assert [r["depth"] for r in rows(grown, q)] == [0, 50, 100, "all"]
    wrong = dict(saved, trials=[dict(saved["trials"][0], key="12345")])  # not the prompt this run builds
    (tmp_path / "pk.json").write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="cannot resume.*key 12345"):
        PK.run_cli(out=str(tmp_path / "pk"), resume=True, contexts=[1024], depths=[0], progress=False)
    saved["format"] = "completion"
    (tmp_path / "pk.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="cannot resume"):
        PK.run_cli(out=str(tmp_path / "pk"), resume=True, contexts=[1024], depths=[0], progress=False)


def test_evidence_from_report_rebuilds_the_trials(monkeypatch, builder):
    """The saved report's trials are rebuilt with the same keys; a report whose keys do not match (other
    corpus or tokenizer) is refused."""
    trials = [builder.trial(1024, d, 0) for d in (0, 50)]
    outs = [PK.Outcome("kivi-serve-2bit", t.context, t.depth, t.seed, t.key, "0", False, -9.0, (7,) * 5, 896)
            for t in trials]  # fmt: skip
    report = {"model": "smollm2", "format": "chat", "filler": "corpus", "page_size": 128, "chunk": 2048,
              "trials": [vars(o) | {"key_ranks": list(o.key_ranks)} for o in outs]}  # fmt: skip
    got = {}

    def fake_collect(path, trials, outcomes, limit, page_size, chunk, device, progress):
        got.update(trials=trials, outcomes=outcomes, limit=limit, chunk=chunk)
        return []

    monkeypatch.setattr(PK, "collect_evidence", fake_collect)
    PK.evidence_from_report(report, limit=3, progress=False)
    assert [t.prompt for t in got["trials"]] == [t.prompt for t in trials]
    assert got["outcomes"] == outs and (got["limit"], got["chunk"]) == (3, 2048)
    report["trials"][0]["key"] = "00000"
    with pytest.raises(ValueError, match="not the same prompts"):
        PK.evidence_from_report(report, progress=False)


def test_served_chunks():
    t = PK.Trial(4096, 50, 0, "12345", tuple(range(4000)), (1, 2), 3970, (10, 30))
    # the document (3970 tokens: 31 full pages of 128 = 3968) in 2048-token steps, then the rest
    assert PK.served_chunks(t, 2048, 128) == [0, 2048, 3968]
    assert PK.served_chunks(t, 1024, 128) == [0, 1024, 2048, 3072, 3968]
    short = PK.Trial(256, 0, 0, "12345", tuple(range(200)), (1,), 100, (0, 20))
    assert PK.served_chunks(short, 2048, 128) == [0]  # no full page: one step computes everything


def test_needle_attention_matches_the_stock_model(tok, builder):
    """fp16 in the harness == the stock transformers model (eager attention, fp32): the key's
    log-probability and teacher-forced argmax, and per layer the attention mass the key-predicting
    queries put on the needle; a quantized scheme runs and reports the same shapes."""
    import torch
    from transformers import AutoModelForCausalLM

    from kivi_serve.eval import harness as H
    from kivi_serve.model.prepare import resolve_model
    from kivi_serve.quant.schemes import get_scheme

    trial = builder.trial(512, 50, 1)
    lm = H.load_model("smollm2", "cpu")
    got = PK.needle_attention(lm, trial, get_scheme("fp16"))
    stock = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2"), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ids = torch.tensor([trial.scored])
    with torch.no_grad():
        out = stock(input_ids=ids, output_attentions=True)
    n, k = len(trial.prompt), len(trial.key_ids)
    rows = list(range(n - 1, n - 1 + k))
    logp = torch.log_softmax(out.logits[0, rows].double(), -1)
    want_lp = logp.gather(1, torch.tensor(trial.key_ids).unsqueeze(1)).sum().item()
    assert got["key_logprob"] == pytest.approx(want_lp, abs=2e-3)
    assert got["digits"] == tok.decode(out.logits[0, rows].argmax(-1).tolist())
    a, b = trial.needle
    want_mass = [att[0, :, rows, a:b].sum(-1).double() for att in out.attentions]  # (Hq, k) per layer
    assert got["mass"] == pytest.approx([m.mean().item() for m in want_mass], abs=2e-4)
    assert got["mass_max"] == pytest.approx([m.mean(-1).max().item() for m in want_mass], abs=2e-4)
    assert max(got["mass"]) > 0.05  # some layer looks at the needle when reading the key out
    starts = [s for s in range(a, b) if trial.prompt[s : s + len(trial.key_ids)] == trial.key_ids]
    assert len(starts) == 2  # the needle writes the key twice
    want_copy = [sum(att[0, :, r, s + i] for s in starts).double() for att in out.attentions
                 for i, r in enumerate(rows)]  # fmt: skip
    want_copy = torch.stack(want_copy).reshape(len(out.attentions), k, -1).mean(1)  # (layers, Hq)
    assert got["copy"] == pytest.approx(want_copy.mean(-1).tolist(), abs=2e-4)
    assert got["copy_max"] == pytest.approx(want_copy.amax(-1).tolist(), abs=2e-4)
    assert got["sink"] == pytest.approx([att[0, :, rows, 0].double().mean().item() for att in out.attentions],
                                        abs=2e-4)
    assert all(c <= m + 1e-4 for c, m in zip(got["copy"], got["mass"]))
    q = PK.needle_attention(lm, trial, get_scheme("kivi-serve-2bit"))
    assert len(q["mass"]) == len(got["mass"]) and q["key_logprob"] != got["key_logprob"]
    # the ablations: the fp16 row is the stock model's; the whole model left unquantized ("exact in"
    # every layer) is fp16 again, and "only" every layer is the scheme itself
    every = list(range(len(got["mass"])))
    rows_ = {r["variant"]: r for r in PK.ablate(lm, trial, get_scheme("kivi-serve-2bit"), 128,
                                                groups={"all": every, "none": []})}  # fmt: skip
    # "only all" is the scheme itself and "exact in none" / "only none" repeat earlier layer sets
    assert list(rows_) == ["fp16", "kivi-serve-2bit", "K exact", "V exact", "exact in all"]
    assert rows_["fp16"]["key_logprob"] == pytest.approx(want_lp, abs=2e-3)
    assert rows_["exact in all"]["key_logprob"] == pytest.approx(rows_["fp16"]["key_logprob"], abs=1e-4)
    assert rows_["kivi-serve-2bit"]["key_logprob"] == pytest.approx(q["key_logprob"], abs=1e-4)
    assert rows_["fp16"]["correct"] == (rows_["fp16"]["digits"] == trial.key)
    assert len({rows_[v]["key_logprob"] for v in ("fp16", "kivi-serve-2bit", "K exact", "V exact")}) == 4
    bands = PK.layer_bands(30)
    assert [i for b in bands.values() for i in b] == list(range(30))  # consecutive, every layer once
    assert {len(b) for b in bands.values()} == {7, 8} and list(bands)[0] == "0-7" and len(bands) == 4


# --------------------------------------------------------------------------- through vLLM
@pytest.mark.vllm
@pytest.mark.slow
def test_small_grid_through_vllm(model, tmp_path):
    """1K tokens, 3 depths, fp16 (vLLM's default backend) vs 2-bit pages: the JSON schema, fp16 finds
    every key, and the answers read the document from the prefix cache (the quantized pages)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = PK.run_cli(out=str(tmp_path / "pk"), json_out=True, model=model, contexts=[1024],
                        depths=[0, 50, 100], seeds=1, schemes=["fp16", "kivi-serve-2bit"], progress=False)
    assert rc == 0
    report = json.loads(buf.getvalue().strip().splitlines()[-1])
    rows = report["results"]
    assert {r["scheme"] for r in rows} == {"fp16", "kivi-serve-2bit"}
    assert [r["depth"] for r in rows if r["scheme"] == "fp16"] == [0, 50, 100, "all"]
    for r in rows:
        assert SCHEMA <= set(r)
        assert 0 <= r["accuracy"] <= 1 and r["key_logprob"] <= 0
        assert r["n"] == (3 if r["depth"] == "all" else 1)
    fp16 = {r["depth"]: r for r in rows if r["scheme"] == "fp16"}
    assert fp16["all"]["accuracy"] == 1.0, report["failures"]
    assert fp16["all"]["key_logprob"] > -2.0
    failed = {(f["scheme"], f["depth"]) for f in report["failures"]}
    assert failed == {(r["scheme"], r["depth"]) for r in rows if r["depth"] != "all" and r["accuracy"] < 1}
    assert "trials" not in report
    # the file report has every trial: each answer read the document's full pages from the cache
    saved = json.loads((tmp_path / "pk.json").read_text())
    assert saved["results"] == rows and len(saved["trials"]) == 6
    for t in saved["trials"]:
        assert t["cached_tokens"] >= 5 * 128 and len(t["key_ranks"]) == PK.KEY_DIGITS
    assert (tmp_path / "pk.png").stat().st_size > 10_000
