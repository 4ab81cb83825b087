"""Registers the Triton kernels (kernels/, installed as fastsae.kernels) as the "triton" backend.

Each kernel entry point is a torch custom op (torch.ops.fastsae_triton.*) with a fake kernel,
so torch.compile traces through it, and an autograd formula, so training works. The backward
formulas are the sparse ones of reference.topk_sae_backward: computed by the next backend of
the chain, the C++ ops (torch.ops.fastsae.*_backward: per-latent segment sums, deterministic)
wherever fastsae._C has a kernel for the device, else written in torch here. The backend has
no topk_sae_backward of its own: fastsae.ops hands it to the next backend (cpp on a CUDA build).

Devices: CUDA; under TRITON_INTERPRET=1 also CPU, so tests drive the modules through the
interpreter. FASTSAE_BACKEND=reference (or cfg.backend) still forces the reference.

Beyond the registered ops, `topk_encode_with_counts` (fire counts for dead-latent tracking)
and `relu_forward` / `jumprelu_forward` (fused encode->decode, no [B, d_sae]) are exported
for the modules and the trainer.
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from .. import ops
from ..kernels import batchtopk as _batchtopk
from ..kernels import fused_relu as _fused
from ..kernels import sparse_decoder as _decoder
from ..kernels import topk_encoder as _topk
from ..kernels.preact_tile import interpreted
from ..sparse import SparseActs

DEVICES = ("cuda", "cpu") if interpreted() else ("cuda",)
# The kernels accumulate in fp32; other dtypes (float64 oracles in tests) take the reference.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _register(op: str):
    """ops.register for the triton backend, handing dtypes the kernels lack to the next backend."""

    def deco(fn):
        @functools.wraps(fn)
        def dispatch(first, *args):
            if first.dtype not in KERNEL_DTYPES:
                return ops.next_impl(op, "triton", first.device)(first, *args)
            return fn(first, *args)

        return ops.register(op, "triton", devices=DEVICES)(dispatch)

    return deco


# ------------------------------------------------------------------ shared backward formulas
def native_backward(op: str, *tensors: Tensor):
    """torch.ops.fastsae.<op> when the C++ extension has a kernel for these tensors' device
    and they share one dtype (what its checks demand), else None."""
    try:
        from . import cpp
    except Exception:  # no extension: the torch formulas below
        return None
    t0 = tensors[0]
    if not cpp.has_kernel(op, t0.device) or any(t.dtype != t0.dtype for t in tensors):
        return None
    return getattr(torch.ops.fastsae, op)


def _encode_setup(ctx, inputs, output):
    x, W_enc, b_enc, b_dec = inputs[:4]
    values, indices = output
    ctx.has_bdec = b_dec is not None
    ctx.save_for_backward(x, W_enc, b_dec if b_dec is not None else x.new_zeros(()), values, indices)
    ctx.n_extra = len(inputs) - 4


def _encode_backward(ctx, g_values, _g_indices):
    """Gradients of values[b,s] = pre[b, indices[b,s]] where values != 0 (a padded or
    ReLU-zeroed slot passes no gradient) w.r.t. x, W_enc, b_enc and the input b_dec."""
    x, W_enc, b_dec, values, indices = ctx.saved_tensors
    d, n = W_enc.shape
    native = ctx.native and native_backward("topk_encode_backward", W_enc, values, x)
    if native:  # kept values are > 0 (ReLU'd): values != 0 is the C++ op's values > 0
        dx, dW_enc, db_enc, db_dec = native(g_values.to(W_enc.dtype), values, indices, x, W_enc,
                                            b_dec if ctx.has_bdec else None, bool(ctx.needs_input_grad[0]))
        return ((dx if ctx.needs_input_grad[0] else None), dW_enc, db_enc,
                (db_dec if ctx.has_bdec and ctx.needs_input_grad[3] else None)) + (None,) * ctx.n_extra
    dpre = (g_values * (values != 0)).to(W_enc.dtype)
    xin = x - b_dec if ctx.has_bdec else x
    flat = indices.reshape(-1)
    dx = dW_enc = db_enc = db_dec = None
    if ctx.needs_input_grad[0] or (ctx.has_bdec and ctx.needs_input_grad[3]):
        dx = torch.einsum("bs,bsd->bd", dpre, W_enc.t()[indices])
        if ctx.has_bdec and ctx.needs_input_grad[3]:
            db_dec = -dx.sum(0)
        dx = dx.to(x.dtype) if ctx.needs_input_grad[0] else None
    if ctx.needs_input_grad[1]:
        rows = (dpre.unsqueeze(-1) * xin.unsqueeze(1)).reshape(-1, d)
        dW_enc = W_enc.new_zeros((n, d)).index_add_(0, flat, rows).t()
    if ctx.needs_input_grad[2]:
        db_enc = W_enc.new_zeros((n,)).index_add_(0, flat, dpre.reshape(-1))
    return (dx, dW_enc, db_enc, db_dec) + (None,) * ctx.n_extra


# ------------------------------------------------------------------ topk_encode
@torch.library.custom_op("fastsae_triton::topk_encode", mutates_args=())
def _topk_encode_op(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Optional[Tensor], k: int) -> tuple[Tensor, Tensor]:
    return _topk.encode(x, W_enc, b_enc, b_dec, k)  # fused or chunked (choose_strategy), any k


@_topk_encode_op.register_fake
def _(x, W_enc, b_enc, b_dec, k):
    return x.new_empty((x.shape[0], k)), x.new_empty((x.shape[0], k), dtype=torch.long)


def _relu_encode_setup(ctx, inputs, output):
    """Setup of encoders whose kept values are ReLU'd (TopK, BatchTopK): the C++ backward applies."""
    _encode_setup(ctx, inputs, output)
    ctx.native = True


