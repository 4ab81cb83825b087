"""Exact BatchTopK selection (kernels/batchtopk.py) against reference.batchtopk_encode."""

import pytest
import torch

from fastsae.kernels import batchtopk
from fastsae.ops import reference
from helpers import oracle_pre, sae_weights


def _dense(values, indices, N):
    return torch.zeros(values.shape[0], N).scatter_add(1, indices, values.float())


def _check(x, W_enc, b_enc, b_dec, k):
    values, indices = batchtopk.batchtopk_encode(x, W_enc, b_enc, b_dec, k)
    ref = reference.batchtopk_encode(x.float(), W_enc.float(), b_enc.float(), b_dec.float(), k).to_dense()
    got = _dense(values, indices, W_enc.shape[1])
    assert torch.equal(got != 0, ref != 0), "different (row, latent) selections"
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    # each row's kept entries are a descending prefix, padded with zeros
    assert bool((values[:, :-1] >= values[:, 1:]).all()) if values.shape[1] > 1 else True
    return values


@pytest.mark.parametrize("B,D,N,k", [(12, 16, 80, 3), (5, 9, 33, 7), (20, 6, 40, 1), (6, 10, 24, 22)])
def test_batchtopk_matches_reference(B, D, N, k):
    _check(*sae_weights(B, D, N, seed=B * N)[:4], k)


def test_one_row_taking_most_of_the_budget_is_widened():
    x, W_enc, b_enc, b_dec, _ = sae_weights(12, 16, 80, seed=1)
    x[3] *= 30  # row 3 dominates: it holds far more than k of the batch's top B*k
    values = _check(x, W_enc, b_enc, b_dec, 3)
    assert values.shape[1] > 3 * 4  # it was widened past k (x4) at least once


def test_rows_beyond_the_kernel_k_limit_use_the_dense_rows(monkeypatch):
    monkeypatch.setattr(batchtopk, "MAX_K", 8)
    x, W_enc, b_enc, b_dec, _ = sae_weights(12, 16, 80, seed=1)
    x[3] *= 30
    _check(x, W_enc, b_enc, b_dec, 3)


def test_all_activations_nonpositive_or_few_positive():
    x, W_enc, b_enc, b_dec, _ = sae_weights(8, 10, 40, bias_shift=-100.0)
    values, _ = batchtopk.batchtopk_encode(x, W_enc, b_enc, b_dec, 3)
    assert values.shape == (8, 0)
    x, W_enc, b_enc, b_dec, _ = sae_weights(8, 10, 40, bias_shift=-9.0, seed=2)
    pre = oracle_pre(x, W_enc, b_enc, b_dec)
    assert 0 < int((pre > 0).sum()) < 8 * 5  # fewer positives than the budget: all kept
    _check(x, W_enc, b_enc, b_dec, 5)


def test_bf16_storage_noncontiguous():
    x, W_enc, b_enc, b_dec, _ = sae_weights(9, 12, 30, dtype=torch.bfloat16, noncontig=True, seed=3)
    values, indices = batchtopk.batchtopk_encode(x, W_enc, b_enc, b_dec, 4)
    assert values.dtype == torch.bfloat16
    pre = oracle_pre(x, W_enc, b_enc, b_dec).relu()
    # the selection is the top B*k of the fp32 pre-activations computed from bf16 storage
    ref = reference.batchtopk_mask(pre, 4)
    got = _dense(values, indices, 30) != 0
    assert int((got != ref).sum()) <= 2  # at most one near-tie swapped by rounding
