"""Registers the ops of the C++ extension (fastsae._C) as the "cpp" backend.

Each op is a torch custom op (torch.ops.fastsae.*) with a fake kernel, so
torch.compile traces it, and an autograd formula, so training works through it.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.fastsae.*)
from . import ops

_DEVICES = ("cpu", "cuda") if _C.cuda_built() else ("cpu",)


@torch.library.register_fake("fastsae::sparse_decode")
def _sparse_decode_fake(values, indices, W_dec, b_dec):
    return W_dec.new_empty((values.shape[0], W_dec.shape[1]))


def _sparse_decode_setup(ctx, inputs, output):
    values, indices, W_dec, b_dec = inputs
    ctx.save_for_backward(values, indices, W_dec)
    ctx.has_bias = b_dec is not None


def _sparse_decode_backward(ctx, grad):
    values, indices, W_dec = ctx.saved_tensors
    grad = grad.to(W_dec.dtype)
    dvalues = torch.einsum("bd,bkd->bk", grad, W_dec[indices]).to(values.dtype)
    dW_dec = torch.zeros_like(W_dec).index_add_(
        0, indices.reshape(-1), (values.to(W_dec.dtype).unsqueeze(-1) * grad.unsqueeze(1)).reshape(-1, W_dec.shape[1])
    )
    db_dec = grad.sum(0) if ctx.has_bias else None
    return dvalues, None, dW_dec, db_dec


torch.library.register_autograd(
    "fastsae::sparse_decode", _sparse_decode_backward, setup_context=_sparse_decode_setup
)


@ops.register("sparse_decode", "cpp", devices=_DEVICES)
def sparse_decode(values, indices, W_dec, b_dec):
    return torch.ops.fastsae.sparse_decode(values, indices, W_dec, b_dec)
