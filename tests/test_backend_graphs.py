"""Decode steps are graph-safe, and the prefill path is as accurate as attention in the model dtype.

**Replay.** vLLM captures a uniform decode step once (metadata from ``build_for_cudagraph_capture``)
and then, every step, runs ``build()`` (which refreshes the persistent buffers) and replays the
captured launches: the Python of ``forward()`` does not run again. So everything a decode step reads
must flow through buffers whose addresses never change. Two identical engines run the same decode
steps: one eagerly, one by replaying — a real CUDA graph on a GPU; on CPU the layer calls made with
the *capture-time* metadata object, which is what a graph replays. Outputs, pages and staging must
be equal bit for bit.

**Prefill.** A chunk through the new path (context pages dequantized to a scratch in the model
dtype, the open page from its staging slot, attention by varlen flash attention or SDPA) is
compared with fp64 attention over the same dequantized context: within ``K_TOL`` times the error
that attention in the model dtype itself makes (``tests/test_kernels_cuda.py``'s bound).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from test_backend_units import HKV, HQ, LAYERS, D, Engine  # noqa: E402

from kivi_serve.kernels import reference as R  # noqa: E402

K_TOL = 4.0
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


class StaticBatch:
    """vLLM's persistent input buffers of a decode batch of ``B`` rows (fixed addresses)."""

    def __init__(self, cm) -> None:
        self.cm = cm
        self.tensors = {
            f: getattr(cm, f).clone()
            for f in ("query_start_loc", "seq_lens", "block_table_tensor", "slot_mapping")
        }
        self.host = {f: getattr(cm, f).clone() for f in ("query_start_loc_cpu", "seq_lens_cpu_upper_bound")}
        self.load(cm)

    def load(self, cm):
        """Copy a step's batch into the buffers; returns metadata over them."""
        for f, t in self.tensors.items():
            t.copy_(getattr(cm, f))
        for f, t in self.host.items():
            t.copy_(getattr(cm, f))
        return self.cm.replace(**self.tensors, **self.host)


def _inputs(eng, T, seed):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(T, HQ, D, generator=gen).to(eng.dev, eng.dtype),
            torch.randn(T, HKV, D, generator=gen).to(eng.dev, eng.dtype),
            torch.randn(T, HKV, D, generator=gen).to(eng.dev, eng.dtype),
        )
        for _ in eng.impls
    ]