def _threshold_encode_setup(ctx, inputs, output):
    """A threshold may be negative, so kept values may be too: the torch formula (values != 0)."""
    _encode_setup(ctx, inputs, output)
    ctx.native = False


_topk_encode_op.register_autograd(_encode_backward, setup_context=_relu_encode_setup)


@_register("topk_encode")
def topk_encode(x, W_enc, b_enc, b_dec, k):
    return _topk_encode_op(x, W_enc, b_enc, b_dec, k)


def topk_encode_with_counts(x, W_enc, b_enc, b_dec, k):
    """(values, indices, fire_counts [d_sae] int64): counts of rows where each latent was
    selected with a positive value (dead-latent tracking). Differentiable like topk_encode."""
    values, indices = topk_encode(x, W_enc, b_enc, b_dec, k)
    counts = torch.bincount(indices[values.detach() > 0], minlength=W_enc.shape[1])
    return values, indices, counts


def _rows_of_unknown_width(x):
    """Fake (values, indices) [N, m] whose width m is only known once the kernel has run."""
    m = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty((x.shape[0], m)), x.new_empty((x.shape[0], m), dtype=torch.long)


# ------------------------------------------------------------------ batchtopk_encode
@torch.library.custom_op("fastsae_triton::batchtopk_encode", mutates_args=())
def _batchtopk_op(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Optional[Tensor], k: int) -> tuple[Tensor, Tensor]:
    return _batchtopk.batchtopk_encode(x, W_enc, b_enc, b_dec, k)


@_batchtopk_op.register_fake
def _(x, W_enc, b_enc, b_dec, k):
    return _rows_of_unknown_width(x)


_batchtopk_op.register_autograd(_encode_backward, setup_context=_relu_encode_setup)


@_register("batchtopk_encode")
def batchtopk_encode(x, W_enc, b_enc, b_dec, k):
    values, indices = _batchtopk_op(x, W_enc, b_enc, b_dec, k)
    return SparseActs(values, indices, W_enc.shape[1])


# ------------------------------------------------------------------ threshold_encode
@torch.library.custom_op("fastsae_triton::threshold_encode", mutates_args=())
def _threshold_op(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Optional[Tensor],
                  threshold: Tensor) -> tuple[Tensor, Tensor]:
    r = _fused.fused_threshold(x, W_enc, b_enc, b_dec, threshold)
    return r.values, r.indices


@_threshold_op.register_fake
def _(x, W_enc, b_enc, b_dec, threshold):
    return _rows_of_unknown_width(x)


# The threshold itself gets no gradient here (BatchTopK's is a buffer); JumpReLU training
# needs the straight-through estimator and goes through the reference.
_threshold_op.register_autograd(_encode_backward, setup_context=_threshold_encode_setup)


