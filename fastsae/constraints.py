"""Unit-norm decoder rows, kept by projecting the gradient onto each row's tangent space
(removing the component parallel to the row) and renormalising after the step.

Both halves are single vectorised passes over the rows they touch, so they work the same
on a dense [n, d] gradient and on the few rows of a row-sparse one.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def remove_parallel_component_(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """grad[j] -= ⟨grad[j], ŵ_j⟩ ŵ_j for every row, in place (ŵ_j = rows[j]/‖rows[j]‖).

    grad and rows have the same shape [m, d] (all rows, or the touched rows of a row-sparse
    gradient). The dot product is taken in fp32 for bf16 weights.
    """
    w = rows.float()
    inv_sq = 1.0 / w.pow(2).sum(-1, keepdim=True).clamp_min(1e-24)
    coef = (grad.float() * w).sum(-1, keepdim=True) * inv_sq
    grad.sub_((coef * w).to(grad.dtype))
    return grad


@torch.no_grad()
def normalize_rows_(weight: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Rescale rows of `weight` [n, d] to unit norm, in place; only rows `index` when given."""
    rows = weight if index is None else weight[index]
    unit = rows.float() / rows.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if index is None:
        weight.copy_(unit.to(weight.dtype))
    else:
        weight.index_copy_(0, index, unit.to(weight.dtype))
    return weight
