"""Sparse decoder kernel (kernels/sparse_decoder.py) against reference.sparse_decode."""

import pytest
import torch

from fastsae.kernels import sparse_decoder
from fastsae.ops import reference
from helpers import DTYPES, sae_weights

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _sparse(B, k, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, k, generator=g).to(dtype), torch.randint(0, N, (B, k), generator=g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,D,N,k", [(5, 20, 70, 3), (33, 17, 100, 7), (3, 40, 9, 1)])
def test_sparse_decode_matches_reference(B, D, N, k, dtype):
    values, indices = _sparse(B, k, N, dtype)
    *_, b_dec, W_dec = sae_weights(B, D, N, dtype=dtype)
    out = sparse_decoder.sparse_decode(values, indices, W_dec, b_dec)
    assert out.dtype == dtype
    ref = reference.sparse_decode(values.float(), indices, W_dec.float(), b_dec.float())
    t = TOL[dtype] * max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=t)


def test_fused_residual_gives_squared_error_from_fp32_accumulator():
    values, indices = _sparse(9, 4, 30, torch.float32, seed=1)
    x, *_, b_dec, W_dec = sae_weights(9, 21, 30, seed=1)
    out, sq = sparse_decoder.sparse_decode(values, indices, W_dec, b_dec, x=x)
    ref = reference.sparse_decode(values, indices, W_dec, b_dec)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sq, (ref - x).pow(2).sum(-1), rtol=1e-5, atol=1e-4)


def test_noncontiguous_inputs_no_bias_and_padded_slots():
    values, indices = _sparse(6, 5, 25, torch.float32, seed=2)
    values = values.t().contiguous().t()
    values[:, 3:] = 0  # padded slots (value 0) add nothing, whatever their index
    *_, W_dec = sae_weights(6, 19, 25, noncontig=True)
    assert not W_dec.is_contiguous() and not values.is_contiguous()
    out = sparse_decoder.sparse_decode(values, indices, W_dec, None)
    torch.testing.assert_close(out, reference.sparse_decode(values, indices, W_dec, None), rtol=1e-5, atol=1e-5)


def test_zero_active_latents_decode_to_the_bias():
    *_, b_dec, W_dec = sae_weights(4, 10, 12)
    out = sparse_decoder.sparse_decode(torch.zeros(4, 0), torch.zeros(4, 0, dtype=torch.long), W_dec, b_dec)
    torch.testing.assert_close(out, b_dec.expand(4, 10))
