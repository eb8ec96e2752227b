"""The device planner (:class:`~kivi_serve.backend.planner.DeviceStagingPool`) against the host one
(:class:`~kivi_serve.backend.staging.StagingPool`, the planner the backend used before, kept as the
oracle) on random schedules: the same plan every step — same slots, same ops, same order — and so
the same pages and the same staging when both plans are executed by the reference.

A schedule is what vLLM's scheduler and block manager would produce: requests arrive with a prompt
(or a prefix-cache hit on another request's full pages), decode one token at a time, prefill in
chunks that start and end mid-page, sit out steps, get preempted (blocks freed, recomputed from
scratch later on fresh blocks), finish or are aborted mid-page (blocks freed and handed out again,
freed blocks first), with a pool smaller than the live requests (early finalisation, re-open).
Batches are ordered decodes first (vLLM reorders them so) and may carry padding rows (no tokens)
and dummy rows (pages on the null block), which neither planner stages.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from kivi_serve.backend.planner import DeviceStagingPool, step_pages
from kivi_serve.backend.staging import PageOps, StagingPool
from kivi_serve.kernels import reference as R
from kivi_serve.quant.codec import FpPagesCodec, QuantCodec
from kivi_serve.quant.layout import PageLayout

P, H, D = 64, 1, 64


class Schedule:
    """vLLM's side: requests, a block pool (block 0 is the null block), one batch per step."""

    def __init__(self, rng: random.Random, num_blocks: int = 300) -> None:
        self.rng = rng
        self.free = list(range(1, num_blocks))
        rng.shuffle(self.free)
        self.reqs: dict[int, dict] = {}  # id -> table, len, target
        self.cached: list[list[int]] = []  # full-page prefixes finished requests left behind
        self.next_id = 0

    def arrive(self) -> None:
        rid, self.next_id = self.next_id, self.next_id + 1
        req = dict(table=[], len=0, shared=0, target=self.rng.choice([1, 7, P - 1, P, P + 9, 2 * P + 5, 300]))
        if self.cached and self.rng.random() < 0.3:  # prefix-cache hit: share another request's full pages
            prefix = self.rng.choice(self.cached)
            req["table"] = list(prefix)
            req["len"] = req["shared"] = len(prefix) * P
            req["target"] += req["len"]
        self.reqs[rid] = req

    def release(self, rid: int, keep_prefix: bool) -> None:
        """Finish, abort or preempt: the request's own blocks go back (freed blocks are handed out
        again first); with ``keep_prefix`` its full pages stay cached for prefix hits instead (a cached
        block is never handed out again here: the real block pool counts references)."""
        req = self.reqs.pop(rid)
        shared, full = req["shared"] // P, req["len"] // P
        if keep_prefix and full > shared:
            self.cached.append(req["table"][:full])
            self.free += req["table"][full:][::-1]
        else:
            self.free += req["table"][shared:][::-1]

    def batch(self, budget: int) -> list[tuple[int, int]]:
        """(request, new tokens) of one step: decodes first, then (chunked) prefills."""
        decodes, prefills = [], []
        for rid, req in self.reqs.items():
            if self.rng.random() < 0.2:
                continue  # running but not scheduled this step
            left = req["target"] - req["len"]
            if left > 0:
                prefills.append((rid, min(left, self.rng.choice([left, 37, 100, P]))))
            else:
                decodes.append((rid, 1))
        out, used = [], 0
        for rid, n in decodes + prefills:
            n = min(n, budget - used)
            if n > 0:
                out.append((rid, n))
                used += n
        return out

    def allocate(self, rid: int, n: int) -> None:
        req = self.reqs[rid]
        while len(req["table"]) * P < req["len"] + n:
            req["table"].append(self.free.pop())


