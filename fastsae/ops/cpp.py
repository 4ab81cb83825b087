"""Registers the ops of the C++ extension (fastsae._C) as the "cpp" backend.

Each op is a torch custom op (torch.ops.fastsae.*) with a fake kernel, so torch.compile
traces it; the forward ops also get an autograd formula whose backward is itself a C++ op:

    topk_encode, batchtopk_encode, threshold_encode
                     -> topk_encode_backward   (dW_enc, db_enc, dx, encoder part of db_dec)
    sparse_decode    -> sparse_decode_backward (dvalues, dW_dec)
    topk_encode_dead: topk_encode plus AuxK's selection among dead latents in the same pass
                      (no autograd: the training step's selection)
    topk_sae_backward: the whole sparse backward of a TopK-family step, outside autograd,
                       dense-shaped or row-sparse (reference.topk_sae_backward's contract).

The backward ops group the B*k entries by latent (CSR: a counting sort on CPU, a stable sort
on CUDA) and give each latent's sums to one worker, so gradients are bit-identical from run to run. An op without
a kernel for the tensors' device falls back to the reference implementation.
"""

from __future__ import annotations

import functools

import torch

from .. import (
    _C,  # noqa: F401  (loading the library registers torch.ops.fastsae.*)
    ops,
)
from ..sparse import RowSparseGrads, SparseActs
from . import reference

_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


def has_kernel(op: str, device: torch.device | str) -> bool:
    """Whether torch.ops.fastsae.<op> has a native kernel for tensors on `device`."""
    key = _DISPATCH_KEY.get(torch.device(device).type)
    return key is not None and _registered(op, key)


@functools.cache
def _registered(op: str, key: str) -> bool:
    # the library registered every kernel when it loaded (above): the answer cannot change,
    # and the dispatcher query costs ~6 us, several times a training step
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastsae::{op}", key)


def _devices(op: str) -> tuple[str, ...]:
    """The devices the "cpp" backend registers `op` for: those with a native kernel (a CUDA
    build has the sparse decode and backward on CUDA, not the encoders), so the chain of a
    device without one moves on to the next backend instead of landing here."""
    return tuple(d for d in _DISPATCH_KEY if has_kernel(op, d))


# ---------------------------------------------------------------- fake kernels
@torch.library.register_fake("fastsae::sparse_decode")
def _sparse_decode_fake(values, indices, W_dec, b_dec):
    return W_dec.new_empty((values.shape[0], W_dec.shape[1]))


