"""The open-page lifecycle: staging slots, finalisation, reclaim, early finalisation, re-open.

Values are position-coded (every V channel of token ``t`` is ``t`` plus small noise; V is
quantized per token, so ``round(mean(v_hat[t])) == t`` survives quantization): a lost, swapped
or stale token shows up as a wrong position.
"""

import random

import pytest
import torch

from kivi_serve.backend.staging import StagingPool
from kivi_serve.kernels import reference as R
from kivi_serve.quant import page
from kivi_serve.quant import staging as staging_format
from kivi_serve.quant.layout import PageLayout

P, H, D = 64, 2, 64
LAYOUT = PageLayout(D, P, k_bits=4, v_bits=4)


class Sim:
    """A tiny stand-in for vLLM's scheduler and block manager around one cache layer."""

    def __init__(self, num_blocks=64, slots=4, seed=0, staging_dtype="model"):
        self.gen = torch.Generator().manual_seed(seed)
        self.pages = torch.zeros(num_blocks, H, LAYOUT.page_bytes, dtype=torch.uint8)
        self.staging = staging_format.new_staging(slots, H, P, D, torch.float32, staging_dtype)
        self.pool = StagingPool(slots, P)
        self.free = list(range(1, num_blocks))  # block 0 is the null block
        random.Random(seed).shuffle(self.free)
        self.seqs = {}  # id -> dict(table, len, uid)
        self.next_uid = 0

    def tokens(self, uid, lo, hi):
        pos = torch.arange(lo, hi, dtype=torch.float32)
        noise = 0.01 * torch.randn(hi - lo, H, D, generator=self.gen)
        v = pos.view(-1, 1, 1) + noise
        k = 100.0 * uid + torch.randn(hi - lo, H, D, generator=self.gen)
        return k, v

    def add(self, sid):
        self.seqs[sid] = dict(table=[], len=0, uid=self.next_uid)
        self.next_uid += 1

    def finish(self, sid):
        self.free += self.seqs.pop(sid)["table"]

    def step(self, chunks: dict):
        """chunks: sid -> new tokens this step. Appends and checks every scheduled sequence."""
        tables, lens, qlens, ks, vs = [], [], [], [], []
        for sid, n in chunks.items():
            s = self.seqs[sid]
            while len(s["table"]) * P < s["len"] + n:
                s["table"].append(self.free.pop())
            k, v = self.tokens(s["uid"], s["len"], s["len"] + n)
            s["len"] += n
            tables.append(s["table"]), lens.append(s["len"]), qlens.append(n), ks.append(k), vs.append(v)
        plan = self.pool.plan(tables, lens, qlens)
        R.append_kv(plan, torch.cat(ks), torch.cat(vs), self.pages, self.staging, LAYOUT)
        width = max(len(t) for t in tables)
        bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        for b, sid in enumerate(chunks):
            # the whole sequence as the cache holds it (ctx = seq_len: nothing new attended)
            _, cv = R.gather_context(
                self.pages, self.staging, bt[b], lens[b], lens[b], int(plan.tail_slots[b]), LAYOUT
            )
            got = cv.mean(dim=(1, 2)).round()
            assert torch.equal(got, torch.arange(lens[b], dtype=torch.float32)), (
                f"seq {sid} lost or misplaced tokens"
            )
        return plan


def test_finish_mid_page_then_block_reuse_reclaims_the_slot():
    sim = Sim(slots=2)
    sim.add("a")
    sim.step({"a": P + 10})  # one full page (direct) + a tail in staging
    assert sim.pool.in_use() == 1
    sim.finish("a")  # vLLM frees the blocks; nobody tells the backend
    sim.add("b")
    sim.step({"b": 5})  # reuses a freed block from offset 0
    sim.add("c")
    sim.step({"c": 3})
    assert sim.pool.stats.early_finalisations == 0
    assert sim.pool.in_use() <= 2


def test_full_page_from_staging_and_direct_pages():
    sim = Sim(slots=2)
    sim.add("a")
    plan = sim.step({"a": 2 * P + 3})
    assert len(plan.finalize) == 2 and plan.finalize.prefix.tolist() == [0, 0]  # straight from the input
    for _ in range(P - 3):
        plan = sim.step({"a": 1})
    assert len(plan.finalize) == 1 and plan.finalize.prefix.tolist() == [P - 1]  # from staging
    assert int(plan.tail_slots[0]) == -1
    assert sim.pool.in_use() == 0  # a full page frees its slot


