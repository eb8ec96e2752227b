"""The reference (the spec): quantization bounds, the exact slots, and paged attention vs fp64."""

import pytest
import torch

from kivi_serve.kernels import reference as R
from kivi_serve.quant import page
from kivi_serve.quant.layout import PageLayout


def _kv(n, P, D, seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, P, D, generator=g)
    k[:, :, 3] *= 8  # an outlier channel, as real keys have
    if outliers:
        k[:, 17 % P, :] += 6  # a strong outlier token
        k[:, 5, 11] = 40.0  # a lone spike in one channel
    v = torch.randn(n, P, D, generator=g)
    return k.to(torch.bfloat16), v.to(torch.bfloat16)


def _max_gap(cb):
    return (cb[:, 1:] - cb[:, :-1]).amax(1)


@pytest.mark.parametrize(
    "layout",
    [
        PageLayout(64),
        PageLayout(128),
        PageLayout(128, k_outliers=1, wide_channels=0),
        PageLayout(128, 64, k_bits=3, k_outliers=1),
        PageLayout(128, 64, k_bits=3, wide_channels=16),
        PageLayout(256, 64, 4, 4, 0, 0),
    ],
)
def test_dequantization_error_bounds(layout):
    n, P, D = 3, layout.page_size, layout.head_dim
    k, v = _kv(n, P, D)
    pages = page.quantize_pages(k, v, layout, sink=torch.tensor([True, False, False]))
    assert pages.shape == (n, layout.page_bytes) and pages.dtype == torch.uint8
    kh, vh = page.dequantize_pages(pages, layout)
    q = page.read_pages(pages, layout)
    kf, vf = k.float(), v.float()
    # every element is within half the widest gap of its codebook (plus fp16 rounding of lo/scale) ...
    k_gap = _max_gap(q.k_cb).unsqueeze(1).expand(n, D)
    if layout.wide_channels:
        k_gap = k_gap.scatter(1, q.wide_idx, _max_gap(q.wide_cb).unsqueeze(1).expand(n, layout.wide_channels))
    k_bound = q.k_scale * (k_gap / 2) + 1e-2 * (1 + kf.abs().amax(1))
    v_bound = q.v_scale * (_max_gap(q.v_cb).unsqueeze(1) / 2) + 1e-2 * (1 + vf.abs().amax(2))
    kerr, verr = (kh - kf).abs(), (vh - vf).abs()
    if layout.exact_tokens:
        rows = torch.arange(n)
        # ... except the exact token, which is exact (bf16 -> fp16 is lossless at these magnitudes)
        assert torch.equal(kh[rows, q.exact_idx], kf[rows, q.exact_idx])
        assert torch.equal(vh[rows, q.exact_idx], vf[rows, q.exact_idx])
        assert q.exact_idx[0] == 0  # the sink on a first page
        assert (q.exact_idx[1:] == 17 % P).all()  # the outlier token elsewhere
        kerr[rows, q.exact_idx] = 0
    if layout.k_outliers:
        assert (q.kout_idx[:, 11] == 5).all()  # the lone spike is the channel's outlier
        assert (kh[:, 5, 11] == 40.0).all()
        kerr.scatter_(1, q.kout_idx.unsqueeze(1), 0.0)
    assert (kerr <= k_bound.unsqueeze(1)).all()
    assert (verr <= v_bound.unsqueeze(2)).all()


def test_outliers_shrink_the_range():
    k, v = _kv(2, 128, 128)
    lo, lp = PageLayout(128, k_outliers=1), PageLayout(128, exact_tokens=0, k_outliers=0)
    with_o = page.read_pages(page.quantize_pages(k, v, lo), lo)
    plain = page.read_pages(page.quantize_pages(k, v, lp), lp)
    assert (with_o.k_scale[:, 11] < plain.k_scale[:, 11] / 3).all()


