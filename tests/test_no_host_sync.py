"""``build()`` + ``forward()`` of a step never read device data on the host.

On a GPU such a read (``.item()``, ``.tolist()``, ``.cpu()``, ``bool(t)``, boolean-mask indexing)
waits for the device, and a decode step cannot be captured in a CUDA graph. On a CPU machine every
tensor is a host tensor, so the tensors that live on the device on a GPU are *marked*: everything
vLLM hands the backend on the device (``query_start_loc``, ``seq_lens``, the block table, the slot
mapping, query/key/value/output, the KV cache) and every persistent tensor the backend allocates on
the device (staging, the planner's state and buffers: they pass through
:func:`kivi_serve.backend.planner.device_state`). Marking propagates through every torch op, and a
host read of a marked tensor raises and is counted; so is every ``aten::_local_scalar_dense``,
``nonzero`` or ``masked_select`` of one, under a dispatch mode.

The kernels are the boundary: on a GPU they read device memory on the device. The CPU executor
(PyTorch, host code) stands in for them here, so it receives unmarked tensors. On CUDA the same test
runs with the real kernels and real CUDA tensors, nothing marked, CUDA's sync debug mode set to
error, and the dispatch mode counting scalar reads of CUDA tensors.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("vllm")

from test_backend_units import HKV, HQ, D, Engine  # noqa: E402

from kivi_serve.backend import planner  # noqa: E402

HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.__float__,
}
#: ops whose result depends on device data on the host: a sync on a GPU
SYNCING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "repeat_interleave")


class HostRead(AssertionError):
    pass


class OnDevice(torch.Tensor):
    """A host tensor that stands for a device tensor: reading it on the host is an error."""

    reads: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS or (func is torch.Tensor.to and _to_host(args, kwargs)):
            cls.reads.append(getattr(func, "__name__", str(func)))
            raise HostRead(f"host read of a device tensor: {func}")
        return super().__torch_function__(func, types, args, kwargs)


def _to_host(args, kwargs) -> bool:
    target = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            target = a
    return target is not None and torch.device(target).type == "cpu"


def mark(t):
    return t.as_subclass(OnDevice) if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) else t


def unmark(t):
    """Plain tensors again (same storage), also inside a plan."""
    if isinstance(t, OnDevice):
        return t.as_subclass(torch.Tensor)
    if dataclasses.is_dataclass(t) and not isinstance(t, type):
        return type(t)(*(unmark(getattr(t, f.name)) for f in dataclasses.fields(t)))
    return t


class CountSyncs(TorchDispatchMode):
    """Counts ops that read device data on the host, applied to a device (marked or CUDA) tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        on_device = any(isinstance(a, OnDevice) or a.is_cuda for a in tensors)
        if on_device and name in SYNCING_OPS:
            self.syncs.append(name)
        elif on_device and name.startswith("index") and len(args) > 1 and isinstance(args[1], (list, tuple)):
            # boolean-mask indexing: the result's shape depends on device data (a nonzero inside)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
                self.syncs.append("bool_index")
        return func(*args, **(kwargs or {}))


class KernelBoundary:
    """The CPU executor behind the kernels' signatures, fed unmarked tensors (on a GPU the kernels
    read device memory on the device); what it returns lives on the device again."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        def call(*args, **kwargs):
            res = fn(*map(unmark, args), **{k: unmark(v) for k, v in kwargs.items()})
            return tuple(map(mark, res)) if isinstance(res, tuple) else mark(res)

        return call


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def engine(monkeypatch):
    dev = _device()
    if dev == "cpu":
        monkeypatch.setattr(planner, "device_state", mark)
    eng = Engine(
        reference=False, dtype=torch.float32 if dev == "cpu" else torch.bfloat16, device=dev, num_blocks=64
    )
    if dev == "cpu":
        eng.caches = [mark(c) for c in eng.caches]
    return eng


def run_step(eng: Engine, chunks: dict):
    """One step through builder.build() and every layer's append + forward, device tensors marked
    (CPU) or on the GPU; returns the host reads and syncs seen."""
    cm, _ = eng.metadata(chunks)
    T = cm.num_actual_tokens
    on_cpu = eng.dev.type == "cpu"
    if on_cpu:
        for f in ("query_start_loc", "seq_lens", "block_table_tensor", "slot_mapping"):
            setattr(cm, f, mark(getattr(cm, f)))
        for impl, cache in zip(eng.impls, eng.caches):
            impl.executor(cache)  # created outside the measured step (once per layer in an engine)
            if not isinstance(impl._executor, KernelBoundary):
                impl._executor = KernelBoundary(impl._executor)
    gen = torch.Generator().manual_seed(T)
    qkv = [
        (
            torch.randn(T, HQ, D, generator=gen).to(eng.dev, eng.dtype),
            torch.randn(T, HKV, D, generator=gen).to(eng.dev, eng.dtype),
            torch.randn(T, HKV, D, generator=gen).to(eng.dev, eng.dtype),
            torch.zeros(T, HQ, D, device=eng.dev, dtype=eng.dtype),
        )
        for _ in eng.impls
    ]
    if on_cpu:
        qkv = [tuple(map(mark, x)) for x in qkv]
    OnDevice.reads = []
    counter = CountSyncs()
    if not on_cpu:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with counter:
            md = eng.builder.build(0, cm)
            for impl, cache, (q, k, v, out) in zip(eng.impls, eng.caches, qkv):
                impl.append(k, v, cache, md)
                impl.attend(q, k, v, cache, md, out)
    finally:
        if not on_cpu:
            torch.cuda.set_sync_debug_mode("default")
    for sid, n in chunks.items():
        eng.seqs[sid]["len"] += n
    outs = [unmark(x[3]) for x in qkv]
    assert all(bool(torch.isfinite(o).all()) for o in outs)
    return md, OnDevice.reads, counter.syncs


def test_decode_step_has_no_host_sync(engine):
    for sid in range(3):  # prefill three sequences (one step, also measured)
        engine.add(sid)
    _, reads, syncs = run_step(engine, {0: 70, 1: 130, 2: 20})
    assert reads == [] and syncs == []
    for _ in range(3):
        md, reads, syncs = run_step(engine, {0: 1, 1: 1, 2: 1})
        assert md.num_decodes == 3 and md.prefill is None
        assert reads == [] and syncs == [], (reads, syncs)


def test_mixed_step_has_no_host_sync(engine):
    engine.add(0), engine.add(1)
    run_step(engine, {0: 100})
    md, reads, syncs = run_step(engine, {0: 1, 1: 90})  # a decode and a first chunk
    assert md.num_decodes == 1 and md.prefill is not None
    assert reads == [] and syncs == [], (reads, syncs)
    md, reads, syncs = run_step(engine, {1: 60, 0: 1})  # a chunk that starts mid-page (staged tail)
    assert md.prefill.num_tails == 1 or md.num_decodes == 0
    assert reads == [] and syncs == [], (reads, syncs)


def test_the_marking_catches_a_host_read():
    """The instrument works: reading a marked tensor, or a scalar of one, is caught."""
    x = mark(torch.arange(4))
    y = (x + 1)[1:]
    assert isinstance(y, OnDevice)
    with pytest.raises(HostRead):
        y.tolist()
    with pytest.raises(HostRead):
        bool(y.sum() > 3)
    counter = CountSyncs()
    with counter:
        x[x > 1]  # boolean-mask indexing: the result's shape depends on device data
        x[torch.tensor([0, 2])]  # integer indexing: fine
    assert counter.syncs == ["bool_index"]
