"""8-bit blockwise quantisation and stochastic rounding against their element-by-element
definitions (fastsae.quantize)."""

import pytest
import torch

from fastsae.quantize import (
    block_layout,
    dequantize_rows,
    dynamic_code,
    quantize_rows,
    quantize_rows_reference,
    round_stochastic,
    round_stochastic_reference,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_codes_are_sorted_distinct_and_span_the_unit_range():
    for signed, size in ((True, 255), (False, 256)):
        code, mids = dynamic_code(signed)
        assert code.numel() == size and mids.numel() == size - 1
        assert bool((code[1:] > code[:-1]).all())
        assert float(code.max()) == 1.0 and float(code.min()) == (-1.0 if signed else 0.0)
        assert (code == 0).sum() == 1
        assert float(code[code > 0].min()) < 2e-6  # down to ~1e-6 (signed) / 1e-7 (unsigned) of the block max


@pytest.mark.parametrize("shape,block", [((1, 1), 256), ((3, 7), 4), ((5, 256), 256), ((4, 300), 256),
                                         ((2, 257), 256), ((0, 8), 4), ((6, 33), 16)])
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_matches_the_reference(shape, block, signed):
    g = torch.Generator().manual_seed(sum(shape) + block)
    x = torch.randn(*shape, generator=g) * torch.logspace(-6, 0, shape[1])  # many decades within a row
    if not signed:
        x = x.pow(2)
    if shape[0] > 2:
        x[1] = 0.0  # an all-zero row: scale 0, decodes to 0
    x0 = x.clone()
    codes, scales = quantize_rows(x, signed, block)
    want_codes, want_scales = quantize_rows_reference(x, signed, block)
    assert torch.equal(x, x0)
    assert codes.dtype == torch.uint8 and codes.shape == shape
    assert scales.shape == (shape[0], block_layout(shape[1], block)[0])
    assert torch.equal(scales, want_scales)
    code, _ = dynamic_code(signed)
    # equal codes, except where x sits on a midpoint within fp32 rounding (either neighbour is nearest)
    differ = codes != want_codes
    if differ.any():
        a, b = code[codes[differ].long()], code[want_codes[differ].long()]
        nb, bs = block_layout(shape[1], block)
        s = scales.repeat_interleave(bs, 1)[:, :shape[1]][differ]
        y = x[differ] / s
        torch.testing.assert_close((y - a).abs(), (y - b).abs(), rtol=0, atol=1e-6)
    back = dequantize_rows(codes, scales, signed)
    assert back.shape == shape
    if shape[0]:
        assert float(back[1].abs().max() if shape[0] > 2 else 0) == 0.0


def test_quantize_error_is_bounded_per_decade():
    """A value in the i-th decade below its block's maximum lands within half a level spacing:
    relative error <= 4.5 / n_i (n_i = 128, 64, ... levels for the unsigned code), and a
    positive value below the code's range decodes to the smallest level, never to 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 256, generator=g) * torch.logspace(-9, 0, 256)
    x[:, -1] = 1.0  # every block's maximum is 1
    back = dequantize_rows(*quantize_rows(x, signed=False), signed=False)
    rel = (back - x).abs() / x
    for i in range(7):
        inside = (x > 10.0 ** -(i + 1)) & (x <= 10.0 ** -i)
        assert float(rel[inside].max()) <= 4.5 / (128 >> i) * 1.001, i
    assert bool((back > 0).all())
    signed = dequantize_rows(*quantize_rows(x - 0.5, signed=True), signed=True)
    top = (x - 0.5).abs() > 0.05  # the signed code's top decade: 64 levels
    assert float(((signed - (x - 0.5)).abs() / (x - 0.5).abs())[top].max()) <= 4.5 / 64 * 1.001


def test_quantize_rows_is_row_local():
    """Requantising some rows leaves other rows' bytes alone (blocks never straddle rows)."""
    x = torch.randn(4, 300)
    codes, scales = quantize_rows(x, True)
    x2 = x.clone()
    x2[2] *= 10
    codes2, scales2 = quantize_rows(x2[2:3], True)
    full2, fscales2 = quantize_rows(x2, True)
    assert torch.equal(full2[[0, 1, 3]], codes[[0, 1, 3]]) and torch.equal(full2[2:3], codes2)
    assert torch.equal(fscales2[2:3], scales2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, generator=g) * 3
    x[0] = 1.0  # representable: always itself
    x[1] = -0.0
    reps = 4000
    xs = x.repeat(reps, 1)
    fast = round_stochastic(xs, dtype, torch.Generator().manual_seed(2))
    ref = round_stochastic_reference(xs, dtype, torch.Generator().manual_seed(3))
    near = x.to(dtype)
    inf = torch.tensor(float("inf"), dtype=dtype)
    lo = torch.where(near.float() > x, torch.nextafter(near, -inf), near)
    hi = torch.where(near.float() < x, torch.nextafter(near, inf), near)
    for out in (fast, ref):
        assert out.dtype == dtype
        assert bool(((out == lo) | (out == hi)).all())
        assert float(out[:, 0].float().sub(1).abs().max()) == 0
        ulp = (hi.float() - lo.float()).clamp_min(1e-30)
        err = (out.float().mean(0) - x).abs() / ulp
        assert float(err.max()) < 0.05, err  # mean within 5% of an ulp (about 6 sigma at 4000 draws)


def test_stochastic_rounding_to_fp32_is_exact():
    x = torch.randn(10)
    assert torch.equal(round_stochastic(x, torch.float32), x)
