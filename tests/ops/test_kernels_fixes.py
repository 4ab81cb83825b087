"""What a real GPU run would hit and the interpreter can still show: int64 record offsets,
biases read by stride, the batch size in every autotune key, a runtime split count, AuxK
beyond the fused kernel's k without a dense [B, d_sae], a deterministic decoder loss."""

import inspect

import pytest
import torch
import triton
import triton.language as tl

from fastsae import ops
from fastsae.kernels import fused_relu, preact_tile, sparse_decoder, topk_chunked, topk_encoder
from fastsae.losses import top_dead_latents
from fastsae.ops import reference
from helpers import assert_topk_selection, oracle_pre, sae_weights


@triton.jit
def _offsets_kernel(rows_ptr, out_ptr, WIDTH, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    rows = tl.load(rows_ptr + i)
    tl.store(out_ptr + i, preact_tile.row_offsets(rows, WIDTH))


def test_record_offsets_are_int64():
    """rows x capacity past 2^31 (16384 rows x 2^17 slots): the offset helper the record
    stores use must not wrap (an int32 product would)."""
    rows = torch.tensor([0, 1, 16383, 2**20], dtype=torch.int32)
    out = torch.zeros(4, dtype=torch.int64)
    _offsets_kernel[(1,)](rows, out, 2**17 + 1, BLOCK=4)
    assert out.tolist() == [r * (2**17 + 1) for r in rows.tolist()]


def _strided(v):
    """The same values as v in a view of stride 2."""
    wide = torch.zeros(2 * v.numel(), dtype=v.dtype)
    wide[::2] = v
    return wide[::2]


def test_biases_with_strides_are_read_by_position():
    x, W_enc, b_enc, b_dec, W_dec = sae_weights(6, 20, 70, seed=4)
    sb_enc, sb_dec = _strided(b_enc), _strided(b_dec)
    assert sb_enc.stride(0) == 2 and torch.equal(sb_enc, b_enc)
    pre = oracle_pre(x, W_enc, b_enc, b_dec)
    for strategy in topk_encoder.STRATEGIES:
        _, idx = topk_encoder.encode(x, W_enc, sb_enc, sb_dec, 5, strategy=strategy)
        assert_topk_selection(pre, idx, 5)
    r = fused_relu.fused_threshold(x, W_enc, sb_enc, sb_dec, torch.tensor(0.0), W_dec, sb_dec,
                                   l1_weight=_strided(W_dec.norm(dim=1)))
    torch.testing.assert_close(r.x_hat, reference.relu_forward(x, W_enc, b_enc, b_dec, W_dec, b_dec),
                               rtol=1e-4, atol=1e-4)
    vals, idx = reference.topk_encode(x, W_enc, b_enc, b_dec, 4)
    out = sparse_decoder.sparse_decode(vals, idx, W_dec, sb_dec)
    torch.testing.assert_close(out, reference.sparse_decode(vals, idx, W_dec, b_dec), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [topk_encoder._topk_partial_kernel, fused_relu._fused_threshold_kernel,
                                    sparse_decoder._sparse_decode_kernel])
def test_every_autotune_key_has_the_batch_size(kernel):
    assert "B_BUCKET" in kernel.keys
    assert preact_tile.batch_bucket(1) == 16 and preact_tile.batch_bucket(1000) == 1024
    assert preact_tile.batch_bucket(10**9) == 65536


def test_split_count_is_a_runtime_argument():
    """A new split count must not be a new compilation of every config: not a constexpr."""
    fn = topk_encoder._topk_partial_kernel.fn
    params = inspect.signature(getattr(fn, "fn", fn)).parameters  # the Python function, JIT or interpreter
    assert params["SPLITS"].annotation is inspect.Parameter.empty  # a plain runtime int
    assert "constexpr" in str(params["K_PAD"].annotation)  # (the check can tell a constexpr)
    x, W_enc, b_enc, b_dec, _ = sae_weights(9, 12, 90, seed=6)
    pre = oracle_pre(x, W_enc, b_enc, b_dec)
    for splits in (1, 2, 3, 5):
        _, idx = topk_encoder.topk_encode(x, W_enc, b_enc, b_dec, 4, splits=splits)
        assert_topk_selection(pre, idx, 4)


def test_decoder_squared_error_is_summed_without_atomics():
    """Several d blocks per row (D=50 > the interpreter's 16): partial sums per block, added in a
    fixed order, equal the fp32 squared error and are bit-identical run to run."""
    x, _, _, b_dec, W_dec = sae_weights(7, 50, 30, seed=2)
    g = torch.Generator().manual_seed(1)
    vals, idx = torch.randn(7, 4, generator=g), torch.randint(0, 30, (7, 4), generator=g)
    out, sq = sparse_decoder.sparse_decode(vals, idx, W_dec, b_dec, x=x)
    _, sq2 = sparse_decoder.sparse_decode(vals, idx, W_dec, b_dec, x=x)
    assert torch.equal(sq, sq2)
    torch.testing.assert_close(sq, (reference.sparse_decode(vals, idx, W_dec, b_dec) - x).pow(2).sum(-1),
                               rtol=1e-5, atol=1e-4)
    fn = sparse_decoder._sparse_decode_kernel.fn
    code = [line.split("#")[0] for line in inspect.getsource(getattr(fn, "fn", fn)).splitlines()]
    assert not any("atomic" in line for line in code)  # a float atomic would sum in arrival order


@pytest.fixture
def no_dense_preactivations(monkeypatch):
    """Fail any path that builds the dense [B, d_sae] pre-activations through the reference."""
    def refuse(*a, **k):
        raise AssertionError("dense [B, d_sae] pre-activations built")
    monkeypatch.setattr(reference, "pre_activations", refuse)


def _auxk_case(n_dead_frac=0.9):
    B, D, N = 3, 8, 2 * topk_encoder.MAX_K + 100
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(B, D, generator=g), torch.randn(D, N, generator=g), torch.randn(N, generator=g)
    dead = torch.randperm(N, generator=g)[: int(N * n_dead_frac)].sort().values
    return x, W, b, dead


def test_auxk_beyond_max_k_through_the_triton_op(no_dense_preactivations, monkeypatch):
    """k_aux > MAX_K (AuxK's d_in/2 at d_in=4096): the triton op switches to the chunked strategy,
    [B, chunk] at a time, instead of the reference's dense [B, d_sae]."""
    if "triton" not in ops.available_backends("cpu"):
        pytest.skip("the triton backend runs on CPU only under TRITON_INTERPRET=1")
    monkeypatch.setattr(topk_chunked, "_BUFFER_ELEMENTS", 3 * 256)  # several chunks at B=3
    x, W, b, dead = _auxk_case()
    k_aux = topk_encoder.MAX_K + 8
    pre = x @ W + b
    want = dead[pre[:, dead].topk(k_aux, dim=1).indices].sort(1).values
    got = top_dead_latents(x, W, b, dead, k_aux, topk_encode=ops.get("topk_encode", "triton"))
    assert torch.equal(got.sort(1).values, want)


def test_auxk_with_the_reference_op_scans_in_chunks(no_dense_preactivations):
    """The reference encoder is dense by design: top_dead_latents scans chunk by chunk instead."""
    x, W, b, dead = _auxk_case()
    k_aux = 40
    want = dead[(x @ W + b)[:, dead].topk(k_aux, dim=1).indices].sort(1).values
    got = top_dead_latents(x, W, b, dead, k_aux, chunk=128, topk_encode=reference.topk_encode)
    assert torch.equal(got.sort(1).values, want)
