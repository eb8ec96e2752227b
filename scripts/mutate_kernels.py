"""Seeded single-operator mutations of the CUDA kernels, run against the tests emulated on CPU.

    python scripts/mutate_kernels.py --sample 40 --seed 0 --jobs 2 --json mutants.json
    python scripts/mutate_kernels.py --list                      # every mutation site, no run
    python scripts/mutate_kernels.py --ids quanti-0123 decode-0456   # chosen sites of --list
    python scripts/mutate_kernels.py --replace decode_attention "tok < valid ?" "tok <= valid ?"

A mutant is a copy of cuda/ with one operator changed at one place in the body of
cuda/quantize_append.cu or cuda/decode_attention.cu (code after the opening `namespace {`; comments,
preprocessor lines and static_asserts excluded): `+ 1` -> `+ 2`, `- 1` -> `- 2`, `<` <-> `<=`,
`>` <-> `>=`, `==` <-> `!=`, `&&` <-> `||`, `*` -> `+`, `+` <-> `-`, `/` -> `*`, `%` -> `/`,
`<<` <-> `>>`, `&` <-> `|`, `^` -> `&`, `+=` -> `-=`, and deleting a `__syncthreads();` or
`__syncwarp();` statement. Binary operators are recognised by the spaces around them (the
sources are clang-formatted), so template brackets, pointers and dereferences are left alone.

Each sampled mutant is compiled for the CPU (g++, the SIMT runtime); one that no longer compiles
is counted apart. The others run the simt tests of their source (pytest -x, in a subprocess, with
KIVI_SERVE_SIMT_SOURCES pointing at the copy and a fresh kernel cache): a failing or timed-out run
kills the mutant; one that passes every test survives (listed: read them, some are equivalent).
Not run by `make test` (minutes per mutant on two cores).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA = ROOT / "cuda"
SOURCES = ("quantize_append", "decode_attention")
#: The tests each source's mutants run (test_kernels_simt.py -k).
TESTS = {
    "quantize_append": "append_schedule or early_finalisation or dequantize or race_check_is_clean",
    "decode_attention": "decode or race_check_is_clean",
}
#: (name, regex, replacement): binary operators with a space on each side.
OPERATORS = [
    ("+1->+2", r"(?<=\s)\+ 1\b", "+ 2"),
    ("-1->-2", r"(?<=\s)- 1\b", "- 2"),
    ("<-><=", r"(?<=\s)<(?=\s)", "<="),
    ("<=-><", r"(?<=\s)<=(?=\s)", "<"),
    (">->=", r"(?<=\s)>(?=\s)", ">="),
    (">=->", r"(?<=\s)>=(?=\s)", ">"),
    ("==->!=", r"(?<=\s)==(?=\s)", "!="),
    ("!=->==", r"(?<=\s)!=(?=\s)", "=="),
    ("&&->||", r"(?<=\s)&&(?=\s)", "||"),
    ("||->&&", r"(?<=\s)\|\|(?=\s)", "&&"),
    ("*->+", r"(?<=\s)\*(?=\s)", "+"),
    ("+->-", r"(?<=\s)\+(?=\s)", "-"),
    ("-->+", r"(?<=\s)-(?=\s)", "+"),
    ("/->*", r"(?<=\s)/(?=\s)", "*"),
    ("%->/", r"(?<=\s)%(?=\s)", "/"),
    ("<<->>>", r"(?<=\s)<<(?=\s)", ">>"),
    (">>-><<", r"(?<=\s)>>(?=\s)", "<<"),
    ("&->|", r"(?<=\s)&(?=\s)", "|"),
    ("|->&", r"(?<=\s)\|(?=\s)", "&"),
    ("^->&", r"(?<=\s)\^(?=\s)", "&"),
    ("+=->-=", r"(?<=\s)\+=(?=\s)", "-="),
]
BARRIER = re.compile(r"^\s*(__syncthreads|__syncwarp)\(\);\s*$")


@dataclass
class Mutant:
    source: str
    line: int  # 1-based
    col: int
    op: str
    old: str
    new: str  # the whole new line
    id: str = ""

    def describe(self) -> str:
        return f"{self.source}.cu:{self.line} [{self.op}] {self.old.strip()!r} -> {self.new.strip()!r}"


def sites(source: str) -> list[Mutant]:
    """Every mutation of one kernel source, in file order."""
    lines = (CUDA / f"{source}.cu").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("namespace {"))
    out = []
    for i in range(start + 1, len(lines)):
        line = lines[i]
        code = line.split("//", 1)[0]
        stripped = code.strip()
        if not stripped or stripped.startswith(("#", "static_assert")):
            continue
        if BARRIER.match(code):
            out.append(Mutant(source, i + 1, 0, "delete-barrier", line, ""))
            continue
        for name, pattern, repl in OPERATORS:
            for m in re.finditer(pattern, code):
                new = code[: m.start()] + repl + code[m.end() :] + line[len(code) :]
                out.append(Mutant(source, i + 1, m.start(), name, line, new))
    for k, m in enumerate(out):
        m.id = f"{source[:6]}-{k:04d}"
    return out


def apply(mutant: Mutant, dst: Path) -> Path:
    """A copy of cuda/ under dst with the mutant applied; returns the copy."""
    cuda = dst / "cuda"
    shutil.copytree(CUDA, cuda)
    path = cuda / f"{mutant.source}.cu"
    lines = path.read_text().splitlines(keepends=True)
    assert lines[mutant.line - 1].rstrip("\n") == mutant.old, "source changed since the sites were listed"
    lines[mutant.line - 1] = mutant.new + "\n" if mutant.new else ""
    path.write_text("".join(lines))
    return cuda


def _env(cuda: Path, cache: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        KIVI_SERVE_SIMT_SOURCES=str(cuda),
        KIVI_SERVE_CACHE=str(cache),
        KIVI_SERVE_SIMT_LAZY="1",
        KIVI_SERVE_SIMT_TIMEOUT="60",
        OMP_NUM_THREADS="1",
    )
    return env


def compiles(cuda: Path, source: str, cache: Path) -> tuple[bool, str]:
    code = (
        "import torch\n"
        "from tests.support import simt\n"
        "from kivi_serve.kernels.loader import KernelSpec\n"
        "from kivi_serve.quant.layout import PageLayout\n"
        f"spec = KernelSpec.for_layout({source!r}, PageLayout(128, 64), torch.bfloat16)\n"
        f"simt.build(spec, 'plain', {str(cuda)!r})\n"
    )
    run = subprocess.run([sys.executable, "-c", code], env=_env(cuda, cache), capture_output=True, text=True)
    return run.returncode == 0, run.stderr[-2000:]


def run_mutant(mutant: Mutant, timeout: float) -> dict:
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="kivi-mutant-") as tmp:
        tmp = Path(tmp)
        cuda = apply(mutant, tmp)
        cache = tmp / "cache"
        ok, err = compiles(cuda, mutant.source, cache)
        if not ok:
            return {**asdict(mutant), "outcome": "no-compile", "seconds": round(time.time() - t0, 1)}
        cmd = [
            sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "simt",
            str(ROOT / "tests" / "test_kernels_simt.py"), "-k", TESTS[mutant.source],
        ]  # fmt: skip
        try:
            run = subprocess.run(
                cmd, env=_env(cuda, cache), capture_output=True, text=True, timeout=timeout, cwd=ROOT
            )
        except subprocess.TimeoutExpired:
            return {**asdict(mutant), "outcome": "killed", "by": f"timeout ({timeout:.0f} s)",
                    "seconds": round(time.time() - t0, 1)}  # fmt: skip
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", run.stdout, flags=re.M)
        if run.returncode == 0:
            outcome, by = "survived", ""
        elif failed:
            outcome, by = "killed", failed[0].split("::")[-1]
        else:
            outcome, by = "error", run.stdout[-1500:] + run.stderr[-1500:]
        return {**asdict(mutant), "outcome": outcome, "by": by, "seconds": round(time.time() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=int, default=40, help="mutants to run (split evenly over the sources)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source", choices=(*SOURCES, "all"), default="all")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per mutant's test run")
    ap.add_argument("--list", action="store_true", help="print every mutation site and exit")
    ap.add_argument(
        "--replace",
        nargs=3,
        metavar=("SOURCE", "OLD", "NEW"),
        help="run one hand-made mutant: replace the unique substring OLD of SOURCE.cu by NEW",
    )
    ap.add_argument("--ids", nargs="+", help="run these sites of --list instead of a sample")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    sources = SOURCES if args.source == "all" else (args.source,)
    if args.replace:
        source, old, new = args.replace
        lines = (CUDA / f"{source}.cu").read_text().splitlines()
        hits = [i for i, line in enumerate(lines) if old in line]
        if len(hits) != 1:
            ap.error(f"{old!r} must occur on exactly one line of {source}.cu (found {len(hits)})")
        i = hits[0]
        new_line = lines[i].replace(old, new)
        todo = [Mutant(source, i + 1, lines[i].index(old), "by hand", lines[i], new_line, "hand")]
    else:
        everything = {s: sites(s) for s in sources}
        if args.list:
            for s in sources:
                for m in everything[s]:
                    print(m.id, m.describe())
            print({s: len(v) for s, v in everything.items()})
            return 0
        if args.ids:
            by_id = {m.id: m for s in sources for m in everything[s]}
            todo = [by_id[i] for i in args.ids]
        else:
            rng = random.Random(args.seed)
            per = -(-args.sample // len(sources))
            todo = [m for s in sources for m in rng.sample(everything[s], min(per, len(everything[s])))]
    print(f"{len(todo)} mutant(s), {args.jobs} at a time", flush=True)
    results = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for r in pool.map(lambda m: run_mutant(m, args.timeout), todo):
            results.append(r)
            m = Mutant(**{k: r[k] for k in ("source", "line", "col", "op", "old", "new", "id")})
            by = r.get("by", "")[:200]
            print(f"{r['outcome']:10s} {r['seconds']:7.1f}s  {m.id}  {m.describe()}  {by}", flush=True)
    compiled = [r for r in results if r["outcome"] in ("killed", "survived")]
    killed = [r for r in compiled if r["outcome"] == "killed"]
    summary = {
        "seed": args.seed,
        "sampled": len(results),
        "no_compile": sum(r["outcome"] == "no-compile" for r in results),
        "errors": sum(r["outcome"] == "error" for r in results),
        "compiled": len(compiled),
        "killed": len(killed),
        "survived": len(compiled) - len(killed),
        "kill_rate": round(len(killed) / len(compiled), 3) if compiled else None,
        "by_source": {
            s: {
                "compiled": sum(r["source"] == s for r in compiled),
                "killed": sum(r["source"] == s for r in killed),
            }
            for s in sources
        },
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "mutants": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
