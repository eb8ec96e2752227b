"""The staging pool's rules: which open page lives in which staging slot, and the step's
:class:`AppendPlan` that the fused append (reference, CPU or CUDA) executes for every layer.

:class:`StagingPool` is the plain-Python statement of the rules, planning from host block tables and
lengths. The backend runs the same rules on the model's device
(:class:`kivi_serve.backend.planner.DeviceStagingPool`: vLLM 0.32 gives a builder its block table on
the device only); this one is the oracle of that planner (``tests/test_planner.py``) and the planner
of the standalone reference runner and the kernel benchmark. Pure Python, no vLLM.

Invariant: **a page is never lost and never read wrong.** A slot is taken back only when

- its block is written again from offset 0 (vLLM freed the block and handed it out again: the
  slot's contents belong to a finished request — *reclaimed*), or
- the pool is out of free slots: the least recently written slot's page is quantized from the
  tokens it holds into its block (*early finalisation*) before the slot is reused. If that
  sequence appends again, its page is *re-opened*: dequantized back into a fresh slot.

vLLM does not tell an attention backend within a step that a request finished, and a running
request may go unscheduled for a step, so these two rules are the only safe signals there. Between
steps the backend also releases the slots of requests the model runner no longer holds
(:func:`kivi_serve.backend.release_finished`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _i32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


@dataclass
class PageOps:
    """A batch of page operations, one entry per page (all KV heads of one block)."""

    blocks: torch.Tensor = field(default_factory=lambda: _i32([]))
    slots: torch.Tensor = field(default_factory=lambda: _i32([]))
    fills: torch.Tensor = field(default_factory=lambda: _i32([]))
    sinks: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    #: Finalize only: index in the batch of the first of this step's tokens of the page.
    starts: torch.Tensor = field(default_factory=lambda: _i32([]))
    #: Finalize only: tokens the page held before this step (read from ``slots``, or from the
    #: page's own block when ``slots < 0``: it had been finalised early).
    prefix: torch.Tensor = field(default_factory=lambda: _i32([]))

    FIELDS = ("blocks", "slots", "fills", "sinks", "starts", "prefix")

    @classmethod
    def of(cls, rows: list[tuple[int, int, int, bool, int, int]]) -> PageOps:
        if not rows:
            return cls()
        b, s, f, k, st, pre = zip(*rows)
        sinks = torch.tensor(k, dtype=torch.bool)
        return cls(_i32(list(b)), _i32(list(s)), _i32(list(f)), sinks, _i32(list(st)), _i32(list(pre)))

    def __len__(self) -> int:
        return int(self.blocks.numel())

    def to(self, device) -> PageOps:
        return PageOps(*(getattr(self, n).to(device) for n in self.FIELDS))


@dataclass
class AppendPlan:
    """What one step's append does, for every layer alike, in this order:

    1. ``evict`` — pages whose slot is taken back are quantized from the ``fills`` tokens in their
       slot (early finalisation).
    2. ``finalize`` — pages that became full: tokens ``[0, prefix)`` come from the slot (or, if
       ``slots < 0`` and ``prefix > 0``, from the page's own early-finalised block, dequantized),
       tokens ``[prefix, P)`` straight from this step's input, starting at batch index ``starts``.
    3. ``reopen`` — early-finalised pages that stay open are dequantized into their new slot.
    4. this step's tokens of pages that stay open are written to staging (``token_slots >= 0``).

    Every slot a phase writes was last read by an earlier phase, so a slot freed by a finalised
    page can serve another page in the same step: the pool needs one slot per open page only.

    An op list may be padded (the device planner emits one entry per page): entries whose ``blocks``
    is negative are no ops and every executor skips them.

    token_slots, token_offsets : (T,) int32 — staging slot (``-1``: not staged) and in-page offset.
    tail_slots : (B,) int32 — staging slot of each sequence's partial last page, else ``-1``.
    """

    token_slots: torch.Tensor
    token_offsets: torch.Tensor
    evict: PageOps
    finalize: PageOps
    reopen: PageOps
    tail_slots: torch.Tensor

    def to(self, device) -> AppendPlan:
        return AppendPlan(
            self.token_slots.to(device),
            self.token_offsets.to(device),
            self.evict.to(device),
            self.finalize.to(device),
            self.reopen.to(device),
            self.tail_slots.to(device),
        )


@dataclass
class StagingStats:
    """What the pool's rules did so far (the device planner counts the same three)."""

    early_finalisations: int = 0
    reopened: int = 0
    reclaimed: int = 0


class StagingPool:
    """Maps open pages (by block id) to staging slots and plans each step's append.

    Parameters
    ----------
    num_slots : int
        Slots in the pool (each holds one page of every KV head of every layer, in the staging format).
    page_size : int
        ``P``, tokens per page.
    """

    def __init__(self, num_slots: int, page_size: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots, self.page_size = num_slots, page_size
        self.slot_block = [-1] * num_slots
        self.slot_fill = [0] * num_slots
        self.slot_sink = [False] * num_slots
        self.slot_step = [0] * num_slots
        self.block_slot: dict[int, int] = {}
        self.step = 0
        self.stats = StagingStats()

    # ----------------------------------------------------------------- slot management
    def _free(self, slot: int) -> None:
        blk = self.slot_block[slot]
        if blk >= 0:
            del self.block_slot[blk]
        self.slot_block[slot], self.slot_fill[slot] = -1, 0

    def _allocate(self, block: int, pinned: set[int], evict: list) -> int:
        free = [s for s in range(self.num_slots) if self.slot_block[s] < 0]
        if free:
            slot = free[0]
        else:
            candidates = [s for s in range(self.num_slots) if self.slot_block[s] not in pinned]
            if not candidates:
                raise RuntimeError(
                    f"staging pool too small: all {self.num_slots} slots hold pages written in this step; "
                    "the pool needs at least one slot per sequence scheduled in a step"
                )
            slot = min(candidates, key=lambda s: (self.slot_step[s], s))  # least recently written
            evict.append((self.slot_block[slot], slot, self.slot_fill[slot], self.slot_sink[slot], 0, 0))
            self.stats.early_finalisations += 1
            self._free(slot)
        self.slot_block[slot] = block
        self.block_slot[block] = slot
        return slot

    def in_use(self) -> int:
        return len(self.block_slot)

    def tail_slot(self, block: int) -> int:
        return self.block_slot.get(block, -1)

    # ----------------------------------------------------------------- planning
    def plan(
        self,
        block_tables: list[list[int]],
        seq_lens: list[int],
        query_lens: list[int],
    ) -> AppendPlan:
        """Plan one step.

        Parameters
        ----------
        block_tables : per sequence, the physical block of each logical page (at least the pages
            this step writes).
        seq_lens : per sequence, tokens including this step's.
        query_lens : per sequence, new tokens this step (laid out sequence after sequence).
        """
        P = self.page_size
        self.step += 1
        n_tokens = sum(query_lens)
        token_slots = [-1] * n_tokens
        token_offsets = [0] * n_tokens
        evict: list = []
        finalize: list = []
        reopen: list = []

        pages = []  # (page index, block, first new offset, fill after step, batch index of first new token)
        q0 = 0
        for b, (table, seq_len, n_new) in enumerate(zip(block_tables, seq_lens, query_lens)):
            ctx = seq_len - n_new
            if ctx < 0 or n_new < 0:
                raise ValueError(f"sequence {b}: seq_len {seq_len} < query_len {n_new}")
            for i in range(ctx // P, (seq_len - 1) // P + 1 if n_new else ctx // P):
                lo, hi = max(ctx, i * P), min(seq_len, (i + 1) * P)
                if i >= len(table):
                    raise ValueError(f"sequence {b}: block table has {len(table)} pages, needs page {i}")
                pages.append((i, int(table[i]), lo - i * P, hi - i * P, q0 + lo - ctx))
                for j in range(hi - lo):
                    token_offsets[q0 + lo - ctx + j] = lo - i * P + j
            q0 += n_new
        pinned = {blk for (_, blk, _, _, _) in pages}

        # A page written from offset 0 starts afresh: any slot still mapped to its block is stale.
        for _, blk, start, _, _ in pages:
            if start == 0 and blk in self.block_slot:
                self._free(self.block_slot[blk])
                self.stats.reclaimed += 1

        # Pages that became full first: their slots are free again for the pages that stay open.
        for i, blk, start, fill, first in pages:
            if fill == P:
                slot = self.block_slot.get(blk, -1) if start > 0 else -1
                finalize.append((blk, slot, P, i == 0, first, start))
                if slot >= 0:
                    self._free(slot)
        for i, blk, start, fill, first in pages:
            if fill == P:
                continue
            slot = self.block_slot.get(blk)
            if slot is None:
                slot = self._allocate(blk, pinned, evict)
                if start > 0:  # its first tokens were finalised early: bring them back
                    reopen.append((blk, slot, start, i == 0, 0, 0))
                    self.stats.reopened += 1
            for j in range(fill - start):
                token_slots[first + j] = slot
            self.slot_fill[slot], self.slot_sink[slot], self.slot_step[slot] = fill, i == 0, self.step

        tails = []
        for table, seq_len in zip(block_tables, seq_lens):
            last = (seq_len - 1) // P
            tails.append(self.block_slot.get(int(table[last]), -1) if seq_len % P and seq_len else -1)
        return AppendPlan(
            _i32(token_slots),
            _i32(token_offsets),
            PageOps.of(evict),
            PageOps.of(finalize),
            PageOps.of(reopen),
            _i32(tails),
        )
