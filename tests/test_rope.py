"""Keys quantized before RoPE (issue 16, eighth session): the rotation, its inverse against the model's
own, and the pre-RoPE schemes in the reference and the harness."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from kivi_serve.eval import harness as H
from kivi_serve.quant.rope import Rope, page_positions, rotate
from kivi_serve.quant.schemes import REFERENCE_SCHEMES, SCHEMES, get_scheme

D = 64
ROPE = Rope.from_inv_freq(100000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D))
PRE = tuple(name for name, s in REFERENCE_SCHEMES.items() if s.k_pre_rope)


def complex_rope(x: torch.Tensor, positions: torch.Tensor, freq: tuple[float, ...]) -> torch.Tensor:
    """Independent fp64 reference: pair (d, d + D/2) as the complex number x_d + i x_{d+D/2}, times
    exp(i * position * freq[d])."""
    h = x.shape[-1] // 2
    z = torch.complex(x[..., :h].double(), x[..., h:].double())
    angle = positions.double().unsqueeze(-1) * torch.tensor(freq, dtype=torch.float64)
    w = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([w.real, w.imag], -1)


def test_rotate_is_the_complex_rotation_and_inverts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, D, generator=g)
    pos = torch.randint(0, 8192, (3, 40), generator=g)
    y = rotate(x, pos, ROPE)
    torch.testing.assert_close(y.double(), complex_rope(x, pos, ROPE.inv_freq), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(rotate(y, pos, ROPE, inverse=True), x, atol=1e-5, rtol=1e-5)
    # position 0 is the identity; the norm of every pair is kept
    torch.testing.assert_close(rotate(x, torch.zeros_like(pos), ROPE), x, atol=0, rtol=0)
    pair = lambda t: t[..., : D // 2] ** 2 + t[..., D // 2 :] ** 2  # noqa: E731
    torch.testing.assert_close(pair(y), pair(x), atol=1e-4, rtol=1e-5)


def test_rotate_checks_its_input():
    x = torch.zeros(2, 8, D)
    with pytest.raises(ValueError, match="head_dim"):
        rotate(torch.zeros(2, 8, 32), torch.zeros(2, 8, dtype=torch.long), ROPE)
    with pytest.raises(ValueError, match="integers"):
        rotate(x, torch.zeros(2, 8), ROPE)


def test_page_positions():
    assert page_positions(torch.tensor([0, 2]), 4).tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]


def test_rope_from_model_refuses_what_it_cannot_invert():
    class Rot(torch.nn.Module):
        def __init__(self, scaling=1.0, kind="default"):
            super().__init__()
            self.register_buffer("inv_freq", ROPE_FREQ)
            self.attention_scaling, self.rope_type = scaling, kind

    ROPE_FREQ = torch.tensor(ROPE.inv_freq, dtype=torch.float64)
    one = torch.nn.Module()
    one.rotary_emb = Rot()
    assert Rope.from_model(one) == ROPE
    two = torch.nn.Module()
    two.rotary_emb, two.rotary_emb_local = Rot(), Rot()
    with pytest.raises(ValueError, match="2 rotary embedding"):
        Rope.from_model(two)
    yarn = torch.nn.Module()
    yarn.rotary_emb = Rot(scaling=1.2)
    with pytest.raises(ValueError, match="attention_scaling"):
        Rope.from_model(yarn)
    dyn = torch.nn.Module()
    dyn.rotary_emb = Rot(kind="dynamic")
    with pytest.raises(ValueError, match="dynamic"):
        Rope.from_model(dyn)


@pytest.mark.parametrize("name", PRE)
def test_pre_rope_schemes_are_reference_only_and_keep_the_bytes(name):
    s = get_scheme(name)
    assert name not in SCHEMES and s.k_pre_rope
    base = replace(s, k_pre_rope=False)
    assert s.layout(128) == base.layout(128)  # same page, same bits
    assert s.bits_per_element(128) == base.bits_per_element(128) == 2.5
    served = SCHEMES["kivi-serve-2bit-p256" if s.default_page_size == 256 else "kivi-serve-2bit"]
    assert s.layout(128).page_bytes == served.layout(128).page_bytes


def rotated_channel_keys(n_pages: int, P: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys whose pre-RoPE values are a fixed vector per head (a few large channels) plus small noise,
    rotated to their positions: post-RoPE every fast pair sweeps its whole circle within a page.
    → (k post-RoPE (n, P, D), positions (n, P))."""
    base = torch.randn(D, generator=g) * 0.3
    base[[3, 3 + D // 2, 10, 10 + D // 2]] = torch.tensor([4.0, -3.0, 5.0, 2.0])
    pre = base + 0.05 * torch.randn(n_pages, P, D, generator=g)
    pos = page_positions(torch.arange(n_pages), P)
    return rotate(pre, pos, ROPE), pos


@pytest.mark.parametrize("name", PRE)
def test_pre_rope_roundtrip_reads_the_keys_back_rotated_and_finer(name):
    """The scheme quantizes the un-rotated keys and returns them rotated back: exactly the base format
    applied to the pre-RoPE keys (the values too: the exact-token slot is chosen on the keys). On keys
    whose pre-RoPE channels are nearly constant, the key error is far below the post-RoPE format's."""
    s = get_scheme(name)
    base = replace(s, k_pre_rope=False)
    P = s.default_page_size
    g = torch.Generator().manual_seed(1)
    k, pos = rotated_channel_keys(3, P, g)
    v = torch.randn(3, P, D, generator=g)
    sink = torch.tensor([True, False, False])
    kq, vq = s.roundtrip(k, v, P, sink, positions=pos, rope=ROPE)
    kb, _ = base.roundtrip(k, v, P, sink)
    err, err_post = (kq - k).pow(2).mean().item(), (kb - k).pow(2).mean().item()
    assert err < 0.2 * err_post, (err, err_post)
    kp, vp = base.roundtrip(rotate(k, pos, ROPE, inverse=True), v, P, sink)
    torch.testing.assert_close(kq, rotate(kp, pos, ROPE), atol=0, rtol=0)
    torch.testing.assert_close(vq, vp, atol=0, rtol=0)
    with pytest.raises(ValueError, match="positions"):
        s.roundtrip(k, v, P, sink)


def test_harness_pages_use_the_window_positions():
    """page_roundtrip places token t at position t: keys that are constant before RoPE come back exact
    to fp16 rounding (zero per-channel range) through a pre-RoPE scheme, not through the base format."""
    s = get_scheme("kivi-serve-2bit-pr")
    P, T = 128, 3 * 128 + 17
    g = torch.Generator().manual_seed(2)
    const = torch.randn(2, 1, D, generator=g) * 2  # (Hkv, 1, D)
    key = rotate(const.expand(2, T, D), torch.arange(T).expand(2, T), ROPE).unsqueeze(0)  # (1, 2, T, D)
    value = torch.randn(1, 2, T, D, generator=g)
    kq, _ = H.page_roundtrip(s, key, value, P, ROPE)
    assert (kq - key).abs().max() < 2e-3 * const.abs().max()
    kb, _ = H.page_roundtrip(SCHEMES["kivi-serve-2bit"], key, value, P)
    assert (kb - key).abs().max() > 0.1


@pytest.fixture(scope="module")
def lm():
    return H.load_model("smollm2", "cpu")


def test_rope_from_model_undoes_the_models_rotation(lm):
    """The harness's post-RoPE keys, un-rotated with the model's :class:`Rope` at positions 0..T-1, are
    the layer's ``k_proj`` output (the model's pre-RoPE keys), captured by a hook. (transformers computes
    its angles in fp32, ours are fp64 products of the same fp32 frequencies: ~3e-5 rad apart at
    position 300, hence the tolerance.)"""
    cfg = lm.model.config
    rope = Rope.from_model(lm.model)
    assert rope.head_dim == lm.head_dim
    _, text = H.read_corpus("hamlet")
    ids = H.make_windows(lm.tokenizer, text, 1, 300)
    layer = 5
    got = {}
    attn = lm.model.model.layers[layer].self_attn
    hook = attn.k_proj.register_forward_hook(lambda m, i, o: got.__setitem__("pre", o.detach()))

    def observe(d):
        if d["layer"] == layer:
            got["post"] = d["key"].detach()

    try:
        H.run_logits(lm, ids, SCHEMES["fp16"], 128, observer=observe)
    finally:
        hook.remove()
    T = ids.shape[1]
    pre = got["pre"].view(1, T, cfg.num_key_value_heads, lm.head_dim).transpose(1, 2)  # (1, Hkv, T, D)
    back = rotate(got["post"], torch.arange(T), rope, inverse=True)
    scale = pre.abs().max().item()
    torch.testing.assert_close(back, pre.float(), atol=2e-4 * max(scale, 1.0), rtol=1e-4)
    theta = cfg.rope_parameters["rope_theta"]
    assert math.isclose(rope.inv_freq[1], theta ** (-2 / lm.head_dim), rel_tol=1e-6)


def test_pre_rope_scheme_in_the_harness_beats_its_base_on_key_error(lm):
    """Through the real model (harness, one 512-token window): the pre-RoPE format's keys, as every
    layer's queries read them, are closer to the exact keys than the base format's."""
    _, text = H.read_corpus("hamlet")
    ids = H.make_windows(lm.tokenizer, text, 1, 512)
    errs = {}
    for name in ("kivi-serve-2bit", "kivi-serve-2bit-pr"):
        tot = []

        def observe(d, tot=tot):
            full = d["mask"] is not None
            if full:
                span = d["key"].shape[2] // 128 * 128
                tot.append(((d["k_deq"] - d["key"]) ** 2)[:, :, :span].sum().item())

        H.run_logits(lm, ids, get_scheme(name), 128, observer=observe)
        errs[name] = sum(tot)
    assert errs["kivi-serve-2bit-pr"] < 0.8 * errs["kivi-serve-2bit"], errs
