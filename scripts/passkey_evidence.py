"""Evidence for the failed passkeys of a saved grid: ``python scripts/passkey_evidence.py REPORT.json``
(a development tool run from the repository root; the report is what ``kivi-serve eval --task passkey
--out PREFIX`` writes, with every trial).

For every failed trial (``--limit``: at most that many; the default 2-bit scheme's first) the
accuracy harness reruns the prompt teacher-forced in the engine's steps, for fp16 and for the
failing scheme, and records the digits the engine produced, the key's log-probability, and per
layer the attention mass on the needle's tokens from the queries that predict the key
(:func:`kivi_serve.eval.passkey.needle_attention`). Prints one line per failure and a per-layer
table (mean over failures of the mass, fp16 vs quantized); ``--out FILE`` writes the JSON.

``--ablate SCHEME``: instead, for each failed trial of SCHEME that fp16 retrieves (``--contexts``,
``--per-context`` and ``--limit`` pick fewer), the key's log-probability with parts of SCHEME's pages left
unquantized — keys, values, bands of layers (:func:`kivi_serve.eval.passkey.ablate`) — to find which part
of the format loses the key. The variants of a trial share its first engine step (computed once, exactly).
"""

from __future__ import annotations

import argparse
import json
import sys

from kivi_serve.eval.passkey import evidence_from_report, failed_trials


def layer_table(evidence: list[dict]) -> list[dict]:
    """Per layer, over the failures of quantized schemes: mean needle mass (mean over query heads and
    the head that looks most) under fp16 and under the failing scheme."""
    rows = [e for e in evidence if e["quantized"] is not None]
    if not rows:
        return []
    n_layers = len(rows[0]["fp16"]["mass"])
    out = []

    def mean(key: str, side: str, layer: int) -> float:
        return round(sum(e[side][key][layer] for e in rows) / len(rows), 4)

    keys = ("mass", "mass_max", "copy", "copy_max", "sink")
    for L in range(n_layers):
        row = {"layer": L}
        for k in keys:
            row[f"fp16_{k}"] = mean(k, "fp16", L)
            row[f"quant_{k}"] = mean(k, "quantized", L)
        out.append(row)
    return out


def parse_groups(text: str | None) -> dict[str, list[int]] | None:
    """``"0-16,17-24"`` → ``{"0-16": [0, ..., 16], "17-24": [17, ..., 24]}``."""
    if not text:
        return None
    groups = {}
    for part in text.split(","):
        a, _, b = part.strip().partition("-")
        groups[part.strip()] = list(range(int(a), int(b or a) + 1))
    return groups


def pick_failures(report: dict, scheme: str, limit: int = -1, contexts: list[int] | None = None,
                  per_context: int = -1) -> list:
    """``scheme``'s failed trials (:func:`failed_trials`) that fp16 retrieves in the same report (a key
    fp16 also loses says nothing about the cache), only at ``contexts`` (None: all), at most
    ``per_context`` per context and ``limit`` in all (-1: no cap), in grid order."""
    ok16 = {(t["context"], t["depth"], t["seed"]) for t in report["trials"]
            if t["scheme"] == "fp16" and t["correct"]}  # fmt: skip
    picked, count = [], {}
    for o, t in failed_trials(report, scheme):
        if (o.context, o.depth, o.seed) not in ok16 or (contexts and o.context not in contexts):
            continue
        if per_context >= 0 and count.get(o.context, 0) >= per_context:
            continue
        count[o.context] = count.get(o.context, 0) + 1
        picked.append((o, t))
    return picked[: None if limit < 0 else limit]