def test_pool_exhaustion_finalises_early_and_reopens():
    sim = Sim(slots=2)
    for sid in "abc":
        sim.add(sid)
    sim.step({"a": 10})
    sim.step({"b": 20})
    sim.step({"c": 30})  # no free slot: "a" (least recently written) is finalised early
    assert sim.pool.stats.early_finalisations == 1
    plan = sim.step({"a": 1})  # "a" comes back: its page is re-opened from the block
    assert sim.pool.stats.reopened == 1 and len(plan.reopen) == 1 and int(plan.reopen.fills[0]) == 10
    assert len(plan.evict) == 1  # ... which evicted "b"


def test_slot_freed_by_a_full_page_serves_a_new_page_in_the_same_step():
    sim = Sim(slots=2)
    sim.add("a"), sim.add("b")
    sim.step({"a": P - 1, "b": 5})
    sim.add("c")
    plan = sim.step({"a": 1, "c": 4})  # a's page finalises from its slot, c takes that slot
    freed = int(plan.finalize.slots[0])
    assert plan.token_slots[1:].tolist() == [freed] * 4
    assert sim.pool.stats.early_finalisations == 0


def test_prefill_across_a_staged_page_needs_one_slot():
    sim = Sim(slots=1)
    sim.add("a")
    sim.step({"a": 10})
    plan = sim.step({"a": (P - 10) + P + 20})  # completes the staged page, fills another, opens a third
    assert plan.finalize.prefix.tolist() == [10, 0] and len(plan.evict) == 0


def test_early_finalised_page_completed_later_reads_its_prefix_from_its_block():
    sim = Sim(slots=1)
    sim.add("a"), sim.add("b")
    sim.step({"a": 10})
    sim.step({"b": 3})  # evicts a's page
    plan = sim.step({"a": P - 10})  # a's page completes without a slot
    assert plan.finalize.slots.tolist() == [-1] and plan.finalize.prefix.tolist() == [10]


def test_pool_too_small_for_one_step_is_a_clear_error():
    sim = Sim(slots=1)
    sim.add("a"), sim.add("b")
    with pytest.raises(RuntimeError, match="staging pool too small"):
        sim.step({"a": 3, "b": 3})


@pytest.mark.parametrize("staging_dtype", ["model", "int8"])
def test_random_schedules_never_lose_a_token(staging_dtype):
    """Prefills, decodes, requests that sit out steps, finish and free their blocks, with a pool
    smaller than the live requests: every step, every scheduled sequence reads back intact (with
    int8 staging too: its rounding is far below the position coding's unit)."""
    totals = {"early": 0, "reopened": 0, "reclaimed": 0}
    for seed in range(2):
        rng = random.Random(seed)
        sim = Sim(num_blocks=96, slots=3, seed=seed, staging_dtype=staging_dtype)
        live = []
        for step in range(40):
            if len(live) < 5 and rng.random() < 0.35:
                sid = f"s{step}"
                sim.add(sid)
                live.append(sid)
                sim.step({sid: rng.choice([1, 7, P - 1, P, P + 9, 2 * P + 5])})  # prefill
            elif live and rng.random() < 0.1:
                sim.finish(live.pop(rng.randrange(len(live))))
            else:
                sched = [s for s in live if rng.random() < 0.7][:3]  # some running requests sit out a step
                if sched:
                    sim.step({s: rng.choice([1, 1, 1, 5]) for s in sched})
            assert sim.pool.in_use() <= sim.pool.num_slots
        totals["early"] += sim.pool.stats.early_finalisations
        totals["reopened"] += sim.pool.stats.reopened
        totals["reclaimed"] += sim.pool.stats.reclaimed
    # the schedules really exercised every path of the lifecycle
    assert totals["early"] > 0 and totals["reopened"] > 0 and totals["reclaimed"] > 0, totals