def _layers(eng, md, inputs, outs):
    for impl, cache, (q, k, v), out in zip(eng.impls, eng.caches, inputs, outs):
        impl.append(k, v, cache, md)
        impl.attend(q, k, v, cache, md, out)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_replay_equals_eager_bit_for_bit(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    eager, graph = (Engine(reference=False, dtype=dtype, device=device, seed=7, num_blocks=64) for _ in "ab")
    lens = (60, 127, 200, 10)  # crosses page boundaries during the steps below (P = 64)
    for eng in (eager, graph):
        for sid in range(len(lens)):
            eng.add(sid)
        eng.step({sid: n for sid, n in enumerate(lens)}, check=False)
    chunks = {sid: 1 for sid in range(len(lens))}
    width = 8
    B = len(lens)
    cm, _ = graph.metadata(chunks, width=width)
    static = StaticBatch(cm)
    # static inputs / outputs of the captured step
    s_in = [tuple(torch.zeros_like(x) for x in layer) for layer in _inputs(graph, B, 0)]
    s_out = [torch.zeros(B, HQ, D, device=graph.dev, dtype=dtype) for _ in graph.impls]
    md_capture = graph.builder.build_for_cudagraph_capture(static.load(cm))
    cuda_graph = None
    if device == "cuda":
        torch.cuda.synchronize()
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            _layers(graph, md_capture, s_in, s_out)
    # the capture's plan was idle: nothing was written; from here on both engines take the same steps
    for step in range(70):
        inputs = _inputs(eager, B, 100 + step)
        cm_a, _ = eager.metadata(chunks, width=width)
        md_a = eager.builder.build(0, cm_a)
        outs_a = [torch.zeros(B, HQ, D, device=eager.dev, dtype=dtype) for _ in eager.impls]
        _layers(eager, md_a, inputs, outs_a)
        cm_b, _ = graph.metadata(chunks, width=width)
        graph.builder.build(0, static.load(cm_b))  # refreshes the persistent buffers only
        for dst, src in zip(s_in, inputs):
            for d, s in zip(dst, src):
                d.copy_(s)
        if cuda_graph is not None:
            cuda_graph.replay()
        else:
            _layers(graph, md_capture, s_in, s_out)  # what a graph replays: capture-time metadata
        for eng in (eager, graph):
            for sid in chunks:
                eng.seqs[sid]["len"] += 1
        for li in range(LAYERS):
            assert torch.equal(outs_a[li], s_out[li]), f"step {step}, layer {li}: output"
            assert torch.equal(eager.caches[li], graph.caches[li]), f"step {step}, layer {li}: pages"
            assert torch.equal(eager.impls[li].staging, graph.impls[li].staging), f"step {step}: staging"
    pools = [eng.builder.group.pool.snapshot() for eng in (eager, graph)]
    assert pools[0] == pools[1] and pools[0]["reclaimed"] == 0


def _fp64_attention(q, k, v, ctx):
    """Causal attention of ``n`` new tokens after ``ctx`` cached ones, in fp64 (GQA)."""
    n = q.shape[0]
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = torch.einsum("thd,shd->hts", q, k) * D**-0.5
    keep = torch.arange(ctx + n, device=q.device).unsqueeze(0) <= (
        ctx + torch.arange(n, device=q.device)
    ).unsqueeze(1)
    p = torch.softmax(s.masked_fill(~keep, -torch.inf), -1)
    return torch.einsum("hts,shd->thd", p, v)


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_path_matches_fp64_attention_within_k_tol(device):
    """Chunks over quantized pages: a first chunk, one that starts mid-page (its open page comes from
    staging), one that starts on a page boundary (a prefix-cache hit's shape), next to a decode."""
    dtype = torch.bfloat16
    eng = Engine(reference=False, dtype=dtype, device=device, seed=3, num_blocks=64, layers=1)
    for sid in range(3):
        eng.add(sid)
    eng.step({0: 150, 1: 64, 2: 30}, check=False)
    # 1: sequence 0 completes its staged page and opens another, 1 starts on a page boundary;
    # 2: sequence 1 starts mid-page and stays in it (its context's last page is read from staging),
    #    and 0, a one-token row after a prefill row, goes through the prefill path
    for step, chunks in enumerate(({2: 1, 0: 70, 1: 100}, {2: 1, 1: 20, 0: 1})):
        cm, sids = eng.metadata(chunks)
        md = eng.builder.build(0, cm)
        assert md.num_decodes == 1 and md.prefill.num_tails == 2 * step  # step 2: both rows
        T = cm.num_actual_tokens
        ((q, k, v),) = _inputs(eng, T, 11)
        out = torch.zeros(T, HQ, D, device=eng.dev, dtype=dtype)
        impl, cache = eng.impls[0], eng.caches[0]
        impl.append(k, v, cache, md)
        impl.attend(q, k, v, cache, md, out)
        pages = R.pages_view(cache, impl.codec).cpu()
        staging = impl.staging.cpu()
        qsl = cm.query_start_loc_cpu.tolist()
        for b, sid in enumerate(sids):
            q0, q1 = qsl[b], qsl[b + 1]
            L = eng.seqs[sid]["len"] + chunks[sid]
            ctx = L - (q1 - q0)
            ck, cv = R.gather_context(
                pages, staging, cm.block_table_tensor[b].cpu(), ctx, L, int(md.tail_slots[b]), impl.codec,
                dtype=dtype,
            )
            qb, kb, vb = q[q0:q1].cpu(), k[q0:q1].cpu(), v[q0:q1].cpu()
            keys, values = torch.cat([ck, kb.float()]), torch.cat([cv, vb.float()])
            truth = _fp64_attention(qb.double(), keys.double(), values.double(), ctx)
            lowp = _fp64_attention(qb, keys.to(dtype), values.to(dtype), ctx).double()
            err_lowp = (lowp - truth).abs().max().item()
            err = (out[q0:q1].cpu().double() - truth).abs().max().item()
            assert err <= K_TOL * err_lowp + 1e-6, (sid, chunks[sid], err, err_lowp)
        for sid in sids:
            eng.seqs[sid]["len"] += chunks[sid]