def test_wide_channels_are_the_widest_and_get_three_bits():
    layout = PageLayout(128)  # 24 wide channels
    g = torch.Generator().manual_seed(3)
    spread = torch.rand(128, generator=g) + 0.1
    spread[[7, 50, 99]] = 20.0  # clearly the widest three
    k = (torch.randn(2, 128, 128, generator=g) * spread).to(torch.bfloat16)
    v = torch.randn(2, 128, 128, generator=g).to(torch.bfloat16)
    pages = page.quantize_pages(k, v, layout)
    q = page.read_pages(pages, layout)
    H = layout.wide_channels
    assert q.wide_idx.shape == (2, H) and (q.wide_idx.diff(dim=1) > 0).all()  # ascending
    for i in range(2):  # exactly the H channels with the largest stored scale
        want = set(torch.sort(q.k_scale[i], descending=True, stable=True).indices[:H].tolist())
        assert set(q.wide_idx[i].tolist()) == want and {7, 50, 99} <= want
    wide = torch.zeros(2, 128, dtype=torch.bool).scatter(1, q.wide_idx, True)
    assert q.wide_cb.shape == (2, 8) and (q.wide_cb[:, 0] == 0).all() and (q.wide_cb[:, -1] == 1).all()
    assert (q.k_codes.masked_fill(wide.unsqueeze(1), 0) < 4).all()  # the others stay 2-bit
    assert (q.k_codes.masked_fill(~wide.unsqueeze(1), 0) >= 4).any()  # the top bit is used
    # a wide channel's error is far below what 2 bits give the same channel
    two = PageLayout(128, wide_channels=0)
    kh3, _ = page.dequantize_pages(pages, layout)
    kh2, _ = page.dequantize_pages(page.quantize_pages(k, v, two), two)
    err = lambda kh: (kh - k.float())[:, :, [7, 50, 99]].pow(2).mean()  # noqa: E731
    assert err(kh3) < 0.5 * err(kh2)


def test_early_finalisation_uses_only_present_tokens():
    layout = PageLayout(64, 64)
    k, v = _kv(1, 64, 64, outliers=False)
    garbage_k, garbage_v = k.clone(), v.clone()
    garbage_k[:, 10:] = 1e4
    garbage_v[:, 10:] = -1e4
    a = page.quantize_pages(k, v, layout, fill=torch.tensor([10]))
    b = page.quantize_pages(garbage_k, garbage_v, layout, fill=torch.tensor([10]))
    assert torch.equal(a, b)
    kh, _ = page.dequantize_pages(a, layout)
    assert (kh[0, :10] - k[0, :10].float()).abs().max() < 3


def test_quantize_is_deterministic_and_uniform_mode_differs():
    layout = PageLayout(128)
    k, v = _kv(2, 128, 128, seed=5)
    a = page.quantize_pages(k, v, layout)
    assert torch.equal(a, page.quantize_pages(k, v, layout))
    u = page.read_pages(page.quantize_pages(k, v, layout, codebook="uniform"), layout)
    assert u.k_cb[0].tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1], abs=2e-4)


@pytest.mark.parametrize(
    "call, arg",
    [
        (
            lambda L: page.quantize_pages(
                torch.zeros(1, 128, 64, dtype=torch.int32), torch.zeros(1, 128, 64), L
            ),
            "k must be a floating",
        ),
        (lambda L: page.quantize_pages(torch.zeros(1, 128, 128), torch.zeros(1, 128, 128), L), "head_dim"),
        (lambda L: page.quantize_pages(torch.zeros(1, 64, 64), torch.zeros(1, 64, 64), L), "page size"),
        (lambda L: page.quantize_pages(torch.zeros(128, 64), torch.zeros(128, 64), L), "k must have 3 dims"),
        (
            lambda L: page.quantize_pages(torch.zeros(1, 128, 64), torch.zeros(2, 128, 64), L),
            "v must have the shape",
        ),
        (
            lambda L: page.quantize_pages(
                torch.zeros(1, 128, 64), torch.zeros(1, 128, 64), L, fill=torch.tensor([0])
            ),
            "fill",
        ),
        (lambda L: page.dequantize_pages(torch.zeros(1, L.page_bytes), L), "uint8"),
        (lambda L: page.dequantize_pages(torch.zeros(1, 10, dtype=torch.uint8), L), "page_bytes"),
    ],
)
def test_bad_input_names_the_argument(call, arg):
    with pytest.raises(ValueError, match=arg):
        call(PageLayout(64))


