"""The staging pool on the model's device: one step's :class:`~kivi_serve.backend.staging.AppendPlan`
from what the host knows (sequence lengths) and what only the device knows (block ids).

vLLM 0.32 hands an attention builder the step's lengths on the host (``query_start_loc_cpu``,
``seq_lens_cpu_upper_bound``) but its block table only on the device (model runner V2 keeps no
host copy). So the work is split:

- :func:`step_pages` (host, numpy): which pages each row touches, where each page's new tokens start
  and how full it ends (``start``, ``fill``), each token's page and in-page offset, each row's last
  page. Pure arithmetic on lengths: no block id, no device read.
- :class:`DeviceStagingPool` (device, torch ops, once per step): looks the pages' block ids up in the
  device block table and runs the staging pool's rules on a device copy of its state (which block
  each slot holds, its fill, its last write). It produces the very plan the host
  :class:`~kivi_serve.backend.staging.StagingPool` produces (the planner fuzz test compares them),
  with the op lists padded to one entry per page (``blocks < 0``: no op), so that the shapes depend
  on the batch's lengths only — for a uniform decode batch of ``B`` rows, on ``B`` only.

Nothing here reads a device tensor on the host: no ``.item()``, ``.tolist()``, ``.cpu()``, no
boolean-mask indexing (its output shape would depend on device data). All outputs live in
persistent buffers (fixed addresses), so a CUDA graph captured over the kernels that read them
replays correctly after the next :meth:`DeviceStagingPool.plan`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kivi_serve.backend.staging import AppendPlan, PageOps

#: Block id vLLM reserves as the null block (padding rows of block tables point at it).
NULL_BLOCK = 0


def device_state(t: torch.Tensor) -> torch.Tensor:
    """Every persistent device tensor of the backend passes through here (identity). The no-host-sync
    test replaces it to mark such tensors, so that a host read of them is caught on a CPU machine."""
    return t


@dataclass
class StepPages:
    """The pages one step touches, from lengths alone (host, int32 numpy arrays).

    One entry per page a row writes (a row without new tokens gets one placeholder entry with
    ``pages = -1``, so a uniform decode batch of ``B`` rows always has ``B`` entries).

    rows, pages : (E,) — batch row and logical page index of each entry (``pages < 0``: placeholder).
    starts, fills : (E,) — in-page offset of the page's first new token; tokens in it after the step.
    firsts : (E,) — batch index of the page's first new token.
    token_entries, token_offsets : (T,) — each token's entry (``-1``: padding token) and in-page offset.
    tail_entries : (B,) — entry of the row's last page when it stays partial (``L % P != 0``), else -1.
    num_open : int — entries that stay open (``fill < P``): slots this step needs at most (pages of
        dummy rows on the null block included: the host cannot tell them apart).
    """

    rows: np.ndarray
    pages: np.ndarray
    starts: np.ndarray
    fills: np.ndarray
    firsts: np.ndarray
    token_entries: np.ndarray
    token_offsets: np.ndarray
    tail_entries: np.ndarray
    num_open: int

    @property
    def num_entries(self) -> int:
        return int(self.pages.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.token_entries.shape[0])

    @property
    def num_rows(self) -> int:
        return int(self.tail_entries.shape[0])


def step_pages(
    query_start_loc: np.ndarray, seq_lens: np.ndarray, page_size: int, num_tokens: int
) -> StepPages:
    """The pages touched by a batch whose rows have ``seq_lens`` tokens after the step, of which
    ``query_start_loc[b + 1] - query_start_loc[b]`` are new.

    query_start_loc : (B + 1,) int · seq_lens : (B,) int (host) · num_tokens : the step's token count
    (``>= query_start_loc[B]``; the tokens beyond are padding and are not staged).
    """
    P = page_size
    qsl = np.asarray(query_start_loc, dtype=np.int64)
    L = np.asarray(seq_lens, dtype=np.int64)
    B = L.shape[0]
    n = qsl[1:] - qsl[:-1]
    if np.any(n < 0):
        raise ValueError("query_start_loc must be non-decreasing")
    short = (n > 0) & (L < n)
    if np.any(short):
        b = int(np.argmax(short))
        raise ValueError(f"sequence {b}: seq_len {int(L[b])} is shorter than its {int(n[b])} new tokens")
    if qsl[B] > num_tokens:
        raise ValueError(f"query_start_loc ends at {int(qsl[B])}, beyond the step's {num_tokens} tokens")
    active = n > 0
    ctx = L - n
    p0 = np.where(active, ctx // P, 0)
    p1 = np.where(active, (L - 1) // P, 0)
    count = np.where(active, p1 - p0 + 1, 1)  # placeholders keep one entry per row
    offs = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(count, out=offs[1:])
    E = int(offs[B])
    row = np.repeat(np.arange(B, dtype=np.int64), count)
    page = p0[row] + (np.arange(E, dtype=np.int64) - offs[row])
    lo = np.maximum(ctx[row], page * P)
    hi = np.minimum(L[row], (page + 1) * P)
    act = active[row]
    starts = np.where(act, lo - page * P, 0)
    fills = np.where(act, hi - page * P, 0)
    firsts = np.where(act, qsl[row] + lo - ctx[row], 0)
    pages = np.where(act, page, -1)

    token_entries = np.full(num_tokens, -1, dtype=np.int64)
    token_offsets = np.zeros(num_tokens, dtype=np.int64)
    T = int(qsl[B])
    if T:
        trow = np.repeat(np.arange(B, dtype=np.int64), n)
        pos = ctx[trow] + (np.arange(T, dtype=np.int64) - qsl[trow])
        token_entries[:T] = offs[trow] + pos // P - p0[trow]
        token_offsets[:T] = pos % P
    tail_entries = np.where(active & (L % P != 0), offs[1:] - 1, -1)
    i32 = np.int32
    return StepPages(
        rows=row.astype(i32),
        pages=pages.astype(i32),
        starts=starts.astype(i32),
        fills=fills.astype(i32),
        firsts=firsts.astype(i32),
        token_entries=token_entries.astype(i32),
        token_offsets=token_offsets.astype(i32),
        tail_entries=tail_entries.astype(i32),
        num_open=int(np.sum(act & (fills < P))),
    )


def max_entries(max_tokens: int, max_rows: int, page_size: int) -> int:
    """Most entries :func:`step_pages` can produce: a row of ``n`` new tokens touches at most
    ``n // P + 2`` pages (a chunk starting mid-page), a row without tokens one placeholder."""
    return max_tokens // page_size + 2 * max_rows


