"""The communication the sharded SAE needs, with errors that say what happened.

* checked collectives: a collective that fails (a peer rank exited, or the group's timeout
  passed) raises DistributedError naming this rank, the collective and what to do, instead
  of a bare backend error or a hang.
* two autograd functions for tensors replicated across a replica group (Megatron's f / g):
  `sum_over_group` sums partial results (all_reduce forward, identity backward: every rank
  then computes the same loss, so each already holds the full gradient), and
  `enter_group` marks a replicated input that each rank uses for its own part (identity
  forward, all_reduce backward: the input's gradient is the sum of the parts).
A group of None means "this rank alone": every function is then the identity.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from ..errors import FastSAEError

T = TypeVar("T")
_timeout_s: float | None = None  # the layout's collective timeout, for error messages


def set_timeout(seconds: float) -> None:
    global _timeout_s
    _timeout_s = seconds


class DistributedError(FastSAEError, RuntimeError):
    """A collective failed: another rank died, stalled past the timeout, or disagreed."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def checked(what: str, fn: Callable[[], T]) -> T:
    """Run collective `fn`; turn a backend failure into a DistributedError that says so."""
    timeout_s = _timeout_s
    start = time.monotonic()
    try:
        return fn()
    except Exception as e:  # gloo/NCCL raise RuntimeError or DistBackendError subclasses
        if isinstance(e, FastSAEError):
            raise
        waited = time.monotonic() - start
        first = (str(e).strip().splitlines() or [""])[0][:300]
        limit = f"{timeout_s:g} s" if timeout_s else "the group's timeout"
        raise DistributedError(
            f"rank {_rank()}: {what} failed after {waited:.1f} s ({type(e).__name__}: {first}). "
            f"Another rank has most likely exited or stalled (collectives wait at most {limit}; set "
            "FASTSAE_DIST_TIMEOUT to change it). This job cannot continue: find the first error in the "
            "other ranks' output, fix it, and restart from the last checkpoint."
        ) from e


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_gather(t: torch.Tensor, group, what: str = "all_gather") -> list[torch.Tensor]:
    """Every group member's `t` (same shape on all), in group-rank order. Not differentiable."""
    if group is None:
        return [t]
    t = t.detach().contiguous()
    out = [torch.empty_like(t) for _ in range(group_size(group))]
    checked(what, lambda: dist.all_gather(out, t, group=group))
    return out


def all_reduce_(t: torch.Tensor, group, op=dist.ReduceOp.SUM, what: str = "all_reduce") -> torch.Tensor:
    """In-place all_reduce of a tensor outside autograd; returns t."""
    if group is not None:
        checked(what, lambda: dist.all_reduce(t, op=op, group=group))
    return t


def max_over_group(value: int, group, what: str = "all_reduce(max)") -> int:
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    return int(all_reduce_(t, group, dist.ReduceOp.MAX, what).item())


def all_gather_padded(t: torch.Tensor, group, pad_value, what: str = "all_gather") -> torch.Tensor:
    """Concatenate every member's t [..., m_r] along the last dim, padding each to the
    largest m_r with pad_value first (members may hold different widths)."""
    if group is None:
        return t
    width = max_over_group(t.shape[-1], group, what + " (width)")
    if t.shape[-1] < width:
        pad = t.new_full((*t.shape[:-1], width - t.shape[-1]), pad_value)
        t = torch.cat([t, pad], -1)
    return torch.cat(all_gather(t, group, what), -1)


class _SumOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group, what):
        out = t.clone()
        checked(what, lambda: dist.all_reduce(out, group=group))
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _EnterGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group, what):
        ctx.group, ctx.what = group, what
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        checked(ctx.what + " (backward)", lambda: dist.all_reduce(grad, group=ctx.group))
        return grad, None, None


def sum_over_group(t: torch.Tensor, group, what: str = "sum of partial results") -> torch.Tensor:
    """Σ over the group of each member's t; the gradient passes through unchanged (every
    member computes the same loss from the sum)."""
    if group is None:
        return t
    return _SumOverGroup.apply(t.contiguous(), group, what)


def enter_group(t: torch.Tensor, group, what: str = "sum of input gradients") -> torch.Tensor:
    """t unchanged; in backward, the gradients the members computed for t are summed."""
    if group is None:
        return t
    return _EnterGroup.apply(t, group, what)
