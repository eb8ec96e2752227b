"""Count the SASS instructions of a kernel's per-page loop, from a cubin, without a GPU.

    python -m kivi_serve.kernels.sass CUBIN [--kernel kivi_decode]

The disassembler is NVIDIA's ``nvdisasm`` (CUDA toolkit, or PyPI ``nvidia-cuda-nvdisasm``, which the
dev install brings) or, failing that, ``cuobjdump -sass``. From its text this module builds the
kernel's control-flow graph (basic blocks split at labels, branches and EXITs), finds the natural
loops (a back edge is an edge to a block that dominates its source), and takes as the **per-page
loop** the outermost loop whose body holds tensor-core instructions (``HMMA``). Its size is what
``sass_per_page`` reports:

* the number of instructions in the loop's blocks (NOPs excluded), every block counted once — an
  upper bound of what one warp issues per page where a branch skips code (the exact-token chunk,
  a partial page), and the exact count where nothing is skipped;
* blocks that only a diverged warp reaches (through a taken ``BRA.DIV``: the compiler's fall-backs
  for warp collectives it cannot prove convergent) are in the count too, and reported apart as
  ``divergence_fallback``: a converged warp never issues them;
* loops nested inside it (``inner_loops``) run more than once per page, so the count is then a
  lower bound: the decode kernel's counting build (``KIVI_COUNT_BUILD=1``) unrolls every in-page
  loop, and the cost model refuses a count with inner loops.

The count is of the SASS text only: it says nothing about latency, stalls, bank conflicts or dual
issue (docs/performance.md, "The static cost model").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

#: One instruction line of nvdisasm / cuobjdump: ``/*0a50*/  @!P0 HMMA.16816.F32.BF16 R24, ... ;``
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_[A-Za-z0-9_]+):")
_TARGET = re.compile(r"`\((\.L_[A-Za-z0-9_]+)\)|(0x[0-9a-f]+)\s*;?\s*$")
_PRED_OPERAND = re.compile(r"^!?U?P[T0-9]+\s*,")
_FUNC = re.compile(r"^\s*(?:\.text\.|Function\s*:\s*)([A-Za-z_][A-Za-z0-9_]*)")


class DisassemblerNotFound(RuntimeError):
    """Neither nvdisasm nor cuobjdump is installed."""


def _pip_tool(name: str) -> str | None:
    """``name`` from a PyPI ``nvidia-cuda-*`` wheel (``nvidia/cu13/bin/<name>``), or None."""
    spec = importlib.util.find_spec("nvidia")
    for root in spec.submodule_search_locations if spec and spec.submodule_search_locations else ():
        for path in sorted(Path(root).glob(f"*/bin/{name}")):
            if os.access(path, os.X_OK):
                return str(path)
    return None


def find_tool(name: str) -> str | None:
    """Path of a CUDA binary tool (``nvdisasm``, ``cuobjdump``): ``$KIVI_SERVE_<NAME>``, the CUDA
    toolkit (``$CUDA_PATH``, ``$CUDA_HOME``, ``PATH``, ``/usr/local/cuda``), then a PyPI wheel."""
    candidates = [os.environ.get(f"KIVI_SERVE_{name.upper()}")]
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / name))
    candidates += [shutil.which(name), f"/usr/local/cuda/bin/{name}", _pip_tool(name)]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def find_disassembler() -> tuple[str, str] | None:
    """(kind, path) of the SASS disassembler to use — ``nvdisasm`` preferred — or None."""
    for name in ("nvdisasm", "cuobjdump"):
        path = find_tool(name)
        if path:
            return name, path
    return None


@dataclass
class Insn:
    addr: int
    opcode: str  # e.g. "HMMA.16816.F32.BF16"
    operands: str
    predicated: bool
    target: str | None = None  # branch target label (or hex address) for BRA


@dataclass
class Block:
    start: int  # index of the first instruction
    end: int  # one past the last
    succ: list[int] = field(default_factory=list)


def disassemble(cubin: Path, kernel: str) -> list[Insn]:
    """The SASS of ``kernel`` in ``cubin``, one :class:`Insn` per instruction, labels resolved."""
    found = find_disassembler()
    if found is None:
        raise DisassemblerNotFound(
            "no SASS disassembler: install the CUDA toolkit's nvdisasm or cuobjdump, or "
            "pip install nvidia-cuda-nvdisasm (the dev install does)"
        )
    kind, tool = found
    cmd = [tool, "-c", str(cubin)] if kind == "nvdisasm" else [tool, "-sass", str(cubin)]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return parse(text, kernel)


def parse(text: str, kernel: str) -> list[Insn]:
    """:func:`disassemble` on disassembler text (nvdisasm ``-c`` or ``cuobjdump -sass``)."""
    insns: list[Insn] = []
    labels: dict[str, int] = {}  # label -> instruction address
    pending: list[str] = []
    current = None
    for line in text.splitlines():
        fm = _FUNC.match(line)
        if fm and ":" in line:
            current = fm.group(1)
            continue
        if current != kernel:
            continue
        lm = _LABEL.match(line)
        if lm:
            pending.append(lm.group(1))
            continue
        im = _INSN.search(line)
        if not im:
            continue
        addr = int(im.group(1), 16)
        for name in pending:
            labels[name] = addr
        pending = []
        opcode, operands = im.group(3), im.group(4).strip()
        insn = Insn(addr, opcode, operands, predicated=bool(im.group(2)))
        if opcode.split(".")[0] in ("BRA", "BRX", "JMP", "JMX", "CALL"):
            tm = _TARGET.search(operands + ";")
            if tm:
                insn.target = tm.group(1) or tm.group(2)
        insns.append(insn)
    if not insns:
        raise ValueError(f"kernel {kernel!r} not found in the disassembly")
    for insn in insns:
        if insn.target and insn.target.startswith(".L"):
            insn.target = hex(labels[insn.target]) if insn.target in labels else None
    return insns


def _blocks(insns: list[Insn]) -> list[Block]:
    by_addr = {insn.addr: i for i, insn in enumerate(insns)}
    leaders = {0}
    for i, insn in enumerate(insns):
        base = insn.opcode.split(".")[0]
        if insn.target is not None and int(insn.target, 16) in by_addr:
            leaders.add(by_addr[int(insn.target, 16)])
        if base in ("BRA", "BRX", "JMP", "JMX", "CALL", "EXIT", "RET") and i + 1 < len(insns):
            leaders.add(i + 1)
    starts = sorted(leaders)
    blocks = [Block(s, e) for s, e in zip(starts, starts[1:] + [len(insns)])]
    index = {b.start: k for k, b in enumerate(blocks)}
    for k, b in enumerate(blocks):
        last = insns[b.end - 1]
        base = last.opcode.split(".")[0]
        # `@P0 BRA !P1, target` is conditional too, and so is `BRA.DIV` (taken only when the warp has
        # diverged: the compiler's fall-back for a warp collective); an unpredicated BRA / EXIT ends the path.
        divergent_only = last.opcode.startswith("BRA.DIV")
        conditional = last.predicated or bool(_PRED_OPERAND.match(last.operands)) or divergent_only
        if last.target is not None and int(last.target, 16) in by_addr:
            b.succ.append(index[by_addr[int(last.target, 16)]])
        falls = base not in ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET") or conditional
        if base in ("BRX", "JMX"):  # indirect: unknown targets (the kernels have none)
            falls = True
        if falls and k + 1 < len(blocks):
            b.succ.append(k + 1)
    return blocks


def _dominators(blocks: list[Block]) -> list[set[int]]:
    """Dominator sets of the blocks reachable from the entry (empty for the others: an unreachable
    block must not look like the source of a back edge)."""
    n = len(blocks)
    reach, stack = {0}, [0]
    while stack:
        for s in blocks[stack.pop()].succ:
            if s not in reach:
                reach.add(s)
                stack.append(s)
    preds: list[list[int]] = [[] for _ in range(n)]
    for k in reach:
        for s in blocks[k].succ:
            preds[s].append(k)
    dom = [set(reach) if k in reach else set() for k in range(n)]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for k in sorted(reach - {0}):
            new = set.intersection(*(dom[p] for p in preds[k])) | {k}
            if new != dom[k]:
                dom[k], changed = new, True
    return dom


def loops(insns: list[Insn]) -> tuple[list[tuple[int, set[int]]], list[Block]]:
    """The natural loops of the kernel — (header block, body blocks) per loop header — and its blocks."""
    blocks = _blocks(insns)
    dom = _dominators(blocks)
    preds: list[list[int]] = [[] for _ in blocks]
    for k, b in enumerate(blocks):
        for s in b.succ:
            preds[s].append(k)
    bodies: dict[int, set[int]] = {}
    for k, b in enumerate(blocks):
        for h in b.succ:
            if dom[k] and h in dom[k]:  # back edge k -> h
                body, stack = {h, k}, [k] if k != h else []
                while stack:  # every block that reaches the latch without passing the header
                    x = stack.pop()
                    for p in preds[x]:
                        if p not in body:
                            body.add(p)
                            stack.append(p)
                bodies.setdefault(h, set()).update(body)
    return [(h, body) for h, body in bodies.items()], blocks


def page_loop_count(insns: list[Insn], marker: str = "HMMA") -> dict:
    """``sass_per_page`` and friends for the outermost loop whose body holds a ``marker`` instruction.

    Returns ``{"sass_per_page", "hmma", "inner_loops", "divergence_fallback", "loop_start",
    "loop_end"}``: instructions in the loop body (NOPs excluded), how many of them are tensor-core
    MMAs, loops nested inside it, how many of the body's instructions only a diverged warp reaches
    (blocks reached from the loop header only through a taken ``BRA.DIV``: the compiler's fall-backs
    for warp collectives it cannot prove convergent; counted in ``sass_per_page``, never issued by a
    converged warp), and the address range the body spans.
    """
    found, blocks = loops(insns)

    def insns_of(body):
        return [insns[i] for k in body for i in range(blocks[k].start, blocks[k].end)]

    with_marker = [(h, body) for h, body in found if any(x.opcode.startswith(marker) for x in insns_of(body))]
    if not with_marker:
        raise ValueError(f"no loop holds a {marker} instruction")
    h, body = max(with_marker, key=lambda hb: len(hb[1]))  # the outermost: it contains the others
    inner = [hb for hb in found if hb[0] != h and hb[1] <= body]
    body_insns = [x for x in insns_of(body) if not x.opcode.startswith("NOP")]
    converged, stack = {h}, [h]  # the body's blocks a converged warp reaches: no taken BRA.DIV
    while stack:
        k = stack.pop()
        div = insns[blocks[k].end - 1].opcode.startswith("BRA.DIV")
        for s in blocks[k].succ:
            if s in body and s not in converged and not (div and s != k + 1):
                converged.add(s)
                stack.append(s)
    fallback = [x for x in insns_of(body - converged) if not x.opcode.startswith("NOP")]
    return {
        "sass_per_page": len(body_insns),
        "hmma": sum(x.opcode.startswith(marker) for x in body_insns),
        "inner_loops": len(inner),
        "divergence_fallback": len(fallback),
        "loop_start": min(x.addr for x in body_insns),
        "loop_end": max(x.addr for x in body_insns),
    }


def count_cubin(cubin: Path, kernel: str = "kivi_decode") -> dict:
    """:func:`page_loop_count` of ``kernel`` in ``cubin`` (needs a disassembler, no GPU)."""
    return page_loop_count(disassemble(Path(cubin), kernel))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cubin", type=Path)
    parser.add_argument("--kernel", default="kivi_decode")
    args = parser.parse_args(argv)
    print(json.dumps(count_cubin(args.cubin, args.kernel)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
