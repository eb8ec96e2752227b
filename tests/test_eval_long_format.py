"""The long-context 2-bit format ``kivi-serve-2bit-p256`` (issue 16): 256-token pages with 7D/16
wide K channels, 2.5 bits at head_dim 128 — the byte budget, the page-size guard, and the CPU
serving path (quantize, append, decode) on exactly its layouts (56 wide channels at head_dim 128,
28 at SmolLM2's 64) against the PyTorch reference. The CUDA kernels take pages of 64 or 128 tokens
only, so there is no GPU case for it (the backend refuses page 256 on CUDA with a clear error).
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import build_decode_case, check_append_schedule
from test_kernels_cpu import assert_close_to_truth, page_batch, truth_and_lowp

from kivi_serve.kernels import cpu
from kivi_serve.kernels.cpu import loader
from kivi_serve.quant import page
from kivi_serve.quant.layout import PageLayout
from kivi_serve.quant.schemes import DEFAULT_SCHEMES, SCHEMES, get_scheme

LONG = "kivi-serve-2bit-p256"


def test_layout_is_the_default_format_with_256_token_pages_and_7d16_wide_channels():
    s = get_scheme(LONG)
    assert s.default_page_size == 256
    for D, wide, bits in ((128, 56, 2.5), (64, 28, 2.625), (256, 112, 2.421875)):
        lay = s.layout(D)
        want = PageLayout(D, 256, 2, 2, exact_tokens=1, k_outliers=0, wide_channels=wide)
        assert lay == want
        assert lay.bits_per_element == bits == s.bits_per_element(D)
    # the same budget as the default format at page 128, and no byte more: 60 wide channels would
    # still fit at head_dim 128 (20,476 of 20,480 bytes), 64 would not
    assert get_scheme("kivi-serve-2bit").bits_per_element(128, 128) == 2.5
    assert PageLayout(128, 256, wide_channels=64).bits_per_element > 2.5


@pytest.mark.parametrize("page_size", [64, 128])
def test_other_page_sizes_are_an_error(page_size):
    s = get_scheme(LONG)
    with pytest.raises(ValueError, match="defined for 256-token pages.*--page-size 256"):
        s.layout(64, page_size)
    with pytest.raises(ValueError, match="defined for 256-token pages"):
        s.bits_per_element(128, page_size)


def test_default_evaluations_leave_it_out_and_the_evals_refuse_a_wrong_page_size():
    from kivi_serve.eval import harness, passkey

    assert LONG in SCHEMES and LONG not in DEFAULT_SCHEMES
    with pytest.raises(ValueError, match="defined for 256-token pages"):
        harness.evaluate(schemes=[LONG], page_size=128, windows=1, window_len=16, progress=False)
    with pytest.raises(ValueError, match="defined for 256-token pages"):
        passkey.evaluate(schemes=["fp16", LONG], page_size=128, contexts=[1024], progress=False)


def test_backend_settings_need_256_token_pages_and_cuda_takes_them():
    from kivi_serve.backend.attention import unsupported_reasons
    from kivi_serve.backend.settings import KiviSettings

    with pytest.raises(ValueError, match="defined for 256-token pages"):
        KiviSettings(page_size=128, scheme=LONG)
    assert KiviSettings(scheme=LONG).page_size == 256  # the scheme brings its page size
    assert KiviSettings().page_size == 128
    s = KiviSettings(page_size=256, scheme=LONG)
    assert s.as_config() == {"page_size": 256, "fp_pages": False, "scheme": LONG}
    assert unsupported_reasons(64, torch.float32, "auto", 256, 256, scheme=LONG) == []  # CPU
    on_gpu = unsupported_reasons(64, torch.bfloat16, "auto", 256, 256, scheme=LONG, device_capability=(9, 0))
    assert on_gpu == []
    # head_dim 256: the decode kernel's shared memory needs sm_90 (tests/test_backend_units.py: all the cases)
    (why,) = unsupported_reasons(256, torch.bfloat16, "auto", 256, 256, scheme=LONG, device_capability=(8, 0))
    assert "sm_80" in why and "sm_90" in why


# ----------------------------------------------------------------------------- CPU serving path
LAYOUTS = [(get_scheme(LONG).layout(64), torch.float32), (get_scheme(LONG).layout(128), torch.bfloat16)]
IDS = [f"d{lay.head_dim}h{lay.wide_channels}-{str(dt).removeprefix('torch.')}" for lay, dt in LAYOUTS]


@pytest.fixture(scope="module")
def built():
    if loader.find_compiler() is None:
        pytest.skip("no C++ compiler: the CPU kernels fall back to the reference")
    reason = loader.unavailable_reason()
    assert reason is None, reason


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize(("layout", "dtype"), LAYOUTS, ids=IDS)
def test_cpu_quantize_is_bit_exact(layout, dtype):
    gen = torch.Generator().manual_seed(16)
    k, v, fill, sink = page_batch(layout, dtype, gen, small=True)
    want = page.quantize_pages(k, v, layout, fill=fill, sink=sink)
    got = cpu.quantize_pages(k, v, layout, fill=fill, sink=sink)
    assert torch.equal(got, want)
    assert layout.view(got[3:4], "wide_idx")[0].tolist() == list(range(layout.wide_channels))  # tied page


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize(("layout", "dtype"), LAYOUTS, ids=IDS)
def test_cpu_append_schedule_is_bit_exact(layout, dtype):
    check_append_schedule(layout, dtype, "fitted", torch.device("cpu"), short=True, append_kv=cpu.append_kv)


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize(("layout", "dtype"), LAYOUTS, ids=IDS)
def test_cpu_decode_matches_reference(layout, dtype, monkeypatch):
    monkeypatch.setattr(page, "quantize_pages", cpu.quantize_pages)  # bit-exact (above), and quicker
    P = layout.page_size
    case = build_decode_case(layout, dtype, 3, [1, P - 1, P, P + 1, 2 * P + 5, 4096 + 17], seed=16)
    truth, lowp = truth_and_lowp(case, layout)
    out = cpu.paged_attention(**case, layout=layout)
    assert_close_to_truth(out, truth, lowp, f"{LONG} d{layout.head_dim}")
