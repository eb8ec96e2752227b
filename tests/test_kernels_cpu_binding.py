"""The torch binding of the CPU decode call (``kivi_serve/kernels/cpu/binding.cpp``) and the
thread-balanced work split of ``decode.cpp``.

* the binding (``DecodeBatch.attend`` reading the layer's tensors in C++) gives exactly what the
  Python-filled ctypes call gives, over the backend's forms (row-strided views of a fused qkv
  tensor, int8 and model-dtype staging, mixed batches);
* what the binding does not take — every bad argument, and valid but unusual forms (4-d
  ``kv_pages``, a size-1 dimension with any stride) — it hands back untouched (-1), and ``attend``
  then raises the same named ValueErrors as without it, or runs the unusual form through ctypes;
  changed metadata is the same StaleMetadata;
* without the binding (it cannot be built) the batch runs through ctypes after one RuntimeWarning;
* the work split (all KV heads' pages and tails cut into equal chunks per thread at small batch)
  stays within the reference's bound for any thread count, however the chunks cut the heads.
"""

from __future__ import annotations

import sysconfig
import warnings
from pathlib import Path

import pytest
import torch
from kernel_cases import build_decode_case
from test_kernels_cpu import (
    _bad_layer_args,
    _change_block,
    assert_close_to_truth,
    batch_of,
    cpp_quantizer,  # noqa: F401 — a fixture (pytestmark)
    layer_args,
    truth_and_lowp,
)

from kivi_serve.kernels import cpu
from kivi_serve.kernels.cpu import loader
from kivi_serve.quant.layout import PageLayout

pytestmark = pytest.mark.usefixtures("cpp_quantizer")


@pytest.fixture(scope="module", autouse=True)
def built():
    """The library and the binding; skip without a compiler or Python's headers, fail if they are
    there and the binding cannot be built."""
    if loader.find_compiler() is None:
        pytest.skip("no C++ compiler: the CPU kernels fall back to the reference")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        pytest.skip("no Python headers: the binding cannot be built (the ctypes path runs)")
    assert loader.unavailable_reason() is None
    reason = loader._binding_failure()
    assert reason is None, reason
    return loader.binding()


