"""The kernels compiled for a real GPU at realistic shapes (marked gpu: skipped without CUDA).
The CPU tests run the same kernels under the interpreter; these check what only a GPU can:
tensor-core dots, tf32x3 for fp32, the autotuned configs and int64 offsets."""

import pytest
import torch

from fastsae.kernels import batchtopk, fused_relu, sparse_decoder, topk_encoder
from fastsae.ops import reference

pytestmark = pytest.mark.gpu


def _weights(B, D, N, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, D, device="cuda", generator=g).to(dtype)
    W_enc = (torch.randn(D, N, device="cuda", generator=g) / D**0.5).to(dtype)
    b_enc = (torch.randn(N, device="cuda", generator=g) * 0.1).to(dtype)
    b_dec = (torch.randn(D, device="cuda", generator=g) * 0.1).to(dtype)
    W_dec = (torch.randn(N, D, device="cuda", generator=g) / D**0.5).to(dtype)
    return x, W_enc, b_enc, b_dec, W_dec


def _pre(x, W_enc, b_enc, b_dec):
    return (x - b_dec).float() @ W_enc.float() + b_enc.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,N,k", [(768, 32768, 32), (1000, 20000, 128), (128, 4096, 7)])
def test_topk_encoder_on_gpu(D, N, k, dtype):
    x, W_enc, b_enc, b_dec, _ = _weights(512, D, N, dtype)
    values, indices = topk_encoder.topk_encode(x, W_enc, b_enc, b_dec, k)
    pre = _pre(x, W_enc, b_enc, b_dec)
    ref = pre.topk(k, dim=1)
    got = pre.gather(1, indices)
    # every pick is within accumulation-order rounding of the true top k (exact sets for fp32
    # up to near-ties closer than the tolerance)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert bool((got.min(1).values >= ref.values[:, -1] - tol).all())
    same = (indices.unsqueeze(-1) == ref.indices.unsqueeze(-2)).any(-1).float().mean()
    assert float(same) > (0.999 if dtype == torch.float32 else 0.98)
    torch.testing.assert_close(values.float(), got.relu(), rtol=tol, atol=tol)


def test_sparse_decoder_on_gpu():
    _, _, _, b_dec, W_dec = _weights(1, 4096, 65536, torch.bfloat16)
    values = torch.randn(2048, 64, device="cuda", dtype=torch.bfloat16)
    indices = torch.randint(0, 65536, (2048, 64), device="cuda")
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    out, sq = sparse_decoder.sparse_decode(values, indices, W_dec, b_dec, x=x)
    ref = reference.sparse_decode(values.float(), indices, W_dec.float(), b_dec.float())
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(sq, (ref - x.float()).pow(2).sum(-1), rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("D", [128, 768])  # fused decode / decode from the record
def test_fused_relu_on_gpu(D):
    x, W_enc, b_enc, b_dec, W_dec = _weights(1024, D, 16384, torch.float32)
    b_enc -= 0.6  # sparse enough to be a realistic ReLU SAE
    r = fused_relu.fused_threshold(x, W_enc, b_enc, b_dec, torch.tensor(0.0, device="cuda"), W_dec, b_dec)
    acts = _pre(x, W_enc, b_enc, b_dec).relu()
    torch.testing.assert_close(r.x_hat, acts @ W_dec + b_dec, rtol=1e-3, atol=1e-3)
    assert int((r.l0 - (acts > 0).sum(1)).abs().max()) <= 2  # tf32x3 may flip a near-zero latent


def test_batchtopk_on_gpu():
    x, W_enc, b_enc, b_dec, _ = _weights(1024, 768, 32768, torch.float32)
    x[:8] *= 10  # a few rows that take far more than k
    values, indices = batchtopk.batchtopk_encode(x, W_enc, b_enc, b_dec, 32)
    acts = _pre(x, W_enc, b_enc, b_dec).relu()
    ref = reference.batchtopk_mask(acts, 32)
    # scatter_add: a padded slot (value 0, index 0) must not clear a real latent 0
    got = torch.zeros_like(acts, dtype=torch.int32).scatter_add_(1, indices, (values != 0).int()) > 0
    assert int((got != ref).sum()) <= 4