@torch.library.register_fake("fastsae::sparse_decode_backward")
def _sparse_decode_backward_fake(grad, values, indices, W_dec):
    return values.new_empty(values.shape), torch.empty_like(W_dec, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastsae::topk_encode")
def _topk_encode_fake(x, W_enc, b_enc, b_dec, k):
    torch._check(0 <= k <= W_enc.shape[1], lambda: f"topk_encode: k={k} must lie in [0, d_sae]")
    return x.new_empty((x.shape[0], k)), x.new_empty((x.shape[0], k), dtype=torch.long)


@torch.library.register_fake("fastsae::topk_encode_dead")
def _topk_encode_dead_fake(x, W_enc, b_enc, b_dec, k, dead, k_aux):
    torch._check(0 <= k <= W_enc.shape[1], lambda: f"topk_encode_dead: k={k} must lie in [0, d_sae]")
    ka = min(k_aux, dead.shape[0])
    return (x.new_empty((x.shape[0], k)), x.new_empty((x.shape[0], k), dtype=torch.long),
            x.new_empty((x.shape[0], ka)), x.new_empty((x.shape[0], ka), dtype=torch.long))


def _padded_rows_fake(x, W_enc, b_enc, b_dec, *_):
    m = torch.library.get_ctx().new_dynamic_size()  # the longest row's number of kept latents
    return x.new_empty((x.shape[0], m)), x.new_empty((x.shape[0], m), dtype=torch.long)


torch.library.register_fake("fastsae::batchtopk_encode")(_padded_rows_fake)
torch.library.register_fake("fastsae::threshold_encode")(_padded_rows_fake)


@torch.library.register_fake("fastsae::topk_encode_backward")
def _topk_encode_backward_fake(dvalues, values, indices, x, W_enc, b_dec, need_dx):
    d, n = W_enc.shape
    dx = x.new_empty((x.shape[0] if need_dx else 0, d))
    return dx, W_enc.new_empty((d, n)), W_enc.new_empty((n,)), W_enc.new_empty((d,))


@torch.library.register_fake("fastsae::topk_sae_backward")
def _topk_sae_backward_fake(x, values, indices, grad_out, W_enc, W_dec, b_dec, row_sparse, need_dx=True):
    n, d = W_dec.shape
    u = torch.library.get_ctx().new_dynamic_size()  # how many distinct latents fired
    rows = u if row_sparse else n
    dW_enc = W_dec.new_empty((u, d)) if row_sparse else W_enc.new_empty((d, n))
    return (
        values.new_empty(values.shape),
        indices.new_empty((u,)),
        dW_enc,
        W_dec.new_empty((rows,)),
        W_dec.new_empty((rows, d)),
        x.new_empty((x.shape[0] if need_dx else 0, d)),
        W_dec.new_empty((d,)),
    )


# ---------------------------------------------------------------- autograd
def _sparse_decode_setup(ctx, inputs, output):
    values, indices, W_dec, b_dec = inputs
    ctx.save_for_backward(values, indices, W_dec)
    ctx.has_bias = b_dec is not None


def _sparse_decode_backward(ctx, grad):
    values, indices, W_dec = ctx.saved_tensors
    dvalues, dW_dec = torch.ops.fastsae.sparse_decode_backward(
        grad.to(W_dec.dtype), values.to(W_dec.dtype), indices, W_dec
    )
    db_dec = grad.sum(0) if ctx.has_bias else None
    return dvalues.to(values.dtype), None, dW_dec, db_dec


torch.library.register_autograd(
    "fastsae::sparse_decode", _sparse_decode_backward, setup_context=_sparse_decode_setup
)


def _topk_encode_setup(ctx, inputs, output):
    x, W_enc, b_enc, b_dec, k = inputs
    values, indices = output
    ctx.has_b_dec = b_dec is not None
    ctx.save_for_backward(x, W_enc, values, indices, *([b_dec] if ctx.has_b_dec else []))
    ctx.mark_non_differentiable(indices)


def _topk_encode_backward(ctx, grad_values, grad_indices):
    x, W_enc, values, indices, *rest = ctx.saved_tensors
    b_dec = rest[0] if ctx.has_b_dec else None
    need_dx = ctx.needs_input_grad[0]
    dx, dW_enc, db_enc, db_dec = torch.ops.fastsae.topk_encode_backward(
        grad_values.to(W_enc.dtype), values, indices, x, W_enc, b_dec, need_dx
    )
    return dx if need_dx else None, dW_enc, db_enc, db_dec if ctx.has_b_dec else None, None


# Kept values are ReLU'd pre-activations (TopK, BatchTopK) or pre-activations above a
# non-negative threshold: in all cases dpre = dvalues * 1[values > 0], topk_encode_backward.
# (The last input, k or the threshold, gets no gradient: the comparison has none.)
for _op in ("topk_encode", "batchtopk_encode", "threshold_encode"):
    torch.library.register_autograd(f"fastsae::{_op}", _topk_encode_backward, setup_context=_topk_encode_setup)


# ---------------------------------------------------------------- the "cpp" backend
@ops.register("sparse_decode", "cpp", devices=_devices("sparse_decode"))
def sparse_decode(values, indices, W_dec, b_dec):
    if not has_kernel("sparse_decode", W_dec.device):
        return reference.sparse_decode(values, indices, W_dec, b_dec)
    return torch.ops.fastsae.sparse_decode(values, indices, W_dec, b_dec)


@ops.register("topk_encode", "cpp", devices=_devices("topk_encode"))
def topk_encode(x, W_enc, b_enc, b_dec, k: int):
    if not has_kernel("topk_encode", W_enc.device):
        return reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    return torch.ops.fastsae.topk_encode(x, W_enc, b_enc, b_dec, int(k))


@ops.register("topk_encode_dead", "cpp", devices=_devices("topk_encode_dead"))
def topk_encode_dead(x, W_enc, b_enc, b_dec, k: int, dead, k_aux: int):
    if not has_kernel("topk_encode_dead", W_enc.device):
        return reference.topk_encode_dead(x, W_enc, b_enc, b_dec, k, dead, k_aux)
    return torch.ops.fastsae.topk_encode_dead(x, W_enc, b_enc, b_dec, int(k), dead, int(k_aux))


@ops.register("batchtopk_encode", "cpp", devices=_devices("batchtopk_encode"))
def batchtopk_encode(x, W_enc, b_enc, b_dec, k: int) -> SparseActs:
    if not has_kernel("batchtopk_encode", W_enc.device):
        return reference.batchtopk_encode(x, W_enc, b_enc, b_dec, k)
    values, indices = torch.ops.fastsae.batchtopk_encode(x, W_enc, b_enc, b_dec, int(k))
    return SparseActs(values, indices, W_enc.shape[1])


@ops.register("threshold_encode", "cpp", devices=_devices("threshold_encode"))
def threshold_encode(x, W_enc, b_enc, b_dec, threshold) -> SparseActs:
    threshold = torch.as_tensor(threshold, dtype=W_enc.dtype, device=W_enc.device)
    # The gradient formula masks by values > 0, which holds for kept entries only when the
    # threshold is non-negative; otherwise (or without a kernel) the reference does it.
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, W_enc, b_enc, b_dec))
    if not has_kernel("threshold_encode", W_enc.device) or (needs_grad and bool((threshold < 0).any())):
        return reference.threshold_encode(x, W_enc, b_enc, b_dec, threshold)
    values, indices = torch.ops.fastsae.threshold_encode(x, W_enc, b_enc, b_dec, threshold)
    return SparseActs(values, indices, W_enc.shape[1])