def fused(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """query, key, value as vLLM hands them over: row-strided views of one fused qkv tensor (at one
    row torch calls them contiguous; their row stride is still the fused row's)."""
    T, D = query.shape[0], query.shape[2]
    qkv = torch.cat([query.reshape(T, -1), key.reshape(T, -1), value.reshape(T, -1)], dim=1)
    widths = [query[0].numel(), key[0].numel(), value[0].numel()]
    return tuple(x.view(T, -1, D) for x in qkv.split(widths, dim=1))


def without_binding(batch: cpu.DecodeBatch) -> cpu.DecodeBatch:
    batch._bind = None  # (the Python-filled ctypes call: what runs where the binding cannot be built)
    return batch


CASES = [  # (layout, dtype, staging, seq_lens, KV heads)
    (PageLayout(64, 128), torch.bfloat16, "int8", [959], 3),  # SmolLM2's bar cell: batch 1 at 1K
    (PageLayout(64, 128), torch.bfloat16, "int8", [300, 77, 400, 1], 3),
    (PageLayout(128, 64, k_outliers=1), torch.float32, "model", [70, 129, 64, 200], 2),
    (PageLayout(128, 64), torch.float16, "model", [5, 260], 2),
]


@pytest.mark.parametrize(("layout", "dtype", "staging_dtype", "lens", "H"), CASES)
def test_binding_equals_the_ctypes_call(layout, dtype, staging_dtype, lens, H, built):
    case = build_decode_case(layout, dtype, 3, lens, H=H, staging_dtype=staging_dtype, seed=len(lens))
    fast, slow = batch_of(case, layout), without_binding(batch_of(case, layout))
    gen = torch.Generator().manual_seed(1)
    for layer in range(3):
        q, k, v = (case[n] if layer == 0 else torch.randn(case[n].shape, generator=gen).to(dtype)
                   for n in ("query", "key", "value"))  # fmt: skip
        views = (q, k, v) if layer == 0 else fused(q, k, v)
        out, want = torch.full_like(q, 7.0), torch.full_like(q, 7.0)
        scale = layout.head_dim**-0.5
        assert built(fast._block, *views, case["kv_pages"], case["staging"], scale, out) == 0  # run by it
        slow.attend(*views, case["kv_pages"], case["staging"], scale, want)
        assert torch.equal(out, want), f"layer {layer}: the binding differs from the ctypes call"
        assert fast.attend(*views, case["kv_pages"], case["staging"], None, out) is out
        assert torch.equal(out, want)
    truth, lowp = truth_and_lowp(case, layout)
    out = fast.attend(*layer_args(case, torch.empty_like(case["query"])))
    assert_close_to_truth(out, truth, lowp, "binding")


def test_binding_hands_back_what_it_does_not_take(built):
    """Every bad layer argument: the binding runs nothing (-1, out untouched) and attend raises the
    ValueError naming it, as without the binding."""
    layout = PageLayout(128, 64)
    case = build_decode_case(layout, torch.bfloat16, 4, [70, 300, 129], seed=3)
    names = ("query", "key", "value", "kv_pages", "staging", "scale", "out")
    bad_cases = [
        *_bad_layer_args(case),
        ("scale", -1.0, "scale must be"),
        ("scale", float("nan"), "scale must be"),
    ]
    for name, bad, match in bad_cases:
        out = torch.full_like(case["query"], 7.0)
        args = {**dict(zip(names, layer_args(case, out))), name: bad}
        fast, slow = batch_of(case, layout), without_binding(batch_of(case, layout))
        assert built(fast._block, *args.values()) == -1, name
        assert (out == 7.0).all()
        for batch in (fast, slow):
            with pytest.raises(ValueError, match=match):
                batch.attend(**args)


def test_binding_refuses_changed_metadata(built):
    layout = PageLayout(64, 128)
    case = build_decode_case(layout, torch.bfloat16, 3, [300, 77, 400], staging_dtype="int8")
    batch = batch_of(case, layout)
    before = batch.attend(*layer_args(case, torch.empty_like(case["query"])))
    _change_block(case["block_tables"])
    out = torch.full_like(case["query"], 7.0)
    assert built(batch._block, *layer_args(case, out)[:5], 0.125, out) == 8  # kivi_cpu.h kStale
    with pytest.raises(cpu.StaleMetadata, match=r"stale decode metadata.*\(sequence 0: block"):
        batch.attend(*layer_args(case, out))
    assert (out == 7.0).all(), "a refused call wrote its output"
    assert not torch.equal(cpu.paged_attention(**case, layout=layout), before)


def test_binding_leaves_unusual_valid_forms_to_the_ctypes_path(built):
    """A 4-d kv_pages, a one-row query whose size-1 dimension has an odd stride, a tensor subclass:
    valid, not the binding's form (-1), run through ctypes with the same result."""
    layout = PageLayout(64, 128)
    case = build_decode_case(layout, torch.bfloat16, 3, [500], H=3, staging_dtype="int8")
    batch = batch_of(case, layout)
    want = batch.attend(*layer_args(case, torch.empty_like(case["query"])))
    pages4 = case["kv_pages"].view(case["kv_pages"].shape[0], 3, layout.page_size, -1)  # vLLM's cache shape
    q = case["query"]  # (1, 9, 64)
    odd = torch.empty(9 * 64, dtype=q.dtype).as_strided(q.shape, (5, 64, 1))  # (a size-1 dimension's
    odd.copy_(q)  # stride is never used: torch calls it contiguous)

    class Sub(torch.Tensor):
        pass

    for name, value in (("kv_pages", pages4), ("query", odd), ("query", q.as_subclass(Sub))):
        args = dict(zip(("query", "key", "value", "kv_pages", "staging", "scale", "out"),
                        layer_args(case, torch.empty_like(q))))  # fmt: skip
        args[name] = value
        out = args["out"]
        assert built(batch._block, *args.values()) == -1, name
        assert batch.attend(**args) is out
        assert torch.equal(out, want), name


def test_without_the_binding_one_warning_and_ctypes(monkeypatch):
    def fail():
        raise loader.BuildError("no Python.h (test)")

    monkeypatch.setattr(loader, "_load_binding", fail)
    for c in (loader._binding_failure, loader._warn_binding):
        c.cache_clear()
    try:
        layout = PageLayout(64, 128)
        case = build_decode_case(layout, torch.bfloat16, 3, [300, 77], H=3, staging_dtype="int8")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = [batch_of(case, layout) for _ in range(2)]
            outs = [b.attend(*layer_args(case, torch.empty_like(case["query"]))) for b in batches]
        mine = [w for w in caught if "torch binding" in str(w.message)]
        assert len(mine) == 1 and issubclass(mine[0].category, RuntimeWarning)
        assert "no Python.h (test)" in str(mine[0].message)
        assert all(b._bind is None for b in batches)
        assert torch.equal(outs[0], cpu.paged_attention(**case, layout=layout)) and torch.equal(*outs)
    finally:
        monkeypatch.undo()
        for c in (loader._binding_failure, loader._warn_binding):
            c.cache_clear()


def test_binding_is_cached_per_torch_and_source(built, monkeypatch):
    cxx = loader.find_compiler()
    path = loader.binding_path(cxx)
    assert path.parent == loader.cache_dir() / "kernels" / "cpu" and path.is_file()
    assert path.name.startswith(loader.BINDING_MODULE + "-")
    monkeypatch.setattr(torch, "__version__", "0.0.0+another")
    assert loader.binding_path(cxx) != path, "a binding built for another torch would be reused"


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize(
    ("lens", "H"),
    [([959], 3), ([70], 3), ([1, 129], 2), ([2000, 3], 4), ([128, 256, 64], 1)],
    ids=["1k-3heads", "tail-only", "empty-and-full", "ragged-4heads", "pages-only"],
)
def test_work_split_within_bound_for_any_thread_count(lens, H, threads):
    """Small batches take the chunked split (chunks cut across KV heads and at any page or tail):
    the result is within the bound for every thread count, and the two paths agree exactly."""
    layout = PageLayout(64, 64)
    case = build_decode_case(layout, torch.bfloat16, 2, lens, H=H, staging_dtype="int8", seed=threads)
    truth, lowp = truth_and_lowp(case, layout)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = batch_of(case, layout).attend(*layer_args(case, torch.empty_like(case["query"])))
        assert_close_to_truth(out, truth, lowp, f"{threads} threads")
        slow = without_binding(batch_of(case, layout)).attend(*layer_args(case, torch.empty_like(out)))
        assert torch.equal(out, slow)
    finally:
        torch.set_num_threads(before)