# ----------------------------------------------------------------------------- the int8 staging format
def _rows(gen, n=64, d=D):
    """Rows of every kind: normal, huge and tiny magnitudes, one outlier, all zero, one nonzero."""
    x = torch.randn(n, d, generator=gen) * torch.logspace(-6, 4, n).unsqueeze(1)
    x[0] = 0.0
    x[1] = 0.0
    x[1, 5] = -3.0
    x[2, 7] = 1e4
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_rows_roundtrip_error_and_layout(dtype):
    """Each element comes back within max|x| / 254 (+ fp32 rounding), computed in fp64; the row is
    D int8 codes in [-127, 127] then the fp32 scale max|x| / 127; a zero row stays exactly zero."""
    x = _rows(torch.Generator().manual_seed(1)).to(dtype)
    rows = staging_format.encode_int8(x)
    assert rows.dtype == torch.uint8 and rows.shape == (x.shape[0], D + 4)
    scale = rows[:, D:].contiguous().view(torch.float32).squeeze(1).double()
    amax = x.double().abs().amax(1)
    assert torch.allclose(scale, amax / 127, rtol=2**-23, atol=0)
    codes = rows[:, :D].view(torch.int8)
    assert codes.abs().max() <= 127 and (codes.abs().amax(1)[amax > 0] == 127).all()
    back = staging_format.decode_int8(rows).double()
    err = (back - x.double()).abs()
    assert (err <= (amax / 254 * (1 + 1e-5)).unsqueeze(1) + 1e-30).all()
    assert torch.equal(back[0], torch.zeros(D, dtype=torch.float64))
    assert back[1, 5] == -3.0 and back[1].count_nonzero() == 1
    # the largest element is (nearly) exact: code +-127 times max/127
    assert torch.allclose(back.abs().amax(1), amax, rtol=2**-22, atol=0)
    # deterministic, and load/store are the same definition
    st = staging_format.new_staging(1, 1, x.shape[0], D, dtype, "int8")
    staging_format.store(st, (0, 0, 0), x)
    assert torch.equal(st[0, 0, 0], rows) and torch.equal(staging_format.load(st[0, 0, 0]), back.float())


def test_int8_rounding_is_half_to_even():
    x = torch.zeros(1, D)
    x[0, 0] = 127.0
    x[0, 1], x[0, 2], x[0, 3] = 2.5, 3.5, -0.5  # scale 1: ties
    codes = staging_format.encode_int8(x)[0, :4].view(torch.int8).tolist()
    assert codes == [127, 2, 4, 0]


def test_staging_sizes_and_settings(monkeypatch):
    from kivi_serve.backend.settings import KiviSettings, settings_from

    assert staging_format.slot_bytes("int8", 64, 128, 3, torch.bfloat16) == 2 * 3 * 128 * 68
    assert staging_format.slot_bytes("model", 64, 128, 3, torch.bfloat16) == 2 * 3 * 128 * 64 * 2
    assert staging_format.new_staging(2, 3, 128, 64, torch.bfloat16, "int8").shape == (2, 2, 3, 128, 68)
    assert KiviSettings().staging_format == "int8"
    assert KiviSettings(fp_pages=True).staging_format == "model"  # debug pages stay exact
    assert KiviSettings(fp_pages=True, staging_dtype="int8").staging_format == "int8"
    with pytest.raises(ValueError, match="staging_dtype must be one of"):
        KiviSettings(staging_dtype="fp8")
    monkeypatch.setenv("KIVI_SERVE_STAGING_DTYPE", "model")
    assert settings_from(None).staging_format == "model"
    assert settings_from({"kivi_serve": {"staging_dtype": "int8"}}).staging_format == "int8"


def test_pages_are_quantized_from_the_staged_values():
    """A page filled over several steps is encoded from what int8 staging held of its first tokens
    and the completing step's own tokens as given; the staged tail is read back rounded."""
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(P, H, D, generator=gen) * 3
    v = torch.randn(P, H, D, generator=gen)
    pool, pages = StagingPool(2, P), torch.zeros(4, H, LAYOUT.page_bytes, dtype=torch.uint8)
    staging = staging_format.new_staging(2, H, P, D, torch.float32, "int8")
    plan = pool.plan([[1]], [P - 5], [P - 5])
    R.append_kv(plan, k[: P - 5], v[: P - 5], pages, staging, LAYOUT)
    rk, rv = staging_format.roundtrip(k, "int8"), staging_format.roundtrip(v, "int8")
    ck, cv = R.gather_context(pages, staging, [1], P - 5, P - 5, int(plan.tail_slots[0]), LAYOUT)
    assert torch.equal(ck, rk[: P - 5]) and torch.equal(cv, rv[: P - 5])
    assert not torch.equal(ck, k[: P - 5])
    plan = pool.plan([[1]], [P], [5])
    R.append_kv(plan, k[P - 5 :], v[P - 5 :], pages, staging, LAYOUT)
    want_k = torch.cat([rk[: P - 5], k[P - 5 :]]).transpose(0, 1)
    want_v = torch.cat([rv[: P - 5], v[P - 5 :]]).transpose(0, 1)
    want = page.quantize_pages(want_k, want_v, LAYOUT, sink=torch.ones(H, dtype=torch.bool))
    assert torch.equal(pages[1], want)