def ablate_failures(report: dict, scheme: str, limit: int, device: str, out: str | None,
                    groups: dict[str, list[int]] | None, contexts: list[int] | None = None,
                    per_context: int = -1) -> int:
    from kivi_serve.eval import harness as H
    from kivi_serve.eval.passkey import ablate
    from kivi_serve.model.prepare import resolve_model
    from kivi_serve.quant.schemes import get_scheme

    picked = pick_failures(report, scheme, limit, contexts, per_context)
    lm = H.load_model(resolve_model(report["model"]), device)
    page = (report.get("page_sizes") or {}).get(scheme) or report["page_size"]
    rows = []
    for o, t in picked:
        for r in ablate(lm, t, get_scheme(scheme), page, report["chunk"], groups):
            rows.append({"context": t.context, "depth": t.depth, "seed": t.seed, "key": t.key,
                         "engine_digits": o.digits} | r)
            print(f"{t.context:5d} tok depth {t.depth:3d} % seed {t.seed}, key {t.key} ({o.digits or '-'}): "
                  f"{r['variant']:18s} log P {r['key_logprob']:7.3f}  argmax {r['digits']!r}", flush=True)
    if out:
        with open(out, "w") as fh:
            json.dump({"report": report.get("_path"), "scheme": scheme, "page_size": page, "rows": rows}, fh,
                      indent=1)
            fh.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python scripts/passkey_evidence.py", description=__doc__.split("\n")[0]
    )
    ap.add_argument("report", help="a passkey report JSON written by --out (it lists every trial)")
    ap.add_argument("--limit", type=int, default=-1, help="at most this many failures (default: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the evidence and the layer table as JSON")
    ap.add_argument("--ablate", default=None, metavar="SCHEME",
                    help="ablations of SCHEME's pages on its failed trials instead of attention evidence")
    ap.add_argument("--groups", default=None, metavar="A-B,...",
                    help="--ablate: layer groups (default: four equal bands), e.g. 0-16,17-24,25-29")
    ap.add_argument("--contexts", default=None, metavar="C,...",
                    help="--ablate: only the failures at these contexts (e.g. 1024,2048)")
    ap.add_argument("--per-context", type=int, default=-1,
                    help="--ablate: at most this many failures per context (default: all)")
    a = ap.parse_args(argv)
    with open(a.report) as fh:
        report = json.load(fh)
    report["_path"] = a.report
    if "trials" not in report:
        ap.error(f"{a.report} has no per-trial list: write it with --out PREFIX")
    if a.ablate:
        contexts = [int(c) for c in a.contexts.split(",")] if a.contexts else None
        return ablate_failures(report, a.ablate, a.limit, a.device, a.out, parse_groups(a.groups), contexts,
                               a.per_context)
    ev = evidence_from_report(report, a.limit, a.device)
    for e in ev:
        q = e["quantized"] or {}
        print(
            f"{e['scheme']:16s} {e['context']:5d} tok depth {e['depth']:3d} % seed {e['seed']}: "
            f"key {e['key']} "
            f"engine gave {e['engine_digits'] or '-':>6s} | harness argmax fp16 {e['fp16']['digits']!r} "
            f"(log P {e['fp16']['key_logprob']:.2f}), quantized {q.get('digits')!r} "
            f"(log P {q.get('key_logprob', float('nan')):.2f})",
            flush=True,
        )
    table = layer_table(ev)
    if table:
        print("\nper layer, fp16 / quantized: attention mass of the key-predicting queries on the needle "
              "(mean over heads; the head that looks most), on the digit to copy (same), on the sink")
        for r in table:
            print(
                f"{r['layer']:5d}  needle {r['fp16_mass']:.3f}/{r['quant_mass']:.3f} "
                f"({r['fp16_mass_max']:.3f}/{r['quant_mass_max']:.3f})  "
                f"copy {r['fp16_copy']:.3f}/{r['quant_copy']:.3f} "
                f"({r['fp16_copy_max']:.3f}/{r['quant_copy_max']:.3f})  "
                f"sink {r['fp16_sink']:.3f}/{r['quant_sink']:.3f}"
            )
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"report": a.report, "evidence": ev, "layers": table}, fh, indent=1)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
