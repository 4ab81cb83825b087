"""Plain-PyTorch reference of every op: the oracle for tests and the fallback backend.

Forward ops are written for clarity, not speed (they materialise [N, d_sae]); autograd
gives their gradients. `topk_sae_backward` spells out the sparse gradient formulas of
docs/design.md explicitly, as the oracle for the native backward ops.

All ops take 2-D x [N, d_in]; the modules flatten leading dimensions first.
"""

from __future__ import annotations

import torch

from ..sparse import RowSparseGrads, SparseActs


def pre_activations(x, W_enc, b_enc, b_dec=None):
    """(x - b_dec) @ W_enc + b_enc; pass b_dec=None when it is not applied to the input."""
    if b_dec is not None:
        x = x - b_dec
    return x @ W_enc + b_enc


def topk_encode(x, W_enc, b_enc, b_dec, k: int):
    """Per-row top-k of the pre-activations, then ReLU: (values [N,k], indices [N,k])."""
    pre = pre_activations(x, W_enc, b_enc, b_dec)
    vals, idx = pre.topk(k, dim=-1)
    return vals.relu(), idx


def topk_encode_dead(x, W_enc, b_enc, b_dec, k: int, dead: torch.Tensor, k_aux: int):
    """topk_encode, plus each row's min(k_aux, #dead) largest ReLU'd pre-activations among the
    latent ids `dead` (ascending) from the same pre-activations (AuxK's selection):
    (values, indices, dead values, dead latent ids)."""
    pre = pre_activations(x, W_enc, b_enc, b_dec)
    vals, idx = pre.topk(k, dim=-1)
    dead_vals, pos = pre[:, dead].topk(min(k_aux, dead.numel()), dim=-1)
    return vals.relu(), idx, dead_vals.relu(), dead[pos]


def batchtopk_mask(acts: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the N*k largest of the (already ReLU'd) activations of the whole batch."""
    flat = acts.flatten()
    keep = min(k * acts.shape[0], flat.numel())
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(keep).indices] = True
    return mask.view_as(acts) & (acts > 0)


def batchtopk_encode(x, W_enc, b_enc, b_dec, k: int) -> SparseActs:
    """BatchTopK (Bussmann et al. 2024): top N*k activations over the whole batch."""
    acts = pre_activations(x, W_enc, b_enc, b_dec).relu()
    return SparseActs.from_dense(acts * batchtopk_mask(acts, k))


def threshold_encode(x, W_enc, b_enc, b_dec, threshold) -> SparseActs:
    """Keep activations above a (scalar or per-latent) threshold, as a compact result."""
    pre = pre_activations(x, W_enc, b_enc, b_dec)
    return SparseActs.from_dense(pre * (pre > threshold))


def relu_encode(x, W_enc, b_enc, b_dec):
    return pre_activations(x, W_enc, b_enc, b_dec).relu()


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """pre * 1[pre > θ] with the straight-through estimator of Rajamanoharan et al. 2024:
    ∂/∂θ = -(θ/ε)·K((pre-θ)/ε), K the rectangle kernel of bandwidth ε."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        grad_th = -(threshold / eps) * _rectangle((pre - threshold) / eps) * grad
        grad_th = grad_th.sum_to_size(threshold.shape)
        return grad_pre, grad_th, None


class Step(torch.autograd.Function):
    """1[pre > θ] (for the L0 penalty) with STE ∂/∂θ = -(1/ε)·K((pre-θ)/ε)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_th = (-(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad).sum_to_size(
            threshold.shape
        )
        return torch.zeros_like(pre), grad_th, None


def jumprelu_encode(x, W_enc, b_enc, b_dec, threshold, bandwidth: float):
    return JumpReLU.apply(pre_activations(x, W_enc, b_enc, b_dec), threshold, bandwidth)


def sparse_decode(values, indices, W_dec, b_dec):
    """x_hat[b] = Σ_s values[b,s] · W_dec[indices[b,s]] + b_dec."""
    out = (values.unsqueeze(-1) * W_dec[indices]).sum(-2)
    return out if b_dec is None else out + b_dec


def dense_decode(acts, W_dec, b_dec):
    out = acts @ W_dec
    return out if b_dec is None else out + b_dec


def relu_forward(x, W_enc, b_enc, b_dec, W_dec, b_dec_out):
    """Whole inference forward of a ReLU SAE (the fused kernels' oracle)."""
    return dense_decode(relu_encode(x, W_enc, b_enc, b_dec), W_dec, b_dec_out)


def jumprelu_forward(x, W_enc, b_enc, b_dec, threshold, W_dec, b_dec_out):
    pre = pre_activations(x, W_enc, b_enc, b_dec)
    return dense_decode(pre * (pre > threshold), W_dec, b_dec_out)


def topk_sae_backward(x, values, indices, grad_out, W_enc, W_dec, b_dec=None, row_sparse=False, need_dx=True):
    """Gradients of a TopK-family step, written out sparsely (the formulas of docs/design.md).

    values/indices are the post-ReLU encode result, grad_out = ∂L/∂x_hat [N, d].
    b_dec: the bias subtracted from x before encoding, or None if not applied.
    Returns dict: dvalues [N,k], dW_enc [d,n], db_enc [n], dW_dec [n,d], dx [N,d],
    db_dec [d] (decoder-bias part plus, when applied to the input, the encoder part).
    With row_sparse=True, dW_enc/db_enc/dW_dec are replaced by "rows": a RowSparseGrads
    holding only the latents that appear in `indices`. need_dx=False: dx is None (not
    computed) and db_dec's encoder part is W_enc · db_enc (the same sum, over latents).
    """
    n = W_dec.shape[0]
    xin = x - b_dec if b_dec is not None else x
    dvalues = torch.einsum("bd,bkd->bk", grad_out, W_dec[indices])
    dpre = dvalues * (values > 0)
    flat_idx = indices.reshape(-1)
    # dW_dec[j] = Σ_{idx[b,s]=j} values[b,s] · e_b
    dW_dec = torch.zeros_like(W_dec).index_add_(
        0, flat_idx, (values.unsqueeze(-1) * grad_out.unsqueeze(1)).reshape(-1, W_dec.shape[1])
    )
    # dW_enc[:, j] = Σ_{idx[b,s]=j} dpre[b,s] · x_b
    dW_enc_t = torch.zeros(n, W_enc.shape[0], dtype=W_enc.dtype, device=W_enc.device).index_add_(
        0, flat_idx, (dpre.unsqueeze(-1) * xin.unsqueeze(1)).reshape(-1, W_enc.shape[0])
    )
    db_enc = torch.zeros(n, dtype=W_enc.dtype, device=W_enc.device).index_add_(
        0, flat_idx, dpre.reshape(-1)
    )
    dxin = torch.einsum("bk,dbk->bd", dpre, W_enc[:, indices]) if need_dx else None
    db_dec = grad_out.sum(0)
    if b_dec is not None:
        db_dec = db_dec - (dxin.sum(0) if need_dx else W_enc @ db_enc)
    if row_sparse:
        latents = torch.unique(flat_idx)
        rows = RowSparseGrads(
            latents=latents,
            W_enc=dW_enc_t[latents].t(),
            b_enc=db_enc[latents],
            W_dec=dW_dec[latents],
            d_sae=n,
        )
        return {"dvalues": dvalues, "rows": rows, "dx": dxin, "db_dec": db_dec}
    return {
        "dvalues": dvalues,
        "dW_enc": dW_enc_t.t(),
        "db_enc": db_enc,
        "dW_dec": dW_dec,
        "dx": dxin,
        "db_dec": db_dec,
    }
