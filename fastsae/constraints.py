"""Unit-norm decoder rows, kept by projecting the gradient onto each row's tangent space
(removing the component parallel to the row) and renormalising after the step.

Both halves are single vectorised passes over the rows they touch, so they work the same
on a dense [n, d] gradient and on the few rows of a row-sparse one. On CPU the C++
extension does each in one pass on contiguous fp32 matrices (ops remove_parallel_component_
and normalize_rows_); DenseAdam.step_row_sparse's buffer builder (op dense_grads_from_rows_)
applies the same projection code to the rows it writes.
"""

from __future__ import annotations

import torch

from . import ops


def _fp32_matrix(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.dim() == 2 and t.is_contiguous()


@torch.no_grad()
def remove_parallel_component_(grad: torch.Tensor, rows: torch.Tensor, native: bool = True) -> torch.Tensor:
    """grad[j] -= ⟨grad[j], ŵ_j⟩ ŵ_j for every row, in place (ŵ_j = rows[j]/‖rows[j]‖).

    grad and rows have the same shape [m, d] (all rows, or the touched rows of a row-sparse
    gradient). The dot product is taken in fp32 for bf16 weights. Contiguous fp32 CPU
    tensors go through the C++ op, the projection DenseAdam.step_row_sparse's buffer builder
    applies, so the dense and the row-sparse step agree to the bit; native=False forces the
    plain-PyTorch path.
    """
    if native and _fp32_matrix(grad) and _fp32_matrix(rows) and grad.shape == rows.shape:
        op = ops.native("remove_parallel_component_", grad.device)
        if op is not None:
            op(grad, rows)
            return grad
    w = rows.float()
    inv_sq = 1.0 / w.pow(2).sum(-1, keepdim=True).clamp_min(1e-24)
    coef = (grad.float() * w).sum(-1, keepdim=True) * inv_sq
    grad.sub_((coef * w).to(grad.dtype))
    return grad


@torch.no_grad()
def normalize_rows_(weight: torch.Tensor, index: torch.Tensor | None = None, native: bool = True) -> torch.Tensor:
    """Rescale rows of `weight` [n, d] to unit norm, in place; only rows `index` when given.

    All rows of a contiguous fp32 CPU matrix go through the C++ op (one pass instead of five
    torch ops: a fifth of a dense Adam step at d_sae = 4096); native=False forces the
    plain-PyTorch path (tests, benchmarks)."""
    if native and index is None and _fp32_matrix(weight):
        op = ops.native("normalize_rows_", weight.device)
        if op is not None:
            op(weight)
            return weight
    rows = weight if index is None else weight[index]
    unit = rows.float() / rows.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if index is None:
        weight.copy_(unit.to(weight.dtype))
    else:
        weight.index_copy_(0, index, unit.to(weight.dtype))
    return weight