# ----------------------------------------------------------------------------- paged attention
def _fp64_attention(q, k, v, scale, n_ctx):
    """q (T, Hq, D), k/v (S, Hkv, D), causal with T queries at positions n_ctx.. ; fp64."""
    T, Hq, D = q.shape
    G = Hq // k.shape[1]
    kk = k.double().repeat_interleave(G, 1)
    vv = v.double().repeat_interleave(G, 1)
    s = torch.einsum("thd,shd->hts", q.double(), kk) * scale
    pos = n_ctx + torch.arange(T)
    s = s.masked_fill(torch.arange(k.shape[0]).unsqueeze(0) > pos.unsqueeze(1), -torch.inf)
    return torch.einsum("hts,shd->thd", torch.softmax(s, -1), vv)


@pytest.mark.parametrize("D, P, Hq, Hkv", [(64, 64, 9, 3), (128, 128, 32, 8), (128, 64, 8, 8)])
def test_paged_attention_equals_fp64_over_dequantized(D, P, Hq, Hkv):
    """Ragged batch: decode rows, a prefill chunk, mid-page tails, an early-finalised tail;
    physical blocks permuted at random, block 0 is the null block and holds garbage."""
    g = torch.Generator().manual_seed(D + P + Hq)
    layout = PageLayout(D, P)
    NB = 24
    pages = torch.randint(
        0, 256, (NB, Hkv, layout.page_bytes), dtype=torch.uint8, generator=g
    )  # garbage everywhere
    staging = torch.randn(4, 2, Hkv, P, D, generator=g).to(torch.bfloat16)
    perm = (torch.randperm(NB - 1, generator=g) + 1).tolist()  # never block 0
    # (seq_len, new tokens, tail in staging?)
    seqs = [
        (3 * P + 5, 1, True),
        (2 * P, 1, False),
        (P + 7, 7 + P // 2, True),
        (2 * P + 9, 1, False),
        (5, 5, True),
    ]
    B = len(seqs)
    max_pages = 4
    tables = torch.zeros(B, max_pages, dtype=torch.int32)
    truth_k, truth_v, tails = [], [], []
    slot = 0
    for b, (L_, n_new, staged) in enumerate(seqs):
        n_pages = -(-L_ // P)
        blocks = [perm.pop() for _ in range(n_pages)]
        tables[b, :n_pages] = torch.tensor(blocks)
        k = torch.randn(n_pages * P, Hkv, D, generator=g).to(torch.bfloat16)
        v = torch.randn(n_pages * P, Hkv, D, generator=g).to(torch.bfloat16)
        full = L_ // P
        for i in range(n_pages):
            fill = P if i < full else L_ - i * P
            kp = k[i * P : (i + 1) * P].transpose(0, 1)
            vp = v[i * P : (i + 1) * P].transpose(0, 1)
            if i < full or not staged:
                pages[blocks[i]] = page.quantize_pages(
                    kp, vp, layout, fill=torch.full((Hkv,), fill), sink=torch.full((Hkv,), i == 0)
                )
        dk, dv = [], []
        for i in range(n_pages):
            if i < full or not staged:
                kh, vh = page.dequantize_pages(pages[blocks[i]], layout)
                dk.append(kh.transpose(0, 1)), dv.append(vh.transpose(0, 1))
            else:
                staging[slot, 0] = k[i * P : (i + 1) * P].transpose(0, 1)
                staging[slot, 1] = v[i * P : (i + 1) * P].transpose(0, 1)
                dk.append(k[i * P : (i + 1) * P].float()), dv.append(v[i * P : (i + 1) * P].float())
        tails.append(slot if (staged and L_ % P) else -1)
        slot += staged and L_ % P > 0
        ck, cv = torch.cat(dk)[:L_], torch.cat(dv)[:L_]
        # the new tokens are attended exactly, from the inputs
        ck[L_ - n_new :] = k[L_ - n_new : L_].float()
        cv[L_ - n_new :] = v[L_ - n_new : L_].float()
        truth_k.append((ck, k[L_ - n_new : L_])), truth_v.append((cv, v[L_ - n_new : L_]))
    qlens = [s[1] for s in seqs]
    qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist())
    query = torch.randn(int(qsl[-1]), Hq, D, generator=g).to(torch.bfloat16)
    key = torch.cat([t[1] for t in truth_k])
    value = torch.cat([t[1] for t in truth_v])
    rest = (staging, tables, torch.tensor([s[0] for s in seqs]), qsl, torch.tensor(tails), layout)
    out = R.paged_attention(query, key, value, pages, *rest)
    assert out.dtype == torch.bfloat16 and out.shape == query.shape
    scale = D**-0.5
    for b, (L_, n_new, _) in enumerate(seqs):
        ref = _fp64_attention(query[qsl[b] : qsl[b + 1]], truth_k[b][0], truth_v[b][0], scale, L_ - n_new)
        # bf16 output rounding is the only expected difference (fp32 math vs fp64)
        torch.testing.assert_close(out[qsl[b] : qsl[b + 1]].double(), ref, atol=1e-2, rtol=1e-2)
    # 4-d [blocks, heads, P, C] view (what vLLM hands the backend) gives the same answer
    out4 = R.paged_attention(query, key, value, pages.view(NB, Hkv, P, layout.slot_bytes), *rest)
    assert torch.equal(out4, out)


def test_paged_attention_bad_input():
    L = PageLayout(64, 64)
    q = torch.zeros(1, 4, 64)
    kv = torch.zeros(1, 2, 64)
    pages = torch.zeros(2, 2, L.page_bytes, dtype=torch.uint8)
    st = torch.zeros(1, 2, 2, 64, 64)
    args = dict(
        block_tables=torch.zeros(1, 1, dtype=torch.int32),
        seq_lens=torch.tensor([1]),
        query_start_loc=torch.tensor([0, 1]),
        tail_slots=torch.tensor([0]),
        codec=L,
    )
    with pytest.raises(ValueError, match="query heads"):
        R.paged_attention(torch.zeros(1, 3, 64), kv, kv, pages, st, **args)
    with pytest.raises(ValueError, match="head_dim"):
        R.paged_attention(
            torch.zeros(1, 4, 128), torch.zeros(1, 2, 128), torch.zeros(1, 2, 128), pages, st, **args
        )
    with pytest.raises(ValueError, match="kv_pages must be uint8"):
        R.paged_attention(q, kv, kv, pages.float(), st, **args)
    with pytest.raises(ValueError, match="staging"):
        R.paged_attention(q, kv, kv, pages, torch.zeros(1, 2, 2, 32, 64), **args)


def test_caller_chosen_exact_token_overrides_the_rule():
    layout = PageLayout(64)
    k, v = _kv(2, 128, 64, seed=9)
    pages = page.quantize_pages(
        k, v, layout, sink=torch.tensor([True, False]), exact_idx=torch.tensor([42, 7])
    )
    q = page.read_pages(pages, layout)
    assert q.exact_idx.tolist() == [42, 7]
    kh, vh = page.dequantize_pages(pages, layout)
    assert torch.equal(kh[1, 7], k[1, 7].float()) and torch.equal(vh[0, 42], v[0, 42].float())
    with pytest.raises(ValueError, match="exact_idx"):
        page.quantize_pages(k, v, layout, fill=torch.tensor([10, 10]), exact_idx=torch.tensor([3, 10]))


# --------------------------------------------------------------------------- value rotation, free V ends
#: sha256[:16] of quantize_pages' bytes for every servable scheme on integer-hashed inputs (no RNG), computed
#: with main at c0bcc9a, before the value-side options existed: those options must not move a byte.
BYTES_BEFORE_VALUE_OPTIONS = {
    "kivi2-uniform/64/64": "9ec331d4139f73d3",
    "kivi2-uniform/64/128": "00fd0f078369f1c4",
    "kivi2-uniform/64/256": "2b3c8a7e92d56e15",
    "kivi2-uniform/128/64": "39427ff2cc1c1305",
    "kivi2-uniform/128/128": "0a81032538702651",
    "kivi2-uniform/128/256": "d719504aac773988",
    "kivi-serve-2bit/64/64": "a3abcb83968cf799",
    "kivi-serve-2bit/64/128": "8b3aa2c58c974710",
    "kivi-serve-2bit/64/256": "ff4f161ce10e0071",
    "kivi-serve-2bit/128/64": "25bebd70d66d69c1",
    "kivi-serve-2bit/128/128": "0b99e924fed4a255",
    "kivi-serve-2bit/128/256": "353e0844ed5c3276",
    "kivi-serve-3bit/64/64": "2dc4ed881f9a2500",
    "kivi-serve-3bit/64/128": "66b24b4a53315102",
    "kivi-serve-3bit/64/256": "fe74466f8fa50c0d",
    "kivi-serve-3bit/128/64": "6a1f201aeea304ba",
    "kivi-serve-3bit/128/128": "5b4f2ec8c1ebd856",
    "kivi-serve-3bit/128/256": "57bf9dd4a2d62b97",
    "kivi-serve-4bit/64/64": "59042956afa82629",
    "kivi-serve-4bit/64/128": "12b1b6da4b89c074",
    "kivi-serve-4bit/64/256": "b3cc684e6deb612e",
    "kivi-serve-4bit/128/64": "49935ebef1155ec1",
    "kivi-serve-4bit/128/128": "8e24567bf3bf8a32",
    "kivi-serve-4bit/128/256": "8f9e932b52154397",
    "kivi-serve-2bit-p256/64/256": "5230c57d6e7cbfa3",
    "kivi-serve-2bit-p256/128/256": "53d4ddc58fd51e8a",
}
#: The same for ``kivi-serve-2bit-p256-vr``, computed when the CPU kernels began serving it (branch vrcpu
#: off main 4a0fe42): its bytes are now a stored format too.
BYTES_OF_ROTATED_VALUES = {
    "kivi-serve-2bit-p256-vr/64/256": "352730bb472f2cad",
    "kivi-serve-2bit-p256-vr/128/256": "82c7ff266c1bb9ce",
}


def _hashed_kv(n, P, D, salt):
    """Deterministic K or V without an RNG: a multiplicative hash of the element index, channels of
    different ranges."""
    i = torch.arange(n * P * D, dtype=torch.int64)
    x = (((i + salt) * 2654435761) % 4294967296 % 65521).double() / 65521.0 - 0.5
    return (x.reshape(n, P, D) * (torch.arange(D) % 7 + 1).double() * 4).float()


def _golden_cases():
    from kivi_serve.quant.schemes import SCHEMES

    for name, s in SCHEMES.items():
        if s.quantized:
            for D in (64, 128):
                for P in (256,) if s.page_size else (64, 128, 256):
                    yield name, s, D, P


@pytest.mark.parametrize("name, scheme, D, P", list(_golden_cases()))
def test_servable_schemes_bytes_did_not_change(name, scheme, D, P):
    import hashlib

    k, v = _hashed_kv(3, P, D, 1), _hashed_kv(3, P, D, 2)
    v[:, 5, 3] = 40.0  # a value outlier
    pages = page.quantize_pages(k, v, scheme.layout(D, P), fill=torch.tensor([P, P // 2 + 3, 1]),
                                sink=torch.tensor([True, False, False]), codebook=scheme.codebook)
    digest = hashlib.sha256(pages.numpy().tobytes()).hexdigest()[:16]
    assert digest == {**BYTES_BEFORE_VALUE_OPTIONS, **BYTES_OF_ROTATED_VALUES}[f"{name}/{D}/{P}"]


def _sylvester(D):
    """The Sylvester-Hadamard matrix in fp64, by Kronecker products (independent of the butterfly)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < D:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h


@pytest.mark.parametrize("D", [64, 128, 256])
def test_value_rotation_is_the_signed_hadamard(D):
    """``rotate_values`` is ``v @ diag(s) H / sqrt(D)`` (fp64 matrix, Kronecker-built), orthonormal, and
    its inverse undoes it; the butterfly with small integers is exact."""
    x = torch.arange(3 * D, dtype=torch.float32).reshape(3, D) % 13 - 6
    assert torch.equal(page.hadamard(x).double(), x.double() @ _sylvester(D))
    R = torch.diag(page.value_signs(D).double()) @ _sylvester(D) / D**0.5
    torch.testing.assert_close(R @ R.T, torch.eye(D, dtype=torch.float64), atol=1e-12, rtol=0)
    assert set(page.value_signs(D).tolist()) == {-1.0, 1.0}
    v = _hashed_kv(2, 8, D, 5)
    torch.testing.assert_close(page.rotate_values(v).double(), v.double() @ R, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(page.rotate_values(v, inverse=True).double(), v.double() @ R.T, atol=1e-5,
                               rtol=1e-6)
    torch.testing.assert_close(page.rotate_values(page.rotate_values(v), inverse=True), v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("D", [64, 128])
def test_rotated_free_end_pages_round_trip_against_fp64(D):
    """``kivi-serve-2bit-p256-vr``: same bytes per page as p256 and the same K sections; its values read
    back as ``(lo + scale * cb[code]) @ R.T`` computed independently in fp64, each rotated value within
    half a codebook gap of the truth, the exact token exact; the V codebooks' ends are fitted."""
    from kivi_serve.quant.schemes import SCHEMES, get_scheme

    vr, p256 = get_scheme("kivi-serve-2bit-p256-vr").layout(D), SCHEMES["kivi-serve-2bit-p256"].layout(D)
    assert (vr.page_bytes, vr.bits_per_element) == (p256.page_bytes, p256.bits_per_element)
    assert vr.bits_per_element == (2.5 if D == 128 else 2.625)
    assert {s.name: (s.offset, s.nbytes) for s in vr.sections.values()} == {
        s.name: (s.offset, s.nbytes) for s in p256.sections.values()}
    k, v = _kv(4, 256, D, seed=3)
    fill, sink = torch.tensor([256, 256, 200, 256]), torch.tensor([True, False, False, False])
    a = page.quantize_pages(k, v, vr, fill=fill, sink=sink)
    b = page.quantize_pages(k, v, p256, fill=fill, sink=sink)
    for name in ("k_plane0", "k_lo", "k_scale", "k_cb", "wide_plane", "wide_cb", "wide_idx", "exact_k",
                 "exact_idx"):
        assert torch.equal(vr.raw(a, name), p256.raw(b, name)), name
    q = page.read_pages(a, vr)
    lv = torch.gather(q.v_cb.double().unsqueeze(1).expand(-1, 256, -1), 2, q.v_codes)
    rot = q.v_lo.double().unsqueeze(-1) + q.v_scale.double().unsqueeze(-1) * lv
    R = torch.diag(page.value_signs(D).double()) @ _sylvester(D) / D**0.5
    want = rot @ R.T
    rows = torch.arange(4)
    want[rows, q.exact_idx] = v.double()[rows, q.exact_idx].half().double()
    _, got = page.dequantize_pages(a, vr)
    valid = (torch.arange(256).unsqueeze(0) < fill.unsqueeze(1)).unsqueeze(-1)
    torch.testing.assert_close(torch.where(valid, got.double(), 0), torch.where(valid, want, 0), atol=2e-5,
                               rtol=1e-5)
    truth = v.double() @ R  # rotated, fp64
    cbd = q.v_cb.double()  # free ends: an element may lie between 0 and the first level, or past the last
    reach = torch.maximum(_max_gap(cbd) / 2, torch.maximum(cbd[:, 0], 1 - cbd[:, -1]))
    bound = q.v_scale.double().unsqueeze(-1) * reach.view(-1, 1, 1) + 1e-2
    err = (rot - truth).abs()
    keep = valid & (torch.arange(256).view(1, -1, 1) != q.exact_idx.view(-1, 1, 1))
    assert (err <= bound)[keep.expand_as(err)].all()
    cb = q.v_cb
    assert ((cb[:, 0] > 0) | (cb[:, -1] < 1)).all()  # the ends moved: fitted, not pinned
    assert (cb[:, 1:] >= cb[:, :-1]).all()


def test_free_ends_fit_is_never_worse_than_uniform_and_pinned_is_unchanged():
    from kivi_serve.quant import codebook as C

    g = torch.Generator().manual_seed(0)
    u = (torch.randn(6, 4096, generator=g) * 0.12 + 0.5).clamp(0, 1)  # bell-shaped: ends rarely used
    mask = torch.ones_like(u, dtype=torch.bool)
    pinned, free = C.fit_codebooks(u, mask, 2), C.fit_codebooks(u, mask, 2, pin_ends=False)
    assert (pinned[:, 0] == 0).all() and (pinned[:, -1] == 1).all()
    assert (free[:, 0] > 0).all() and (free[:, -1] < 1).all()
    uq = torch.round(u * C.FIXED_POINT).long()
    w = torch.ones_like(uq)
    uniform = C.uniform_levels(2).expand(6, 4)
    assert (C._distortion(uq, w, free.float()) <= C._distortion(uq, w, uniform)).all()
    assert (C._distortion(uq, w, free.float()) < C._distortion(uq, w, pinned.float())).all()


def test_value_options_reach_the_kernels_and_both_backends():
    """The CPU kernels serve rotated values and free V ends: ``params`` (their layout struct's head)
    carries both flags, and the scheme is servable (at its 256-token pages) on CPU and, like
    kivi-serve-2bit-p256, on a GPU — except at head_dim 256, where the CUDA quantizer cannot hold the
    rotated page (tests/test_backend_units.py checks every GPU refusal)."""
    from kivi_serve.backend.attention import unsupported_reasons
    from kivi_serve.backend.settings import KiviSettings
    from kivi_serve.quant.schemes import REFERENCE_SCHEMES, SCHEMES, get_scheme

    assert PageLayout(128, 256).params[-2:] == (0, 1)
    assert PageLayout(128, 256, v_rotate=True).params[-2:] == (1, 1)
    assert PageLayout(128, 256, v_pin_ends=False).params[-2:] == (0, 0)
    for kw in ({"v_rotate": True}, {"v_pin_ends": False}):
        assert set(kw) <= set(PageLayout(128, 256, **kw).describe())
    assert "v_rotate" not in PageLayout(128).describe() and PageLayout(128).params[0] == 128
    with pytest.raises(ValueError, match="v_rotate must be a bool"):
        PageLayout(128, v_rotate=1)
    name = "kivi-serve-2bit-p256-vr"
    assert name in SCHEMES and name not in REFERENCE_SCHEMES
    assert get_scheme(name).layout(64).v_rotate and not get_scheme(name).layout(64).v_pin_ends
    assert KiviSettings(page_size=256, scheme=name).scheme == name
    with pytest.raises(ValueError, match="256-token pages"):
        KiviSettings(page_size=128, scheme=name)
    assert unsupported_reasons(64, torch.float32, "auto", 256, 256, scheme=name) == []  # CPU
    on_gpu = unsupported_reasons(64, torch.bfloat16, "auto", 256, 256, scheme=name, device_capability=(9, 0))
    p256 = unsupported_reasons(64, torch.bfloat16, "auto", 256, 256, scheme="kivi-serve-2bit-p256",
                               device_capability=(9, 0))  # fmt: skip
    assert on_gpu == p256 == []
    (why,) = unsupported_reasons(256, torch.bfloat16, "auto", 256, 256, scheme=name, device_capability=(9, 0))
    assert "rotated values at head_dim 256 x page 256" in why and "run it on CPU" in why