def host_plan(pool: StagingPool, rows: list, T: int) -> dict:
    """The host planner over the rows it plans (real rows), as the batch-wide tensors the device
    planner produces: tokens of padding and dummy rows unstaged, their tails -1."""
    real = [r for r in rows if r["real"]]
    plan = pool.plan([r["table"] for r in real], [r["len"] for r in real], [r["n"] for r in real])
    token_slots = torch.full((T,), -1, dtype=torch.int32)
    token_offsets = torch.zeros(T, dtype=torch.int32)
    tails = torch.full((len(rows),), -1, dtype=torch.int32)
    q, k = 0, 0
    for b, r in enumerate(rows):
        if r["real"]:
            token_slots[q : q + r["n"]] = plan.token_slots[k : k + r["n"]]
            token_offsets[q : q + r["n"]] = plan.token_offsets[k : k + r["n"]]
            tails[b] = plan.tail_slots[real.index(r)]
            k += r["n"]
        else:
            token_offsets[q : q + r["n"]] = torch.arange(r["len"] - r["n"], r["len"]) % P
        q += r["n"]
    # the host plan's finalize starts count real tokens only; map them to batch indices
    starts, q, k = [], 0, 0
    first_of = {}
    for r in rows:
        if r["real"]:
            for j in range(r["n"]):
                first_of[k + j] = q + j
            k += r["n"]
        q += r["n"]
    fin = plan.finalize
    starts = torch.tensor([first_of[int(s)] for s in fin.starts], dtype=torch.int32)
    fin = PageOps(fin.blocks, fin.slots, fin.fills, fin.sinks, starts, fin.prefix)
    return dict(
        plan=plan, token_slots=token_slots, token_offsets=token_offsets, tails=tails, finalize=fin
    )


def ops_of(ops, fields=PageOps.FIELDS) -> dict:
    live = R.live_ops(ops)
    return {f: getattr(live, f).tolist() for f in fields}


def run_schedule(seed: int, num_slots: int, steps: int, codec, budget: int = 400) -> dict:
    rng = random.Random(seed)
    sched = Schedule(rng)
    host = StagingPool(num_slots, P)
    dev = DeviceStagingPool(num_slots, P, "cpu", max_tokens=budget + 8, max_rows=16)
    pages_h = torch.zeros(300, H, codec.page_bytes, dtype=torch.uint8)
    pages_d = pages_h.clone()
    st_h = torch.zeros(num_slots, 2, H, P, D)
    st_d = st_h.clone()
    seen = dict(steps=0, dummy=0)
    for _ in range(steps):
        if len(sched.reqs) < 6 and rng.random() < 0.4:
            sched.arrive()
        if sched.reqs and rng.random() < 0.08:  # finish, abort or preempt: blocks go back
            sched.release(rng.choice(list(sched.reqs)), keep_prefix=rng.random() < 0.5)
        batch = sched.batch(budget)
        dummy = rng.random() < 0.2
        # vLLM never schedules more rows than max_num_seqs (< slots); the host cannot tell a dummy
        # row's pages from real ones, so it counts them against the pool too
        batch = batch[: num_slots - dummy]
        if not batch:
            continue
        rows = []
        for rid, n in batch:
            sched.allocate(rid, n)
            req = sched.reqs[rid]
            rows.append(dict(real=True, table=list(req["table"]), len=req["len"] + n, n=n, rid=rid))
        if dummy:  # a dummy row writing to the null block, and a padding row
            rows.append(dict(real=False, table=[0, 0], len=3, n=2))
            seen["dummy"] += 1
        if rng.random() < 0.2:
            rows.append(dict(real=False, table=[0], len=0, n=0))
        T = sum(r["n"] for r in rows)
        width = max(len(r["table"]) for r in rows) + 1
        bt = torch.zeros(len(rows), width, dtype=torch.int32)
        for b, r in enumerate(rows):
            bt[b, : len(r["table"])] = torch.tensor(r["table"], dtype=torch.int32)
        qsl = np.concatenate([[0], np.cumsum([r["n"] for r in rows])])
        want = host_plan(host, rows, T + 3)
        got = dev.plan(step_pages(qsl, np.array([r["len"] for r in rows]), P, T + 3), bt)
        assert got.token_slots.tolist() == want["token_slots"].tolist()
        assert got.token_offsets.tolist() == want["token_offsets"].tolist()
        assert got.tail_slots.tolist() == want["tails"].tolist()
        assert ops_of(got.finalize) == ops_of(want["finalize"])
        short = ("blocks", "slots", "fills", "sinks")
        assert ops_of(got.evict, short) == ops_of(want["plan"].evict, short)
        assert ops_of(got.reopen, short) == ops_of(want["plan"].reopen, short)
        # both plans executed by the reference: same pages, same staging
        gen = torch.Generator().manual_seed(seen["steps"])
        k, v = torch.randn(T + 3, H, D, generator=gen), torch.randn(T + 3, H, D, generator=gen)
        real = torch.tensor([q for q0, r in zip(qsl, rows) if r["real"] for q in range(q0, q0 + r["n"])])
        plan_h = want["plan"]
        R.append_kv(plan_h, k[real], v[real], pages_h, st_h, codec)
        R.append_kv(got, k, v, pages_d, st_d, codec)
        assert torch.equal(pages_h, pages_d) and torch.equal(st_h, st_d)
        for rid, n in batch:
            sched.reqs[rid]["len"] += n
        seen["steps"] += 1
    snap = dev.snapshot()
    st = host.stats
    assert (snap["early_finalisations"], snap["reopened"], snap["reclaimed"]) == (
        st.early_finalisations,
        st.reopened,
        st.reclaimed,
    )
    assert snap["slots_in_use"] == host.in_use()
    return dict(seen, early=st.early_finalisations, reopened=st.reopened, reclaimed=st.reclaimed)