@ops.register("topk_sae_backward", "cpp", devices=_devices("topk_sae_backward"))
def topk_sae_backward(x, values, indices, grad_out, W_enc, W_dec, b_dec=None, row_sparse=False, need_dx=True):
    """reference.topk_sae_backward's contract, computed by one C++ op (no autograd involved)."""
    if not has_kernel("topk_sae_backward", W_dec.device):
        return reference.topk_sae_backward(x, values, indices, grad_out, W_enc, W_dec, b_dec, row_sparse, need_dx)
    dvalues, latents, dW_enc, db_enc, dW_dec, dx, db_dec = torch.ops.fastsae.topk_sae_backward(
        x, values, indices, grad_out, W_enc, W_dec, b_dec, bool(row_sparse), bool(need_dx)
    )
    dx = dx if need_dx else None
    if row_sparse:
        rows = RowSparseGrads(latents=latents, W_enc=dW_enc.t(), b_enc=db_enc, W_dec=dW_dec,
                              d_sae=W_dec.shape[0])
        return {"dvalues": dvalues, "rows": rows, "dx": dx, "db_dec": db_dec}
    return {"dvalues": dvalues, "dW_enc": dW_enc, "db_enc": db_enc, "dW_dec": dW_dec, "dx": dx,
            "db_dec": db_dec}


# ---------------------------------------------------------------- the dense optimizer's helpers
# In-place ops outside the op table (fastsae.ops.native): fake kernels so torch.compile can trace them.
@torch.library.register_fake("fastsae::dense_grads_from_rows_")
def _dense_grads_from_rows_fake(gW_enc, gb_enc, gW_dec, latents, rW_enc, rb_enc, rW_dec, W_dec_master):
    return None


@torch.library.register_fake("fastsae::remove_parallel_component_")
def _remove_parallel_component_fake(grad, rows):
    return None


@torch.library.register_fake("fastsae::normalize_rows_")
def _normalize_rows_fake(weight):
    return None