@_register("threshold_encode")
def threshold_encode(x, W_enc, b_enc, b_dec, threshold):
    threshold = torch.as_tensor(threshold, dtype=W_enc.dtype, device=W_enc.device)
    values, indices = _threshold_op(x, W_enc, b_enc, b_dec, threshold)
    return SparseActs(values, indices, W_enc.shape[1])


# ------------------------------------------------------------------ sparse_decode
@torch.library.custom_op("fastsae_triton::sparse_decode", mutates_args=())
def _sparse_decode_op(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Optional[Tensor]) -> Tensor:
    return _decoder.sparse_decode(values, indices, W_dec, b_dec)


@_sparse_decode_op.register_fake
def _(values, indices, W_dec, b_dec):
    return W_dec.new_empty((values.shape[0], W_dec.shape[1]))


def _decode_setup(ctx, inputs, output):
    values, indices, W_dec, b_dec = inputs
    ctx.has_bdec = b_dec is not None
    ctx.save_for_backward(values, indices, W_dec)


def _decode_backward(ctx, grad):
    """dvalues[b,s] = <g_b, W_dec[idx]>, dW_dec[j] = Σ_{idx[b,s]=j} values[b,s]·g_b, db_dec = Σ_b g_b."""
    values, indices, W_dec = ctx.saved_tensors
    g = grad.to(W_dec.dtype)
    db_dec = g.sum(0) if ctx.has_bdec and ctx.needs_input_grad[3] else None
    native = native_backward("sparse_decode_backward", W_dec)
    if native and (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]):
        dvalues, dW_dec = native(g, values.to(W_dec.dtype), indices, W_dec)
        return (dvalues.to(values.dtype) if ctx.needs_input_grad[0] else None, None,
                dW_dec if ctx.needs_input_grad[2] else None, db_dec)
    dvalues = dW_dec = None
    if ctx.needs_input_grad[0]:
        dvalues = (W_dec[indices] * g.unsqueeze(1)).sum(-1).to(values.dtype)
    if ctx.needs_input_grad[2]:
        outer = values.to(W_dec.dtype).unsqueeze(-1) * g.unsqueeze(1)
        dW_dec = torch.zeros_like(W_dec).index_add_(0, indices.reshape(-1), outer.reshape(-1, W_dec.shape[1]))
    return dvalues, None, dW_dec, db_dec


_sparse_decode_op.register_autograd(_decode_backward, setup_context=_decode_setup)


@_register("sparse_decode")
def sparse_decode(values, indices, W_dec, b_dec):
    return _sparse_decode_op(values, indices, W_dec, b_dec)


# ------------------------------------------------------------------ fused ReLU / JumpReLU forward
@torch.no_grad()
def relu_forward(x, W_enc, b_enc, b_dec_in, W_dec, b_dec, capacity=None) -> _fused.FusedResult:
    """Inference forward of a ReLU SAE in one pass: x_hat, compact acts, per-row L0 and
    L1 weighted by ‖W_dec[j]‖ (StandardSAE's penalty). No autograd: training uses relu_encode."""
    zero = torch.zeros((), dtype=W_enc.dtype, device=W_enc.device)
    return _fused.fused_threshold(x, W_enc, b_enc, b_dec_in, zero, W_dec, b_dec,
                                  l1_weight=W_dec.float().norm(dim=1), capacity=capacity)


@torch.no_grad()
def jumprelu_forward(x, W_enc, b_enc, b_dec_in, threshold, W_dec, b_dec, capacity=None) -> _fused.FusedResult:
    """Inference forward of a JumpReLU SAE in one pass (see relu_forward)."""
    return _fused.fused_threshold(x, W_enc, b_enc, b_dec_in, threshold, W_dec, b_dec, capacity=capacity)


# The ops-table entries: the modules' no-grad forward only needs x_hat.
@_register("relu_forward")
def _relu_forward_x_hat(x, W_enc, b_enc, b_dec_in, W_dec, b_dec):
    return relu_forward(x, W_enc, b_enc, b_dec_in, W_dec, b_dec).x_hat


@_register("jumprelu_forward")
def _jumprelu_forward_x_hat(x, W_enc, b_enc, b_dec_in, threshold, W_dec, b_dec):
    return jumprelu_forward(x, W_enc, b_enc, b_dec_in, threshold, W_dec, b_dec).x_hat