def test_device_planner_equals_host_planner_on_random_schedules():
    codec = FpPagesCodec(D, P, torch.float32)
    totals: dict[str, int] = {}
    for seed in range(10):
        res = run_schedule(seed, num_slots=random.Random(seed).choice([2, 3, 5, 8]), steps=40, codec=codec)
        for key, value in res.items():
            totals[key] = totals.get(key, 0) + value
    # the schedules really exercised every path of the lifecycle
    for key in ("early", "reopened", "reclaimed", "dummy"):
        assert totals[key] > 0, totals


def test_device_planner_equals_host_planner_with_2bit_pages():
    run_schedule(100, num_slots=3, steps=12, codec=QuantCodec(PageLayout(D, P)), budget=150)


def test_step_pages_of_a_mixed_batch():
    # row 0: decode at position 64 (page 1 starts); row 1: chunk 60..199 (pages 0..3); row 2: padding
    g = step_pages(np.array([0, 1, 141, 141]), np.array([65, 200, 0]), P, num_tokens=144)
    assert g.rows.tolist() == [0, 1, 1, 1, 1, 2]
    assert g.pages.tolist() == [1, 0, 1, 2, 3, -1]
    assert g.starts.tolist() == [0, 60, 0, 0, 0, 0]
    assert g.fills.tolist() == [1, 64, 64, 64, 8, 0]
    assert g.firsts.tolist() == [0, 1, 5, 69, 133, 0]
    assert g.token_entries[:6].tolist() == [0, 1, 1, 1, 1, 2] and g.token_entries[141:].tolist() == [-1] * 3
    assert g.token_offsets[1:5].tolist() == [60, 61, 62, 63] and g.token_offsets[140] == 7
    assert g.tail_entries.tolist() == [0, 4, -1] and g.num_open == 2


def test_step_pages_rejects_inconsistent_lengths():
    with pytest.raises(ValueError, match="shorter than its 5 new tokens"):
        step_pages(np.array([0, 5]), np.array([3]), P, 5)


def test_release_frees_exactly_the_slots_of_blocks_no_request_holds():
    dev = DeviceStagingPool(4, P, "cpu", max_tokens=64, max_rows=4)
    bt = torch.tensor([[5, 0], [9, 0], [7, 0]], dtype=torch.int32)
    dev.plan(step_pages(np.array([0, 3, 6, 9]), np.array([3, 3, 3]), P, 9), bt)
    assert sorted(dev.snapshot()["slot_blocks"]) == [-1, 5, 7, 9]
    dev.release(torch.tensor([9, 4]))  # only the request holding block 9 is still live
    snap = dev.snapshot()
    assert sorted(snap["slot_blocks"]) == [-1, -1, -1, 9] and snap["slots_in_use"] == 1
    # the next page on a released slot's block starts afresh: nothing reclaimed, nothing evicted
    plan = dev.plan(step_pages(np.array([0, 2]), np.array([2]), P, 2), torch.tensor([[5]], dtype=torch.int32))
    assert dev.snapshot()["reclaimed"] == 0 and R.live_ops(plan.evict).blocks.numel() == 0


def test_pool_too_small_for_one_step_is_a_clear_error():
    dev = DeviceStagingPool(1, P, "cpu", max_tokens=64, max_rows=4)
    bt = torch.tensor([[5], [9]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="staging pool too small"):
        dev.plan(step_pages(np.array([0, 3, 6]), np.array([3, 3]), P, 6), bt)


def test_a_step_larger_than_the_buffers_is_a_clear_error():
    dev = DeviceStagingPool(4, P, "cpu", max_tokens=8, max_rows=2)
    with pytest.raises(ValueError, match="exceeds the planner's buffers"):
        dev.plan(step_pages(np.array([0, 9]), np.array([9]), P, 9), torch.tensor([[5]], dtype=torch.int32))