class DeviceStagingPool:
    """The staging pool's state and planning, on the model's device (one per KV-cache group).

    Same rules as :class:`~kivi_serve.backend.staging.StagingPool` (see its module docstring): a page
    written from offset 0 reclaims any slot still mapped to its block; pages that fill are finalised
    and free their slot; pages that stay open keep their slot or take the lowest free one, else the
    least recently written slot not written in this step (its page is finalised early, and re-opened
    when its sequence appends again).

    Parameters
    ----------
    num_slots : int
        Slots in the pool.
    page_size : int
    device : torch.device
    max_tokens, max_rows : int
        Largest step (vLLM's ``max_num_batched_tokens`` and ``max_num_seqs``): sizes the persistent
        plan buffers, which never move (CUDA graphs hold their addresses).
    """

    def __init__(self, num_slots: int, page_size: int, device, max_tokens: int, max_rows: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots, self.page_size = num_slots, page_size
        self.device = torch.device(device)
        self.max_tokens, self.max_rows = int(max_tokens), int(max_rows)
        self.max_entries = max_entries(self.max_tokens, self.max_rows, page_size)
        S, E, T, B = num_slots, self.max_entries, self.max_tokens, self.max_rows
        dev, i32 = self.device, torch.int32

        def buf(n: int, dtype=i32, fill=0) -> torch.Tensor:
            return device_state(torch.full((n,), fill, dtype=dtype, device=dev))

        # state; index S is a trash slot that absorbs the scatters of entries without a slot
        self.slot_block = buf(S + 1, fill=-1)
        self.slot_fill = buf(S + 1)
        self.slot_sink = buf(S + 1, torch.bool, False)
        self.slot_step = buf(S + 1, torch.int64)
        #: reclaimed, early finalisations, re-opened (cumulative)
        self.counters = buf(3, torch.int64)
        self.slot_ids = device_state(torch.arange(S, dtype=torch.int64, device=dev))
        self.step = 0
        # inputs (one host → device copy per step): entries x5, tokens x2, rows x1
        self._input = buf(5 * E + 2 * T + B)
        # outputs: the plan
        self.token_slots, self.token_offsets = buf(T, fill=-1), buf(T)
        self.tail_slots = buf(B, fill=-1)
        self.ops = {
            name: {f: buf(E, torch.bool, False) if f == "sinks" else buf(E, fill=-1) for f in PageOps.FIELDS}
            for name in ("evict", "finalize", "reopen")
        }

    # ------------------------------------------------------------------ views of the plan buffers
    def view(self, num_entries: int, num_tokens: int, num_rows: int) -> AppendPlan:
        """The plan buffers as an :class:`AppendPlan` of these sizes (fixed addresses)."""
        E = num_entries

        def ops(name: str) -> PageOps:
            return PageOps(*(self.ops[name][f][:E] for f in PageOps.FIELDS))

        return AppendPlan(
            self.token_slots[:num_tokens],
            self.token_offsets[:num_tokens],
            ops("evict"),
            ops("finalize"),
            ops("reopen"),
            self.tail_slots[:num_rows],
        )

    def _check_sizes(self, E: int, T: int, B: int) -> None:
        if E > self.max_entries or T > self.max_tokens or B > self.max_rows:
            raise ValueError(
                f"kivi-serve: a step of {B} rows, {T} tokens and {E} pages exceeds the planner's buffers "
                f"({self.max_rows} rows, {self.max_tokens} tokens, {self.max_entries} pages: "
                "max_num_seqs / max_num_batched_tokens)"
            )

    def idle(self, num_entries: int, num_tokens: int, num_rows: int) -> AppendPlan:
        """A plan that does nothing (every op skipped, nothing staged): CUDA-graph capture, dummy runs."""
        self._check_sizes(num_entries, num_tokens, num_rows)
        plan = self.view(num_entries, num_tokens, num_rows)
        for t in (plan.token_slots, plan.tail_slots):
            t.fill_(-1)
        plan.token_offsets.zero_()
        for ops in (plan.evict, plan.finalize, plan.reopen):
            for f in PageOps.FIELDS:
                getattr(ops, f).fill_(False if f == "sinks" else -1)
        return plan

    # ------------------------------------------------------------------ planning
    def _upload(self, g: StepPages) -> list[torch.Tensor]:
        E, T, B = g.num_entries, g.num_tokens, g.num_rows
        host = np.concatenate(
            [g.rows, g.pages, g.starts, g.fills, g.firsts, g.token_entries, g.token_offsets, g.tail_entries]
        )
        src = torch.from_numpy(host)
        if self.device.type == "cuda":
            src = src.pin_memory()  # torch's host allocator keeps it alive until the copy ran
        dst = self._input[: host.shape[0]]
        dst.copy_(src, non_blocking=True)
        return list(torch.split(dst, [E, E, E, E, E, T, T, B]))

    def plan(self, g: StepPages, block_table: torch.Tensor) -> AppendPlan:
        """Plan one step on the device; returns views of the persistent plan buffers.

        block_table : (≥B, W) int32, on the device — vLLM's block table; a page whose block is the null
        block (dummy and padding rows) is left out: nothing staged, nothing finalised.
        """
        E, T, B = g.num_entries, g.num_tokens, g.num_rows
        self._check_sizes(E, T, B)
        S, P = self.num_slots, self.page_size
        if g.num_open > S:
            raise RuntimeError(
                f"staging pool too small: {g.num_open} pages stay open in this step but the pool has "
                f"{S} slots; the pool needs at least one slot per sequence scheduled in a step"
            )
        self.step += 1
        rows, pages, starts, fills, firsts, tok_entry, tok_offset, tail_entry = self._upload(g)
        i32, i64 = torch.int32, torch.int64

        # the block of every page, from the device block table
        blk = block_table[rows.long(), pages.clamp(min=0).long()].to(i32)
        valid = (pages >= 0) & (blk != NULL_BLOCK)
        blk = torch.where(valid, blk, -1)
        fresh = starts == 0
        full = fills == P
        live = self.slot_block[:S]

        # 1. a page written from offset 0 starts afresh: a slot still mapped to its block is stale
        match = (live.unsqueeze(0) == blk.unsqueeze(1)) & valid.unsqueeze(1)  # (E, S)
        reclaim = (match & fresh.unsqueeze(1)).any(0)
        cur = torch.where(match.any(1) & ~fresh, match.to(i32).argmax(1).to(i32), -1)
        # 2. pages that became full: finalised (prefix from their slot, or their own block); slot freed
        fin = valid & full
        fin_slot = torch.where(fin, cur, -1)
        fin_frees = (fin_slot.unsqueeze(1).to(i64) == self.slot_ids.unsqueeze(0)).any(0)
        freed = reclaim | fin_frees
        live = torch.where(freed, -1, live)
        fill_s = torch.where(freed, 0, self.slot_fill[:S])
        # 3. pages that stay open keep their slot, or take the lowest free one, else the least recently
        #    written one that no page of this step holds (its page is finalised early)
        open_ = valid & ~full
        need = open_ & (cur < 0)
        occupied = live >= 0
        pinned = occupied & ((live.unsqueeze(0) == blk.unsqueeze(1)) & open_.unsqueeze(1)).any(0)
        category = torch.where(occupied, torch.where(pinned, 2, 1), 0)
        lru = torch.where(category == 1, self.slot_step[:S], 0)
        order = torch.sort(lru, stable=True).indices
        order = order[torch.sort(category[order], stable=True).indices]
        rank = torch.cumsum(need.to(i32), 0) - 1
        chosen = torch.where(need, order[rank.clamp(min=0, max=S - 1)].to(i32), -1)
        at = chosen.clamp(min=0).long()
        victim = torch.where(chosen >= 0, live[at], -1)
        evicted = victim >= 0
        reopen = need & ~fresh
        page_slot = torch.where(need, chosen, torch.where(open_, cur, -1))

        # the plan, into the persistent buffers
        out = self.view(E, T, B)
        zeros = torch.zeros_like(blk)
        _set(
            out.evict,
            victim,
            torch.where(evicted, chosen, -1),
            fill_s[at],
            self.slot_sink[:S][at],
            zeros,
            zeros,
        )
        _set(
            out.finalize,
            torch.where(fin, blk, -1),
            fin_slot,
            torch.where(fin, fills, 0),
            fin & (pages == 0),
            torch.where(fin, firsts, 0),
            torch.where(fin, starts, 0),
        )
        _set(
            out.reopen,
            torch.where(reopen, blk, -1),
            torch.where(reopen, chosen, -1),
            torch.where(reopen, starts, 0),
            reopen & (pages == 0),
            zeros,
            zeros,
        )
        out.token_slots.copy_(torch.where(tok_entry >= 0, page_slot[tok_entry.clamp(min=0).long()], -1))
        out.token_offsets.copy_(tok_offset)
        out.tail_slots.copy_(torch.where(tail_entry >= 0, page_slot[tail_entry.clamp(min=0).long()], -1))

        # the new state: freed slots, then every open page's slot (entries without one hit the trash slot)
        target = torch.where(page_slot >= 0, page_slot, S).long()
        self.slot_block[:S].copy_(live)
        self.slot_fill[:S].copy_(fill_s)
        self.slot_block.scatter_(0, target, blk)
        self.slot_fill.scatter_(0, target, fills)
        self.slot_sink.scatter_(0, target, pages == 0)
        self.slot_step.scatter_(0, target, torch.full_like(target, self.step))
        self.counters.add_(torch.stack([reclaim.sum(), evicted.sum(), reopen.sum()]))
        return out

    # ------------------------------------------------------------------ between steps
    def release(self, live_blocks: torch.Tensor) -> None:
        """Free the slots whose block no live request holds (their requests finished or were
        preempted). ``live_blocks``: (n,) int, every block held by a request of this group."""
        S = self.num_slots
        live = self.slot_block[:S]
        held = torch.isin(live, live_blocks.to(device=self.device, dtype=live.dtype))
        keep = held & (live >= 0)
        self.slot_block[:S].copy_(torch.where(keep, live, -1))
        self.slot_fill[:S].copy_(torch.where(keep, self.slot_fill[:S], 0))

    def snapshot(self) -> dict:
        """Host copy of the pool's state and counters (a device read: for stats, never in a step)."""
        blocks = self.slot_block[: self.num_slots].tolist()
        reclaimed, early, reopened = self.counters.tolist()
        return {
            "slot_blocks": blocks,
            "slots_in_use": sum(b >= 0 for b in blocks),
            "reclaimed": reclaimed,
            "early_finalisations": early,
            "reopened": reopened,
        }


def _set(ops: PageOps, blocks, slots, fills, sinks, starts, prefix) -> None:
    for name, value in zip(PageOps.FIELDS, (blocks, slots, fills, sinks, starts, prefix)):
        getattr(ops, name).copy_(value)
