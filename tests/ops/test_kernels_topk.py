"""Fused TopK encoder (kernels/topk_encoder.py) against torch.topk of the dense pre-activations."""

import pytest
import torch

from fastsae.kernels import topk_encoder
from fastsae.ops import reference
from helpers import assert_topk_selection, oracle_pre, sae_weights

# (B, D, N, k, splits): block sizes under the interpreter are 16 rows x 32 latents x 16 dims,
# so every case has ragged edges; splits=3 leaves the last split short (or empty).
CASES = [
    (5, 20, 70, 3, None),
    (17, 33, 100, 7, 3),   # k not a power of two, 3 ragged splits
    (3, 8, 40, 1, None),   # k = 1
    (9, 16, 64, 63, 2),    # k close to d_sae
    (4, 12, 24, 24, 1),    # k = d_sae
    (33, 5, 50, 10, 4),    # split ranges shorter than k
]


@pytest.mark.parametrize("B,D,N,k,splits", CASES)
def test_topk_encode_matches_torch_topk(B, D, N, k, splits):
    x, W_enc, b_enc, b_dec, _ = sae_weights(B, D, N, seed=B + N)
    values, indices = topk_encoder.topk_encode(x, W_enc, b_enc, b_dec, k, splits=splits)
    pre = oracle_pre(x, W_enc, b_enc, b_dec)
    assert_topk_selection(pre, indices, k)
    ref_v, _ = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    # sorted descending like torch.topk, so the values line up slot by slot
    torch.testing.assert_close(values, ref_v, rtol=1e-5, atol=1e-5)


def test_rows_without_positive_preactivation_give_zero_values():
    x, W_enc, b_enc, b_dec, _ = sae_weights(6, 10, 45, bias_shift=-100.0)
    values, indices = topk_encoder.topk_encode(x, W_enc, b_enc, b_dec, 5)
    assert torch.equal(values, torch.zeros_like(values))
    assert_topk_selection(oracle_pre(x, W_enc, b_enc, b_dec), indices, 5)  # still the top 5 pre-acts


def test_noncontiguous_inputs_and_no_b_dec():
    x, W_enc, b_enc, _, _ = sae_weights(7, 18, 60, noncontig=True)
    assert not x.is_contiguous() and not W_enc.is_contiguous()
    _, indices = topk_encoder.topk_encode(x, W_enc, b_enc, None, 6)
    assert_topk_selection(oracle_pre(x, W_enc, b_enc), indices, 6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storage(dtype):
    x, W_enc, b_enc, b_dec, _ = sae_weights(10, 24, 50, dtype=dtype, seed=3)
    values, indices = topk_encoder.topk_encode(x, W_enc, b_enc, b_dec, 5)
    assert values.dtype == dtype
    pre = oracle_pre(x, W_enc, b_enc, b_dec)
    assert_topk_selection(pre, indices, 5, exact=False)
    torch.testing.assert_close(values.float(), pre.gather(1, indices).relu(), rtol=2e-2, atol=2e-2)


def test_fire_counts_count_positive_selections():
    x, W_enc, b_enc, b_dec, _ = sae_weights(12, 8, 40, bias_shift=-6.0, seed=5)
    values, indices, counts = topk_encoder.topk_encode(x, W_enc, b_enc, b_dec, 4, return_counts=True)
    ref_v, ref_i = reference.topk_encode(x, W_enc, b_enc, b_dec, 4)
    assert bool((ref_v == 0).any()) and bool((ref_v > 0).any())  # the case is mixed
    assert torch.equal(counts, torch.bincount(ref_i[ref_v > 0], minlength=40))


def test_bad_k_is_rejected_with_the_limit_named():
    x, W_enc, b_enc, b_dec, _ = sae_weights(2, 4, 8)
    with pytest.raises(ValueError, match="k=9"):
        topk_encoder.topk_encode(x, W_enc, b_enc, b_dec, 9)
