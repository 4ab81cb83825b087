"""The two TopK encoder strategies (fused kernel; GEMM per latent chunk + Triton filter/merge)
against torch.topk of the dense pre-activations: the same cases for both."""

import pytest
import torch

from fastsae.kernels import topk_chunked, topk_encoder
from fastsae.ops import reference
from helpers import assert_topk_selection, oracle_pre, sae_weights

# (B, D, N, k, chunk): chunks of 24-40 latents, so every case merges several chunks, ragged
# last chunks included; k = d_sae and k = 1; chunk < k is widened to k.
CASES = [
    (5, 20, 70, 3, 24),
    (17, 33, 100, 7, 32),
    (3, 8, 40, 1, 16),
    (9, 16, 64, 63, 24),
    (4, 12, 24, 24, 8),
    (33, 5, 50, 10, 40),
    (1, 9, 77, 5, 20),    # one row
]


def _run(strategy, x, W_enc, b_enc, b_dec, k, chunk):
    if strategy == "chunked":
        return topk_chunked.topk_encode_chunked(x, W_enc, b_enc, b_dec, k, chunk=chunk)
    return topk_encoder.encode(x, W_enc, b_enc, b_dec, k, strategy="fused")


@pytest.mark.parametrize("strategy", topk_encoder.STRATEGIES)
@pytest.mark.parametrize("B,D,N,k,chunk", CASES)
def test_strategy_matches_torch_topk(strategy, B, D, N, k, chunk):
    x, W_enc, b_enc, b_dec, _ = sae_weights(B, D, N, seed=B + N)
    inputs = [t.clone() for t in (x, W_enc, b_enc, b_dec)]
    values, indices = _run(strategy, x, W_enc, b_enc, b_dec, k, chunk)
    assert_topk_selection(oracle_pre(x, W_enc, b_enc, b_dec), indices, k)
    ref_v, _ = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    torch.testing.assert_close(values, ref_v, rtol=1e-5, atol=1e-5)
    for before, after in zip(inputs, (x, W_enc, b_enc, b_dec)):
        assert torch.equal(before, after)  # no input written


@pytest.mark.parametrize("strategy", topk_encoder.STRATEGIES)
def test_strategies_noncontiguous_no_b_dec_and_zero_rows(strategy):
    x, W_enc, b_enc, _, _ = sae_weights(7, 18, 60, noncontig=True)
    _, indices = _run(strategy, x, W_enc, b_enc, None, 6, 16)
    assert_topk_selection(oracle_pre(x, W_enc, b_enc), indices, 6)
    v, i = _run(strategy, x[:0], W_enc, b_enc, None, 6, 16)
    assert v.shape == (0, 6) and i.shape == (0, 6) and i.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunked_half_precision(dtype):
    x, W_enc, b_enc, b_dec, _ = sae_weights(10, 24, 90, dtype=dtype, seed=3)
    values, indices = topk_chunked.topk_encode_chunked(x, W_enc, b_enc, b_dec, 5, chunk=32)
    assert values.dtype == dtype
    pre = oracle_pre(x, W_enc, b_enc, b_dec)
    assert_topk_selection(pre, indices, 5, exact=False)
    torch.testing.assert_close(values.float(), pre.gather(1, indices).relu(), rtol=2e-2, atol=2e-2)


def test_filter_overflow_rows_are_merged_from_the_whole_chunk():
    """Increasing pre-activations: every later chunk beats the whole running top-k of every
    row, so each row overflows its k-wide record in every chunk."""
    B, D, N, k = 4, 3, 96, 5
    x = torch.ones(B, D)
    W_enc = torch.zeros(D, N)
    b_enc = torch.arange(N, dtype=torch.float32)
    values, indices = topk_chunked.topk_encode_chunked(x, W_enc, b_enc, None, k, chunk=16)
    assert torch.equal(indices, torch.arange(N - 1, N - 1 - k, -1).expand(B, k))
    torch.testing.assert_close(values, b_enc[indices])


def test_filter_kernel_records_entries_above_threshold_in_order():
    pre = torch.tensor([[0.5, 3.0, -1.0, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0, 1.0], [9.0, 8.0, 7.0, 6.0, 5.0]])
    thr = torch.tensor([1.0, 1.0, 5.5])
    rec_v, rec_i, count = topk_chunked.filter_above(pre, thr, cap=2, col0=100)
    assert count.tolist() == [3, 0, 4]
    assert rec_i[0].tolist() == [101, 103] and rec_v[0].tolist() == [3.0, 2.0]
    assert rec_v[1].tolist() == [float("-inf")] * 2
    assert rec_i[2].tolist() == [100, 101]


def test_k_beyond_the_fused_limit_goes_chunked(monkeypatch):
    monkeypatch.delenv("FASTSAE_TOPK_STRATEGY", raising=False)
    big = topk_encoder.MAX_K + 1
    assert topk_encoder.choose_strategy(4, 16, 4 * big, big) == "chunked"
    monkeypatch.setenv("FASTSAE_TOPK_STRATEGY", "fused")
    assert topk_encoder.choose_strategy(4, 16, 4 * big, big) == "chunked"  # the only one that can
    assert topk_encoder.choose_strategy(4, 16, 4 * big, 8) == "fused"
    monkeypatch.setenv("FASTSAE_TOPK_STRATEGY", "fast")
    with pytest.raises(ValueError, match="FASTSAE_TOPK_STRATEGY='fast'"):
        topk_encoder.choose_strategy(4, 16, 64, 8)


def test_provisional_rule(monkeypatch):
    monkeypatch.delenv("FASTSAE_TOPK_STRATEGY", raising=False)
    assert topk_encoder.choose_strategy(16384, 4096, 2**20, 32) == "chunked"
    assert topk_encoder.choose_strategy(16384, 768, 2**17, 32) == "fused"
    assert topk_encoder.choose_strategy(64, 4096, 2**20, 32) == "fused"


def test_chunk_size_is_bounded_and_covers_k():
    assert topk_chunked.chunk_size(16384, 2**21, 32) * 16384 <= topk_chunked._BUFFER_ELEMENTS
    assert topk_chunked.chunk_size(16384, 2**21, 2048) >= 2048
    assert topk_chunked.chunk_size(4, 100, 7) == 100
