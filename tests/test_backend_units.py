"""Unit tests of the vLLM backend's pieces, without an engine (CPU; CUDA variants marked ``cuda``).

In the style of vLLM's ``tests/v1/attention``: batches come from named specs (``BATCH_SPECS``),
physical block ids are a random permutation with block 0 kept as the null block (block-table rows
are padded with it), and every step goes through the real :class:`KiviMetadataBuilder` (one build
per step) and :class:`KiviAttentionImpl` (one per layer, constructed by hand). Two oracles:

- the 2-bit pages: :mod:`kivi_serve.kernels.reference` executing the *same plan* on its own copy of
  the cache — pages and staging must be bit-identical, attention equal up to fp32 summation order;
- the exact debug pages: plain causal attention over the full-precision keys and values.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from kivi_serve.backend.staging import StagingPool
from kivi_serve.kernels import reference as R
from kivi_serve.quant import staging as staging_format
from kivi_serve.quant.codec import FpPagesCodec, QuantCodec, make_codec
from kivi_serve.quant.layout import PageLayout

vllm = pytest.importorskip("vllm")

from vllm.config import set_current_vllm_config  # noqa: E402
from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

from kivi_serve.backend.attention import (  # noqa: E402
    KiviAttentionBackend,
    KiviAttentionImpl,
    KiviMetadataBuilder,
    unsupported_reasons,
)

P, D, HKV, HQ, LAYERS = 64, 64, 2, 4, 2


@dataclass(frozen=True)
class BatchSpec:
    """One step: per sequence, its length after the step and the new tokens in it."""

    seq_lens: tuple[int, ...]
    query_lens: tuple[int, ...]


BATCH_SPECS = {
    "small_decode": BatchSpec((32, 40), (1, 1)),
    "small_prefill": BatchSpec((32, 40), (8, 8)),
    "mixed_small": BatchSpec((32, 40, 48, 56), (1, 1, 5, 5)),
    "page_edges_decode": BatchSpec((64, 65, 127, 128, 129), (1, 1, 1, 1, 1)),
    "medium_decode": BatchSpec((128, 256, 200, 190), (1, 1, 1, 1)),
    "chunk_ends_mid_page": BatchSpec((150, 100), (100, 36)),
    "chunk_covers_pages": BatchSpec((230,), (200,)),
    "mixed_medium": BatchSpec((300, 129, 64, 190), (1, 65, 64, 7)),
}


def fake_config(
    *,
    fp_pages=False,
    dtype=torch.float32,
    max_num_seqs=8,
    staging_slots=None,
    budget=None,
    device="cpu",
    page_size=P,
    debug=False,
    scheme="kivi-serve-2bit",
):
    """The few vLLM config fields the backend reads."""
    section = {"page_size": page_size, "fp_pages": fp_pages, "debug": debug, "scheme": scheme}
    if staging_slots is not None:
        section["staging_slots"] = staging_slots
    return SimpleNamespace(
        additional_config={"kivi_serve": section},
        model_config=SimpleNamespace(dtype=dtype),
        cache_config=SimpleNamespace(block_size=page_size, kv_cache_memory_bytes=budget),
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=1024),
        speculative_config=None,
        device_config=SimpleNamespace(device=torch.device(device)),
        compilation_config=SimpleNamespace(static_forward_context={}),
        attention_config=SimpleNamespace(backend=None),
        parallel_config=SimpleNamespace(decode_context_parallel_size=1),
    )


class Engine:
    """A stand-in for vLLM around the backend: block manager, builder, one impl per layer."""

    def __init__(
        self,
        *,
        fp_pages=False,
        dtype=torch.float32,
        num_blocks=48,
        staging_slots=None,
        max_num_seqs=8,
        device="cpu",
        seed=0,
        reference=True,
        layers=LAYERS,
        debug=False,
        scheme="kivi-serve-2bit",
    ):
        self.dev = torch.device(device)
        self.dtype = dtype
        self.cfg = fake_config(
            fp_pages=fp_pages,
            dtype=dtype,
            staging_slots=staging_slots,
            max_num_seqs=max_num_seqs,
            device=device,
            debug=debug,
            scheme=scheme,
        )
        self.names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
        with set_current_vllm_config(self.cfg):
            self.impls = []
            for name in self.names:
                self.impls.append(KiviAttentionImpl(HQ, D, D**-0.5, HKV))
                self.cfg.compilation_config.static_forward_context[name] = object()
            spec = KiviAttentionBackend.customize_spec(
                FullAttentionSpec(block_size=P, num_kv_heads=HKV, head_size=D, dtype=dtype)
            )
            self.builder = KiviMetadataBuilder(spec, self.names, self.cfg, self.dev)
        self.codec = self.impls[0].codec
        C = spec.state_content_bytes
        self.caches = [
            torch.zeros(num_blocks, HKV, P, C, dtype=torch.uint8, device=self.dev) for _ in self.names
        ]
        # the oracle for 2-bit pages: the reference executing the same plans on its own copy
        self.reference = reference and not fp_pages
        if self.reference:
            self.layout = self.codec.layout
            self.ref_pages = [
                torch.zeros(num_blocks, HKV, self.layout.page_bytes, dtype=torch.uint8) for _ in self.names
            ]
            S = self.impls[0].runtime.num_slots
            fmt = self.impls[0].settings.staging_format
            self.ref_staging = [staging_format.new_staging(S, HKV, P, D, dtype, fmt) for _ in self.names]
        self.free = list(range(1, num_blocks))  # block 0 is the null block
        random.Random(seed).shuffle(self.free)
        self.gen = torch.Generator().manual_seed(seed)
        self.seqs: dict = {}  # sid -> dict(table, len, k[layers], v[layers])

    # ------------------------------------------------------------------ block manager
    def add(self, sid):
        self.seqs[sid] = dict(table=[], len=0, k=[[] for _ in self.names], v=[[] for _ in self.names])

    def finish(self, sid):
        self.free += self.seqs.pop(sid)["table"][::-1]  # freed blocks are reused first (pop from the end)

    def metadata(self, chunks: dict, width: int | None = None) -> tuple[CommonAttentionMetadata, list]:
        sids = list(chunks)
        for sid in sids:
            s = self.seqs[sid]
            while len(s["table"]) * P < s["len"] + chunks[sid]:
                s["table"].append(self.free.pop())
        width = width or max(len(self.seqs[sid]["table"]) for sid in sids) + 2
        bt = torch.zeros(len(sids), width, dtype=torch.int32)
        qsl, seq_lens, slots = [0], [], []
        for r, sid in enumerate(sids):
            s, n = self.seqs[sid], chunks[sid]
            bt[r, : len(s["table"])] = torch.tensor(s["table"], dtype=torch.int32)
            for pos in range(s["len"], s["len"] + n):
                slots.append(s["table"][pos // P] * P + pos % P)
            qsl.append(qsl[-1] + n)
            seq_lens.append(s["len"] + n)
        T = qsl[-1]
        cm = CommonAttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=self.dev),
            query_start_loc_cpu=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=self.dev),
            seq_lens_cpu_upper_bound=torch.tensor(seq_lens, dtype=torch.int32),
            num_reqs=len(sids),
            num_actual_tokens=T,
            max_query_len=max(chunks.values()),
            max_seq_len=max(seq_lens),
            block_table_tensor=bt.to(self.dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=self.dev),
        )
        return cm, sids

    # ------------------------------------------------------------------ one step
    def step(self, chunks: dict, check=True, atol=2e-5):
        """Run one step through builder + impls; compare with the oracle; return the outputs."""
        cm, sids = self.metadata(chunks)
        md = self.builder.build(0, cm)
        T = cm.num_actual_tokens
        outs = []
        for li, (name, impl) in enumerate(zip(self.names, self.impls)):
            q = torch.randn(T, HQ, D, generator=self.gen).to(self.dtype)
            k = torch.randn(T, HKV, D, generator=self.gen).to(self.dtype)
            v = torch.randn(T, HKV, D, generator=self.gen).to(self.dtype)
            out = torch.full((T, HQ, D), float("nan"), dtype=self.dtype, device=self.dev)
            impl.append(k.to(self.dev), v.to(self.dev), self.caches[li], md)
            impl.attend(q.to(self.dev), k.to(self.dev), v.to(self.dev), self.caches[li], md, out)
            out = out.cpu()
            outs.append(out)
            # history for the exact oracle
            q0 = 0
            for sid in sids:
                n = chunks[sid]
                self.seqs[sid]["k"][li].append(k[q0 : q0 + n].float())
                self.seqs[sid]["v"][li].append(v[q0 : q0 + n].float())
                q0 += n
            if check and self.reference:
                plan = md.plan.to("cpu")
                R.append_kv(plan, k, v, self.ref_pages[li], self.ref_staging[li], self.layout)
                pages = self.caches[li].view(self.caches[li].shape[0], HKV, -1).cpu()
                assert torch.equal(pages, self.ref_pages[li]), f"{name}: pages differ from the reference"
                staging = impl.staging.cpu()
                assert torch.equal(staging, self.ref_staging[li]), (
                    f"{name}: staging differs from the reference"
                )
                want = R.paged_attention(
                    q,
                    k,
                    v,
                    self.ref_pages[li],
                    self.ref_staging[li],
                    cm.block_table_tensor.cpu(),
                    cm.seq_lens.cpu(),
                    cm.query_start_loc_cpu,
                    plan.tail_slots,
                    self.layout,
                    D**-0.5,
                )
                torch.testing.assert_close(out.float(), want.float(), atol=atol, rtol=1e-4)
            elif check:
                torch.testing.assert_close(
                    out.float(), self.exact_attention(li, q, sids, chunks), atol=atol, rtol=1e-4
                )
        for sid in sids:
            self.seqs[sid]["len"] += chunks[sid]
        return md, outs

    def exact_attention(self, li, q, sids, chunks):
        """Plain causal GQA attention over each sequence's full-precision history (the exact oracle)."""
        res = []
        q0 = 0
        for sid in sids:
            n = chunks[sid]
            K = torch.cat(self.seqs[sid]["k"][li])  # includes this step's tokens
            V = torch.cat(self.seqs[sid]["v"][li])
            L = K.shape[0]
            qq = q[q0 : q0 + n].float().reshape(n, HKV, HQ // HKV, D)
            s = torch.einsum("thgd,shd->hgts", qq, K) * D**-0.5
            causal = torch.arange(L).unsqueeze(0) <= (L - n + torch.arange(n)).unsqueeze(1)
            p = torch.softmax(s.masked_fill(~causal, -torch.inf), -1)
            res.append(torch.einsum("hgts,shd->thgd", p, V).reshape(n, HQ, D))
            q0 += n
        return torch.cat(res)

    def prime(self, spec: BatchSpec, atol=2e-5):
        """Sequences holding ``seq_len - query_len`` tokens (prefilled in one earlier step)."""
        hist = {}
        for i, (L, n) in enumerate(zip(spec.seq_lens, spec.query_lens)):
            self.add(i)
            if L - n:
                hist[i] = L - n
        if hist:
            self.step(hist, atol=atol)
        return {i: n for i, n in enumerate(spec.query_lens)}


# ---------------------------------------------------------------------- named batches
@pytest.mark.parametrize("name", list(BATCH_SPECS))
def test_batch_spec_quantized_matches_reference(name):
    eng = Engine(seed=list(BATCH_SPECS).index(name), layers=1)  # one layer: quantizing is the slow part
    eng.step(eng.prime(BATCH_SPECS[name]))


@pytest.mark.parametrize("name", list(BATCH_SPECS))
def test_batch_spec_exact_mode_is_plain_attention(name):
    eng = Engine(fp_pages=True, seed=list(BATCH_SPECS).index(name))
    eng.step(eng.prime(BATCH_SPECS[name]), atol=1e-5)


def test_exact_mode_bf16_pages_hold_model_bytes():
    eng = Engine(fp_pages=True, dtype=torch.bfloat16)
    chunks = eng.prime(BatchSpec((140,), (10,)), atol=2e-2)
    eng.step(chunks, atol=2e-2)
    # page 0 and 1 are full: their bytes are the bf16 keys, exactly
    blk = eng.seqs[0]["table"][1]
    k_hist = torch.cat(eng.seqs[0]["k"][0])[P : 2 * P].to(torch.bfloat16)
    k_page, _ = eng.codec.decode(eng.caches[0][blk].reshape(HKV, -1))
    assert torch.equal(k_page.to(torch.bfloat16), k_hist.transpose(0, 1))


# ---------------------------------------------------------------------- lifecycle over many steps
def run_lifecycle(eng: Engine, steps=40, seed=1):
    """Random arrivals, decode and chunked prefill, finishes mid-page (blocks reused first)."""
    rng = random.Random(seed)
    nxt = 0
    for _ in range(steps):
        if len(eng.seqs) < 3 and rng.random() < 0.5:
            eng.add(nxt)
            nxt += 1
        chunks = {}
        for sid, s in eng.seqs.items():
            if rng.random() < 0.2:
                continue  # running but not scheduled this step
            chunks[sid] = rng.choice([1, 1, 1, 7, 70]) if s["len"] else rng.choice([5, 64, 100])
        if chunks:
            eng.step(chunks)
        for sid in [s for s in eng.seqs if eng.seqs[s]["len"] > 150 and rng.random() < 0.3]:
            eng.finish(sid)
    return SimpleNamespace(**eng.builder.group.pool.snapshot())


def scripted_lifecycle(eng: Engine):
    """Two slots, three sequences: early finalisation, re-open, completion of a re-opened page,
    a finish mid-page whose block is handed out again (reclaim), and unscheduled steps."""
    for sid in "ABC":
        eng.add(sid)
    eng.step({"A": 10, "B": 10})
    eng.step({"C": 10})  # no free slot: A's page (LRU) is finalised early with 10 tokens
    eng.step({"A": 1})  # A appends again: its page is re-opened (from B's slot: B finalised early)
    eng.step({"A": 60, "C": 1})  # A's re-opened page fills and is finalised from its slot + input
    eng.step({"B": 1, "C": 1})  # B re-opened too
    eng.finish("C")  # C ends mid-page; its block goes back to the free list first
    eng.add("D")
    eng.step({"D": 5, "B": 1})  # D gets C's block, written from offset 0: C's slot is reclaimed
    eng.step({"B": 100, "D": 1})
    eng.step({"A": 1, "D": 1})
    return SimpleNamespace(**eng.builder.group.pool.snapshot())


def test_lifecycle_quantized_matches_reference():
    st = scripted_lifecycle(Engine(num_blocks=40, staging_slots=2, layers=1))
    assert st.early_finalisations >= 2 and st.reopened >= 2 and st.reclaimed >= 1


def test_lifecycle_exact_loses_nothing():
    """With exact pages, early finalisation + re-open is lossless: attention stays plain attention."""
    st = scripted_lifecycle(Engine(fp_pages=True, num_blocks=40, staging_slots=2))
    assert st.early_finalisations >= 2 and st.reopened >= 2 and st.reclaimed >= 1


def test_lifecycle_random_exact():
    """Random arrivals, unscheduled steps, chunked prefill, finishes mid-page, a pool under pressure."""
    eng = Engine(fp_pages=True, num_blocks=40, staging_slots=3)
    st = run_lifecycle(eng, steps=60, seed=3)
    assert st.early_finalisations > 0


# ---------------------------------------------------------------------- the builder
def test_builder_plans_once_per_step_for_all_layers():
    eng = Engine(reference=False)
    chunks = eng.prime(BATCH_SPECS["mixed_small"])
    md, _ = eng.step(chunks, check=False)
    # the plan is what a fresh pool replaying the same two steps would produce
    pool = StagingPool(eng.impls[0].runtime.num_slots, P)
    hist = {i: L - n for i, (L, n) in enumerate(zip((32, 40, 48, 56), (1, 1, 5, 5)))}
    pool.plan([eng.seqs[i]["table"] for i in hist], [hist[i] for i in hist], [hist[i] for i in hist])
    want = pool.plan(
        [eng.seqs[i]["table"] for i in chunks], [eng.seqs[i]["len"] for i in chunks], list(chunks.values())
    )
    for f in ("token_slots", "token_offsets", "tail_slots"):
        assert torch.equal(getattr(md.plan, f), getattr(want, f)), f
    assert md.plan_id == 2 and all(impl.last_plan_id == 2 for impl in eng.impls)


def test_builder_skips_padding_and_null_block_rows():
    eng = Engine(reference=False)
    eng.add(0)
    cm, _ = eng.metadata({0: 5})
    # append a padding row (no tokens) and a dummy row (tokens written to the null block)
    bt = torch.cat([cm.block_table_tensor, torch.zeros(2, cm.block_table_tensor.shape[1], dtype=torch.int32)])
    qsl = torch.tensor([0, 5, 5, 8], dtype=torch.int32)
    lens = torch.tensor([5, 0, 3], dtype=torch.int32)
    cm = CommonAttentionMetadata(
        query_start_loc=qsl,
        query_start_loc_cpu=qsl,
        seq_lens=lens,
        seq_lens_cpu_upper_bound=lens,
        num_reqs=3,
        num_actual_tokens=8,
        max_query_len=5,
        max_seq_len=5,
        block_table_tensor=bt,
        slot_mapping=torch.cat([cm.slot_mapping, torch.full((3,), -1, dtype=torch.int64)]),
    )
    md = eng.builder.build(0, cm)
    assert md.plan.token_slots[:5].ge(0).all() and md.plan.token_slots[5:].eq(-1).all()
    assert md.tail_slots[1:].tolist() == [-1, -1]
    snap = eng.builder.group.pool.snapshot()
    assert snap["slots_in_use"] == 1 and 0 not in snap["slot_blocks"]


def test_builder_rejects_a_slot_mapping_it_disagrees_with():
    eng = Engine(reference=False, debug=True)
    eng.add(0)
    cm, _ = eng.metadata({0: 5})
    cm.slot_mapping[3] += 1
    with pytest.raises(RuntimeError, match="slot mapping disagrees"):
        eng.builder.build(0, cm)


def test_a_layer_that_skips_a_plan_is_an_error_in_debug_mode():
    eng = Engine(reference=False, debug=True)
    eng.add(0)
    cm, _ = eng.metadata({0: 5})
    md = eng.builder.build(0, cm)
    x = torch.zeros(5, HKV, D)
    eng.impls[0].append(x, x, eng.caches[0], md)
    with pytest.raises(RuntimeError, match="appended plan"):
        eng.impls[1].attend(torch.zeros(5, HQ, D), x, x, eng.caches[1], md, torch.zeros(5, HQ, D))
    cm2, _ = eng.metadata({0: 1})
    md2 = eng.builder.build(0, cm2)
    with pytest.raises(RuntimeError, match="every layer must execute"):
        eng.impls[1].append(x[:1], x[:1], eng.caches[1], md2)


# ---------------------------------------------------------------------- which kernels run
def test_cpu_layers_run_the_cpp_kernels_on_2bit_pages_and_the_reference_otherwise():
    from kivi_serve.backend.executors import KernelExecutor, TorchExecutor
    from kivi_serve.kernels import cpu

    eng = Engine(layers=1)
    eng.add(0)
    eng.step({0: 70})
    assert eng.impls[0].executor(eng.caches[0]).kernels is cpu
    three = Engine(layers=1, scheme="kivi-serve-3bit")  # no C++ decode for 3-bit keys: the reference
    three.add(0)
    three.step({0: 70})
    three.step({0: 1})
    assert isinstance(three.impls[0].executor(three.caches[0]), TorchExecutor)
    exact = Engine(layers=1, fp_pages=True)
    assert not isinstance(exact.impls[0].executor(exact.caches[0]), KernelExecutor)


# ---------------------------------------------------------------------- backend facts
def test_customize_spec_gives_uint8_pages_of_the_layout_bytes():
    cfg = fake_config(page_size=128, dtype=torch.bfloat16)
    cfg.model_config = SimpleNamespace(dtype=torch.bfloat16)
    with set_current_vllm_config(cfg):
        spec = KiviAttentionBackend.customize_spec(
            FullAttentionSpec(block_size=128, num_kv_heads=3, head_size=64, dtype=torch.bfloat16)
        )
        assert KiviAttentionBackend.get_supported_kernel_block_sizes() == [128]
    assert spec.dtype == torch.uint8 and spec.state_content_bytes == PageLayout(64, 128).slot_bytes == 43
    assert spec.page_size_bytes == 3 * 128 * 43
    assert KiviAttentionBackend.customize_spec(spec) is spec
    cfg.additional_config["kivi_serve"]["fp_pages"] = True
    with set_current_vllm_config(cfg):
        exact = KiviAttentionBackend.customize_spec(
            FullAttentionSpec(block_size=128, num_kv_heads=3, head_size=64, dtype=torch.bfloat16)
        )
    assert exact.state_content_bytes == 2 * 64 * 2  # K and V in bf16, as vLLM's own cache


def test_codecs_roundtrip():
    k, v = torch.randn(4, P, D), torch.randn(4, P, D)
    fills = torch.tensor([P, P, 10, 1])
    sinks = torch.tensor([True, False, False, False])
    ex = FpPagesCodec(D, P, torch.float32)
    kd, vd = ex.decode(ex.encode(k, v, fills, sinks))
    assert torch.equal(kd[0], k[0]) and torch.equal(vd[2, :10], v[2, :10]) and kd[2, 10:].eq(0).all()
    q = QuantCodec(PageLayout(D, P))
    assert q.encode(k, v, fills, sinks).shape == (4, q.page_bytes)


def test_validate_configuration_gives_readable_reasons():
    supported = dict(
        head_size=64,
        dtype=torch.bfloat16,
        kv_cache_dtype="auto",
        block_size=128,
        use_mla=False,
        has_sink=False,
        use_sparse=False,
        use_mm_prefix=False,
        use_per_head_quant_scales=False,
        device_capability=None,
        attn_type="decoder",
    )
    unsupported = dict(head_size=80, dtype=torch.float64, kv_cache_dtype="fp8", block_size=16, use_mla=True)
    unsupported |= dict(has_sink=True, attn_type="encoder", has_sliding_window=True)
    with set_current_vllm_config(fake_config(page_size=128)):
        reasons = KiviAttentionBackend.validate_configuration(**(supported | unsupported))
        ok = KiviAttentionBackend.validate_configuration(**supported)
    text = "\n".join(reasons)
    for needle in (
        "head_dim 80",
        "float64",
        "kv_cache_dtype 'fp8'",
        "block size 16",
        "MLA",
        "encoder",
    ):
        assert needle in text, needle
    # windows and sinks run on the PyTorch executor (CPU); only the CUDA 2-bit kernels refuse them
    assert "sliding-window" not in text and "sinks" not in text
    assert all(r.startswith("kivi-serve: ") for r in reasons)
    assert ok == []


def test_impl_refuses_unsupported_layers_with_a_reason():
    cfg = fake_config()
    with set_current_vllm_config(cfg), pytest.raises(ValueError, match="ALiBi"):
        KiviAttentionImpl(HQ, D, 0.125, HKV, alibi_slopes=[0.5] * HQ)
    with set_current_vllm_config(cfg), pytest.raises(ValueError, match="head_dim 96"):
        KiviAttentionImpl(HQ, 96, 0.125, HKV)
    with set_current_vllm_config(cfg), pytest.raises(ValueError, match="sinks of shape"):
        KiviAttentionImpl(HQ, D, 0.125, HKV, sinks=torch.zeros(HQ + 1))


def test_compiled_kernels_take_windows_and_sinks_refuse_softcap():
    """The CUDA 2-bit decode kernel applies sliding windows and sink logits but no soft-cap: with a GPU
    capability the soft-cap is refused with a reason (the PyTorch executor, without one, takes it);
    the executor refuses it too."""
    from kivi_serve.backend.attention import unsupported_reasons
    from kivi_serve.backend.executors import KernelExecutor, cuda_kernels
    from kivi_serve.kernels.semantics import LayerAttention

    args = (D, torch.bfloat16, "auto", 128, 128)
    gpu = unsupported_reasons(
        *args, has_sliding_window=True, has_sink=True, use_softcap=True, device_capability=(9, 0)
    )
    assert len(gpu) == 1 and "soft-capping" in gpu[0] and "CUDA" in gpu[0], gpu
    assert unsupported_reasons(*args, has_sliding_window=True, has_sink=True, device_capability=(9, 0)) == []
    assert unsupported_reasons(*args, has_sliding_window=True, has_sink=True, use_softcap=True) == []
    codec = make_codec(D, 128, torch.bfloat16)
    sinks = torch.zeros(8)
    ex = KernelExecutor(codec, cuda_kernels(), LayerAttention(window=64, sinks=sinks))  # the kernel does both
    assert ex.attn.window == 64 and ex.attn.sinks is sinks
    with pytest.raises(ValueError, match="soft-cap"):
        KernelExecutor(codec, cuda_kernels(), LayerAttention(window=64, softcap=30.0))


class FakeCudaPlatform:
    """vLLM's ``current_platform`` as the backend sees it on a GPU of compute capability ``cap`` (no
    GPU needed: the backend only asks which platform it is on and the GPU's capability)."""

    def __init__(self, cap: tuple[int, int]) -> None:
        self.cap = cap

    def is_cpu(self) -> bool:
        return False

    def is_cuda(self) -> bool:
        return True

    def get_device_capability(self, device_id: int = 0):
        from vllm.platforms.interface import DeviceCapability

        return DeviceCapability(*self.cap)


P256, VR = "kivi-serve-2bit-p256", "kivi-serve-2bit-p256-vr"


#: GPUs by the shared memory a block may opt into (NVIDIA's compute-capability table, loader.SMEM_OPTIN)
OPTIN_163 = ((8, 0), (8, 7))
OPTIN_227 = ((9, 0), (10, 0), (10, 3))
OPTIN_99 = ((8, 6), (8, 9), (12, 0), (12, 1))


def _refused_kernels(reasons: list[str]) -> set[str]:
    """Which kernels a list of refusals names: {"quantizer", "decode"}."""
    words = {"quantizer": ("the quantizer", "rotated values at"), "decode": ("the decode kernel",)}
    return {k for k, ws in words.items() if any(w in r for r in reasons for w in ws)}


def test_cuda_selection_refuses_what_the_kernels_cannot_run_on_the_device():
    """A layer is refused on a GPU exactly where a kernel's shared memory per block (the kernels' own
    figures, which tests/test_kernels_compile.py holds loader.smem_bytes to) exceeds what the GPU lets
    a block opt into: 163 KiB (A100, Orin), 227 KiB (Hopper, data-centre Blackwell), 99 KiB (sm_86,
    sm_89 and consumer Blackwell sm_120 / sm_121). Rotated values at head_dim 256 x page 256 in the
    quantizer (a 256 KiB fp32 tile) fit no GPU."""
    bf16 = torch.bfloat16

    def gpu(d, scheme, cap, page=256):
        return unsupported_reasons(d, bf16, "auto", page, page, scheme=scheme, device_capability=cap)

    q, dec, none = {"quantizer"}, {"decode"}, set()
    # (head_dim, scheme, page): refused on the (163 KiB, 227 KiB, 99 KiB) GPUs
    cases = {
        (64, P256, 256): (none, none, none),  # quantizer 70.8 KiB, decode 97.5 / 105.6 (8 / 16 rows)
        (128, P256, 256): (none, none, q),  # quantizer 137.1 KiB
        (256, P256, 256): (dec, none, q | dec),  # quantizer 141.8 KiB, decode 175.7 / 184.8
        (64, VR, 256): (none, none, q),  # the quantizer's fp32 tile: 102.8 KiB; decode 98.5 / 106.6
        (128, VR, 256): (none, none, q),  # 137.1 KiB
        (256, VR, 256): (q | dec, q, q | dec),  # quantizer 269.8 KiB: no GPU; decode 177.7 / 186.8
        (128, "kivi-serve-2bit", 128): (none, none, none),  # quantizer 71.0 KiB, decode 94.5 / 110.6
        (256, "kivi-serve-2bit", 128): (none, none, q),  # quantizer 139.6 KiB, decode 96.0 / 107.0
        (256, "kivi-serve-2bit", 64): (none, none, none),  # quantizer 74.6 KiB, decode 108.9 / 72.5
    }
    for (d, scheme, page), expected in cases.items():
        for caps, want in zip((OPTIN_163, OPTIN_227, OPTIN_99), expected, strict=True):
            for cap in caps:
                assert _refused_kernels(gpu(d, scheme, cap, page)) == want, (d, scheme, page, cap)
    for cap, arch, kib in (((8, 0), "sm_80", 163), ((8, 6), "sm_86", 99), ((12, 0), "sm_120", 99)):
        why = gpu(256, P256, cap)[-1]
        assert f"compute capability {cap[0]}.{cap[1]}, {arch}" in why and f"{kib} KiB of shared memory" in why
        assert "decode kernel at head_dim 256 x page 256 needs 175.7 KiB" in why and "sm_90" in why, why
    for cap in OPTIN_227:
        (why,) = gpu(256, VR, cap)
        assert "on any GPU" in why and "rotated values at head_dim 256 x page 256" in why, why
        assert "run it on CPU" in why
    a100 = gpu(256, VR, (8, 0))  # both kernels' reasons, the quantizer's first
    assert len(a100) == 2 and "rotated values" in a100[0] and "decode kernel" in a100[1]
    # the 3- and 4-bit formats: refused on every GPU by the decode kernel (2-bit codes only); their
    # quantizer at head_dim 256 x page 128 (139.6 / 139.4 KiB) fits an A100, not a 99 KiB GPU
    for scheme in ("kivi-serve-3bit", "kivi-serve-4bit"):
        for cap in OPTIN_163 + OPTIN_227 + OPTIN_99:
            reasons = gpu(256, scheme, cap, page=128)
            assert any("2-bit codes only" in r for r in reasons), (scheme, cap)
            assert _refused_kernels(reasons) == (q if cap in OPTIN_99 else none), (scheme, cap)
    # a GPU kivi-serve's table does not know: the smallest opt-in of the table, said so
    (why,) = gpu(256, "kivi-serve-2bit", (11, 0), page=128)
    assert "sm_110 (not in kivi-serve's table of GPUs: assumed the smallest)" in why and "99 KiB" in why
    assert gpu(128, "kivi-serve-2bit", (11, 0), page=128) == []
    # older GPUs: the capability alone (no spec is asked about an arch the kernels are not built for)
    assert gpu(128, P256, (7, 5)) == [
        "GPU compute capability 7.5 is too old (kivi-serve's kernels need 8.0 or newer)"
    ]
    # on the CPU (no capability) and with fp_pages, nothing of this applies
    assert unsupported_reasons(256, torch.float32, "auto", 256, 256, scheme=VR) == []


def test_cuda_refusal_follows_the_decode_build_the_layer_launches(monkeypatch):
    """kivi-serve-2bit at head_dim 128 x page 128 (the default page) on an L4 / RTX 4090 (sm_89, 99 KiB):
    the 8-row decode build needs 94.5 KiB, the 16-row build (more than 8 query heads per KV head)
    110.6 KiB. vLLM's selector check does not know the group and refuses only where no build fits; the
    layer (which knows it) refuses a group above 8, when the engine is built."""
    from kivi_serve.backend import attention

    bf16, two = torch.bfloat16, "kivi-serve-2bit"

    def l4(group, cap=(8, 9)):
        return unsupported_reasons(
            128, bf16, "auto", 128, 128, scheme=two, device_capability=cap, query_group=group
        )

    assert l4(None) == [] and l4(4) == [] and l4(8) == []
    (why,) = l4(16)
    assert "decode kernel at head_dim 128 x page 128 (16 query heads per KV head) needs 110.6 KiB" in why
    assert "99 KiB of shared memory a block may use on sm_89" in why
    assert l4(16, cap=(8, 0)) == [] and l4(16, cap=(9, 0)) == []  # 163 / 227 KiB
    monkeypatch.setattr(attention, "current_platform", FakeCudaPlatform((8, 9)))
    sel = dict(head_size=128, dtype=bf16, kv_cache_dtype="auto", block_size=128)
    with set_current_vllm_config(fake_config(page_size=128, scheme=two, dtype=bf16)):
        assert KiviAttentionBackend.validate_configuration(**sel) == []
        KiviAttentionImpl(8, 128, 0.088, 2)  # 4 query heads per KV head: the 8-row build
        with pytest.raises(ValueError, match=r"cannot run this model: .*16 query heads per KV head.*sm_89"):
            KiviAttentionImpl(32, 128, 0.088, 2)


def test_consumer_blackwell_refusal_happens_when_the_engine_is_built(monkeypatch):
    """sm_120 (RTX 50xx) lets a block use 99 KiB, not the 227 KiB of sm_90 / sm_100: the decode kernel
    at head_dim 256 x page 256 and the quantizer at head_dim 256 x page 128 are refused by the selector
    check and the layer, before anything is compiled; head_dim 128 x page 128 is built."""
    from kivi_serve.backend import attention

    bf16 = torch.bfloat16
    monkeypatch.setattr(attention, "current_platform", FakeCudaPlatform((12, 0)))
    sel = dict(head_size=256, dtype=bf16, kv_cache_dtype="auto", block_size=256)
    with set_current_vllm_config(fake_config(page_size=256, scheme=P256, dtype=bf16)):
        reasons = KiviAttentionBackend.validate_configuration(**sel)
        assert _refused_kernels(reasons) == {"quantizer", "decode"}
        assert all("sm_120" in r and "99 KiB" in r for r in reasons), reasons
        with pytest.raises(ValueError, match=r"decode kernel at head_dim 256 x page 256 needs .*sm_120"):
            KiviAttentionImpl(8, 256, 0.0625, 2)
    with set_current_vllm_config(fake_config(page_size=128, scheme="kivi-serve-2bit", dtype=bf16)):
        with pytest.raises(ValueError, match=r"quantizer at head_dim 256 x page 128 needs 139.6 KiB.*sm_120"):
            KiviAttentionImpl(8, 256, 0.0625, 2)
        impl = KiviAttentionImpl(8, 128, 0.088, 2)
        assert impl.codec.layout.page_size == 128 and impl._executor is None  # nothing compiled yet


def test_cuda_refusal_happens_when_the_engine_is_built(monkeypatch):
    """On a (faked) GPU the selector check and the impl's construction give the kernels' reasons,
    before any kernel is compiled or launched; what the GPU can run is built as on the CPU."""
    from kivi_serve.backend import attention

    monkeypatch.setattr(attention, "current_platform", FakeCudaPlatform((8, 0)))
    cfg = fake_config(page_size=256, scheme=P256, dtype=torch.bfloat16)
    sel = dict(head_size=256, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=256)
    with set_current_vllm_config(cfg):
        (why,) = KiviAttentionBackend.validate_configuration(**sel)
        assert why.startswith("kivi-serve: ") and "sm_80" in why and "163 KiB" in why
        from vllm.platforms.interface import DeviceCapability

        h100 = DeviceCapability(9, 0)
        assert KiviAttentionBackend.validate_configuration(**sel, device_capability=h100) == []
        with pytest.raises(ValueError, match=r"cannot run this model: .*head_dim 256 x page 256.*sm_80"):
            KiviAttentionImpl(8, 256, 0.0625, 2)
        impl = KiviAttentionImpl(8, 128, 0.088, 2)  # head_dim 128 x page 256 fits an A100
        assert impl.codec.layout.page_size == 256 and impl._executor is None  # nothing compiled yet
    with set_current_vllm_config(fake_config(page_size=256, scheme=VR, dtype=torch.bfloat16)):
        impl = KiviAttentionImpl(8, 128, 0.088, 2)  # rotated values: served on a GPU now
        assert impl.codec.layout.v_rotate and not impl.codec.layout.v_pin_ends
        monkeypatch.setattr(attention, "current_platform", FakeCudaPlatform((9, 0)))
        with pytest.raises(ValueError, match="on any GPU: rotated values at head_dim 256 x page 256"):
            KiviAttentionImpl(8, 256, 0.0625, 2)
    # fp_pages runs the PyTorch executor on any device: no kernel limit applies
    with set_current_vllm_config(fake_config(page_size=256, scheme=VR, dtype=torch.bfloat16, fp_pages=True)):
        KiviAttentionImpl(8, 256, 0.0625, 2)


def test_staging_bytes_come_out_of_an_explicit_kv_budget():
    cfg = fake_config(budget=1 << 30, max_num_seqs=4)
    with set_current_vllm_config(cfg):
        impls = [KiviAttentionImpl(HQ, D, 0.125, HKV) for _ in range(3)]  # the model holds its layers
    per_layer = (4 + 4) * 2 * HKV * P * (D + 4)  # (max_num_seqs + headroom) slots, K+V, int8 rows + scale
    assert cfg.cache_config.kv_cache_memory_bytes == (1 << 30) - 3 * per_layer
    assert impls[0].runtime.stats().staging_bytes == 3 * per_layer


# ---------------------------------------------------------------------- the public API
def test_scheme_setting_selects_the_page_format():
    from kivi_serve.backend import engine_overrides
    from kivi_serve.backend.settings import KiviSettings, settings_from

    cfg = engine_overrides(128, scheme="kivi-serve-4bit")["additional_config"]
    s = settings_from(cfg)
    assert s.scheme == "kivi-serve-4bit" and s.as_config()["scheme"] == "kivi-serve-4bit"
    codec = make_codec(64, s.page_size, torch.bfloat16, scheme=s.scheme)
    assert (codec.layout.k_bits, codec.layout.v_bits, codec.layout.wide_channels) == (4, 4, 0)
    uniform = make_codec(64, 128, torch.bfloat16, scheme="kivi2-uniform")
    assert uniform.codebook == "uniform" and uniform.layout.exact_tokens == 0
    for bad in ("fp16", "nope"):
        with pytest.raises(ValueError, match="scheme") as err:
            KiviSettings(scheme=bad)
        assert "reference-only" not in str(err.value)
    with pytest.raises(ValueError, match="reference-only format"):  # keys before RoPE: no kernel reads them
        KiviSettings(scheme="kivi-serve-2bit-p256-vr-pr")
    # a reason on CUDA (the decode kernel reads 2-bit codes), none on CPU
    three = dict(scheme="kivi-serve-3bit")
    on_gpu = unsupported_reasons(64, torch.bfloat16, "auto", 128, 128, **three, device_capability=(9, 0))
    assert any("2-bit codes only" in r for r in on_gpu)
    assert unsupported_reasons(64, torch.bfloat16, "auto", 128, 128, **three) == []


def test_a_scheme_brings_its_page_size(monkeypatch):
    """A scheme defined for 256-token pages selects them wherever the page size is not given (the
    environment alone, engine_overrides without a page size); a contradicting page size is an error."""
    from kivi_serve.backend import engine_overrides
    from kivi_serve.backend.settings import settings_from

    vr = "kivi-serve-2bit-p256-vr"
    ov = engine_overrides(scheme=vr)
    assert ov["block_size"] == 256 and ov["additional_config"]["kivi_serve"]["page_size"] == 256
    assert engine_overrides()["block_size"] == 128
    monkeypatch.setenv("KIVI_SERVE_SCHEME", vr)
    assert (settings_from(None).scheme, settings_from(None).page_size) == (vr, 256)
    monkeypatch.setenv("KIVI_SERVE_PAGE_SIZE", "128")
    with pytest.raises(ValueError, match="defined for 256-token pages"):
        settings_from(None)
    monkeypatch.delenv("KIVI_SERVE_SCHEME")
    assert settings_from(None).page_size == 128


def test_engine_overrides_and_cache_stats_api():
    from kivi_serve.backend import BackendStats, cache_stats, engine_overrides

    ov = engine_overrides(128)
    assert ov == {
        "attention_backend": "CUSTOM",
        "block_size": 128,
        "additional_config": {"kivi_serve": {"page_size": 128, "fp_pages": False}},
    }
    assert engine_overrides(64, fp_pages=True, staging_slots=9)["additional_config"]["kivi_serve"] == {
        "page_size": 64,
        "fp_pages": True,
        "staging_slots": 9,
    }
    with pytest.raises(ValueError, match="page_size"):
        engine_overrides(100)
    eng = Engine(reference=False)
    eng.add(0)
    eng.step({0: 70}, check=False)
    st = cache_stats()
    assert st.active and st.mode == "quantized" and st.slot_bytes == PageLayout(D, P).slot_bytes
    assert eng.impls[0].staging.dtype == torch.uint8  # int8 staging rows by default
    assert st.staging_slots_in_use == 1 and st.staging_bytes == LAYERS * eng.impls[0].staging.numel()
    assert cache_stats(eng.cfg) == st  # the engine of this config, explicitly
    assert BackendStats(**st.as_dict()) == st  # what crosses the RPC to the front end


def test_register_is_idempotent_and_routes_cpu_attn_per_engine():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from kivi_serve.backend import BACKEND_PATH, cpu_selector, register

    register()
    register()
    assert AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH
    assert AttentionBackendEnum.CPU_ATTN.get_path() == cpu_selector.CPU_ATTN_PATH
    cfg = fake_config()
    with set_current_vllm_config(cfg):
        assert AttentionBackendEnum.CPU_ATTN.get_class() is CPUAttentionBackend
        cfg.attention_config.backend = AttentionBackendEnum.CUSTOM
        assert AttentionBackendEnum.CPU_ATTN.get_class() is KiviAttentionBackend


# ---------------------------------------------------------------------- CUDA (hand-built impl + metadata)
@pytest.mark.cuda
@pytest.mark.parametrize("name", ["mixed_small", "medium_decode", "chunk_ends_mid_page"])
def test_cuda_quantized_impl_matches_reference(name):
    """The impl on CUDA dispatches to the CuPy kernels; pages must equal the reference's bytes."""
    eng = Engine(dtype=torch.bfloat16, device="cuda", seed=list(BATCH_SPECS).index(name))
    eng.step(eng.prime(BATCH_SPECS[name], atol=3e-2), atol=3e-2)


@pytest.mark.cuda
def test_cuda_lifecycle_under_pool_pressure():
    eng = Engine(dtype=torch.bfloat16, device="cuda", num_blocks=40, staging_slots=3)
    for sid in range(3):
        eng.add(sid)
    for chunks in (
        {0: 100, 1: 5, 2: 64},
        {0: 1, 1: 1, 2: 1},
        {0: 30, 1: 1},
        {1: 1, 2: 70},
        {0: 1, 1: 1, 2: 1},
    ):
        eng.step(chunks, atol=3e-2)


@pytest.mark.cuda
def test_cuda_exact_mode_is_plain_attention():
    eng = Engine(fp_pages=True, dtype=torch.float32, device="cuda")
    eng.step(eng.prime(BATCH_SPECS["mixed_medium"], atol=1e-4), atol=1e-4)
