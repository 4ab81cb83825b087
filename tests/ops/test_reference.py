"""The reference ops: float64 gradcheck, and the explicit sparse backward against autograd."""

import pytest
import torch

from fastsae.ops import reference as R
from fastsae.sparse import SparseActs

D, N, B = 7, 19, 5  # deliberately not multiples of anything


def params(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return mk(B, D), mk(D, N), mk(N), mk(N, D), mk(D)


def test_pre_activations_formula():
    x, We, be, Wd, bd = params()
    torch.testing.assert_close(R.pre_activations(x, We, be, bd), (x - bd) @ We + be)
    torch.testing.assert_close(R.pre_activations(x, We, be, None), x @ We + be)


@pytest.mark.parametrize("k", [1, 4, N])
def test_topk_encode_matches_dense_topk(k):
    x, We, be, _, bd = params()
    vals, idx = R.topk_encode(x, We, be, bd, k)
    pre = (x - bd) @ We + be
    ref_idx = pre.topk(k, dim=-1).indices
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    torch.testing.assert_close(vals, pre.gather(-1, idx).relu())


def test_batchtopk_keeps_exactly_batch_k_largest():
    x, We, be, _, bd = params()
    k = 3
    acts = R.batchtopk_encode(x, We, be, bd, k).to_dense()
    relu = ((x - bd) @ We + be).relu()
    thresh = relu.flatten().topk(B * k).values.min()
    expected = relu * (relu >= thresh)
    torch.testing.assert_close(acts, expected)
    assert int((acts > 0).sum()) <= B * k


def test_threshold_encode_is_jumprelu():
    x, We, be, _, bd = params()
    th = torch.full((N,), 0.3, dtype=torch.float64)
    pre = (x - bd) @ We + be
    torch.testing.assert_close(R.threshold_encode(x, We, be, bd, th).to_dense(), pre * (pre > th))


def test_gradcheck_dense_ops():
    x, We, be, Wd, bd = (t.requires_grad_() for t in params())
    assert torch.autograd.gradcheck(lambda *a: R.relu_encode(*a), (x, We, be, bd))
    acts = torch.randn(B, N, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(R.dense_decode, (acts, Wd, bd))


def test_gradcheck_topk_and_sparse_decode():
    x, We, be, Wd, bd = (t.requires_grad_() for t in params())

    def f(x, We, be, Wd, bd):
        vals, idx = R.topk_encode(x, We, be, bd, 3)
        return R.sparse_decode(vals, idx, Wd, bd)

    assert torch.autograd.gradcheck(f, (x, We, be, Wd, bd))


def test_gradcheck_batchtopk_and_jumprelu_wrt_weights():
    x, We, be, Wd, bd = (t.requires_grad_() for t in params())
    th = torch.full((N,), 0.2, dtype=torch.float64)  # STE is not a true gradient: θ held fixed

    def f_batch(x, We, be):
        return R.batchtopk_encode(x, We, be, bd, 2).to_dense()

    def f_jump(x, We, be):
        return R.jumprelu_encode(x, We, be, bd, th, 1e-3)

    assert torch.autograd.gradcheck(f_batch, (x, We, be))
    assert torch.autograd.gradcheck(f_jump, (x, We, be))


def test_jumprelu_threshold_gradient_is_the_rectangle_ste():
    pre = torch.tensor([[0.10, 0.5004, 0.7, 0.4997]], dtype=torch.float64)
    th = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    eps = 1e-3
    R.JumpReLU.apply(pre, th, eps).sum().backward()
    # entries within ε/2 of θ (0.5004 and 0.4997) each contribute -θ/ε
    torch.testing.assert_close(th.grad, torch.tensor([-2 * 0.5 / eps], dtype=torch.float64))
    th.grad = None
    R.Step.apply(pre, th, eps).sum().backward()
    torch.testing.assert_close(th.grad, torch.tensor([-2 / eps], dtype=torch.float64))


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("k", [1, 3, N])
def test_explicit_sparse_backward_equals_autograd(apply_b_dec, k):
    x, We, be, Wd, bd = (t.requires_grad_() for t in params(seed=k))
    b_in = bd if apply_b_dec else None
    vals, idx = R.topk_encode(x, We, be, b_in, k)
    x_hat = R.sparse_decode(vals, idx, Wd, bd)
    grad_out = torch.randn_like(x_hat)
    x_hat.backward(grad_out)
    ours = R.topk_sae_backward(x.detach(), vals.detach(), idx, grad_out, We.detach(), Wd.detach(),
                               bd.detach() if apply_b_dec else None)
    torch.testing.assert_close(ours["dW_enc"], We.grad)
    torch.testing.assert_close(ours["db_enc"], be.grad)
    torch.testing.assert_close(ours["dW_dec"], Wd.grad)
    torch.testing.assert_close(ours["dx"], x.grad)
    torch.testing.assert_close(ours["db_dec"], bd.grad)

    rows = R.topk_sae_backward(x.detach(), vals.detach(), idx, grad_out, We.detach(), Wd.detach(),
                               bd.detach() if apply_b_dec else None, row_sparse=True)["rows"]
    assert torch.equal(rows.latents, torch.unique(idx))
    for name, dense in rows.to_dense().items():
        torch.testing.assert_close(dense, ours[name])


def test_sparse_acts_round_trip_and_padding():
    dense = torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    s = SparseActs.from_dense(dense)
    assert s.values.shape == (3, 2)  # widest row has 2 active latents
    torch.testing.assert_close(s.to_dense(), dense)
    assert s.l0().tolist() == [2, 0, 1]
    empty = SparseActs.from_dense(torch.zeros(2, 5))
    assert empty.values.shape == (2, 0)
    torch.testing.assert_close(empty.to_dense(), torch.zeros(2, 5))
