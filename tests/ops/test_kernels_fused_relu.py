"""Fused ReLU / JumpReLU / threshold encode->decode (kernels/fused_relu.py) against the
dense reference."""

import pytest
import torch

from fastsae.kernels import fused_relu
from fastsae.ops import reference
from helpers import oracle_pre, sae_weights


def _dense(values, indices, N):
    return torch.zeros(values.shape[0], N).scatter_add(1, indices, values.float())


def _check(r, x, W_enc, b_enc, b_dec, threshold, W_dec, l1_weight=None, tol=1e-4):
    pre = oracle_pre(x, W_enc, b_enc, b_dec)
    act = pre * (pre > threshold.float())
    scale = lambda t: tol * max(1.0, float(t.abs().max()))  # noqa: E731
    if W_dec is not None:
        x_hat = act @ W_dec.float() + b_dec.float()
        torch.testing.assert_close(r.x_hat.float(), x_hat, rtol=0, atol=scale(x_hat))
    dense = _dense(r.values, r.indices, W_enc.shape[1])
    torch.testing.assert_close(dense, act, rtol=0, atol=scale(act))
    assert torch.equal(r.l0, (act != 0).sum(1))
    w = l1_weight.float() if l1_weight is not None else 1.0
    torch.testing.assert_close(r.l1, (act.abs() * w).sum(1), rtol=0, atol=scale(act) * 10)
    assert r.values.shape[1] == int(r.l0.max())  # trimmed to the longest row


@pytest.mark.parametrize("B,D,N", [(5, 20, 70), (33, 17, 100), (4, 40, 32)])
def test_relu_forward_fused(B, D, N):
    x, W_enc, b_enc, b_dec, W_dec = sae_weights(B, D, N, seed=N, bias_shift=-2.0)
    l1w = W_dec.norm(dim=1)
    r = fused_relu.fused_threshold(x, W_enc, b_enc, b_dec, torch.tensor(0.0), W_dec, b_dec, l1_weight=l1w)
    _check(r, x, W_enc, b_enc, b_dec, torch.tensor(0.0), W_dec, l1w)


def test_jumprelu_per_latent_threshold_noncontiguous():
    x, W_enc, b_enc, b_dec, W_dec = sae_weights(9, 22, 60, noncontig=True, seed=4)
    threshold = torch.rand(60, generator=torch.Generator().manual_seed(4)) * 3
    r = fused_relu.fused_threshold(x, W_enc, b_enc, b_dec, threshold, W_dec, b_dec)
    _check(r, x, W_enc, b_enc, b_dec, threshold, W_dec)


@pytest.mark.parametrize("fused_max_d", [256, 8])  # 8: decode from the record instead
def test_capacity_overflow_is_detected_and_recomputed_exactly(monkeypatch, fused_max_d):
    monkeypatch.setattr(fused_relu, "FUSED_MAX_D", fused_max_d)
    x, W_enc, b_enc, b_dec, W_dec = sae_weights(7, 16, 50, seed=6)
    r = fused_relu.fused_threshold(x, W_enc, b_enc, b_dec, torch.tensor(0.0), W_dec, b_dec, capacity=3)
    assert r.overflowed and int(r.l0.max()) > 3
    _check(r, x, W_enc, b_enc, b_dec, torch.tensor(0.0), W_dec)
    roomy = fused_relu.fused_threshold(x, W_enc, b_enc, b_dec, torch.tensor(0.0), None, None, capacity=50)
    assert not roomy.overflowed and roomy.x_hat is None
    assert torch.equal(roomy.indices, r.indices)


def test_no_active_latent_anywhere():
    x, W_enc, b_enc, b_dec, W_dec = sae_weights(6, 10, 40, bias_shift=-100.0)
    r = fused_relu.fused_threshold(x, W_enc, b_enc, b_dec, torch.tensor(0.0), W_dec, b_dec)
    assert r.values.shape == (6, 0) and int(r.l0.sum()) == 0
    torch.testing.assert_close(r.x_hat, b_dec.expand(6, 10))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storage(dtype):
    x, W_enc, b_enc, b_dec, W_dec = sae_weights(8, 24, 40, dtype=dtype, seed=8, bias_shift=-3.0)
    # a threshold well away from every pre-activation, so rounding cannot flip a latent on/off
    pre = oracle_pre(x, W_enc, b_enc, b_dec)
    th = torch.tensor(0.0)
    assert float((pre - th).abs().min()) > 0.05
    r = fused_relu.fused_threshold(x, W_enc, b_enc, b_dec, th.to(dtype), W_dec, b_dec)
    assert r.x_hat.dtype == dtype and r.values.dtype == dtype
    _check(r, x, W_enc, b_enc, b_dec, th, W_dec, tol=2e-2)


def test_scalar_threshold_matches_reference_threshold_encode():
    x, W_enc, b_enc, b_dec, _ = sae_weights(10, 12, 30, seed=9)
    th = torch.tensor(1.5)
    r = fused_relu.fused_threshold(x, W_enc, b_enc, b_dec, th)
    ref = reference.threshold_encode(x, W_enc, b_enc, b_dec, th)
    torch.testing.assert_close(_dense(r.values, r.indices, 30), ref.to_dense(), rtol=1e-5, atol=1e-5)


def test_threshold_shape_is_checked():
    x, W_enc, b_enc, b_dec, _ = sae_weights(2, 4, 8)
    with pytest.raises(ValueError, match="threshold"):
        fused_relu.fused_threshold(x, W_enc, b_enc, b_dec, torch.zeros(5))
