"""Data parallel on top of latent sharding: replicas of each shard see different batches and
average their gradients within their shard group (the ranks holding the same latents).

Dense gradients (autograd path) are averaged in one flat all_reduce per step; row-sparse
gradients (the TopK explicit backward) are merged over the union of the latents any replica
touched, so nothing O(d_sae) is communicated. The mean over replicas of each replica's
batch-mean loss is the loss of the whole global batch when replicas take equal batches, so
the step equals the single-process step on the concatenated batch (for TopK, ReLU and
JumpReLU; BatchTopK selects per replica batch, as any data-parallel BatchTopK does).

Also here: what the Trainer needs from the layout each step (which batch a rank trains on,
agreeing on a branch, gathering fired latents, averaging logged metrics).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..sparse import RowSparseGrads
from .collectives import all_gather, all_gather_padded, all_reduce_, checked, max_over_group
from .groups import ParallelLayout


def reduce_gradients(module: nn.Module, layout: ParallelLayout) -> None:
    """Average .grad of every trainable parameter over the shard group (call after backward,
    before the optimizer step). A parameter without a gradient counts as zero, so replicas
    always exchange the same tensors."""
    group = layout.shard_group
    if group is None:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    all_reduce_(flat, group, what="all_reduce of the gradients over the replicas")
    flat /= layout.replicas
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)


@torch.no_grad()
def reduce_row_sparse(rows: RowSparseGrads, db_dec: torch.Tensor, layout: ParallelLayout):
    """Average a row-sparse gradient (and the dense db_dec) over the shard group: the result
    covers the union of the latents any replica touched; a latent one replica did not touch
    contributes zero from it."""
    group = layout.shard_group
    if group is None:
        return rows, db_dec
    d = rows.W_dec.shape[1]
    # one [u, 2d+1] row per touched latent: its W_enc column, W_dec row and b_enc; padded to the
    # widest replica's u with id -1 and zeros, which all land in one slot that is dropped
    block = torch.cat([rows.W_enc.t(), rows.W_dec.to(rows.W_enc.dtype), rows.b_enc.unsqueeze(1)], 1)
    width = max_over_group(block.shape[0], group, "all_reduce(max) of the touched latents' count")
    fill = width - block.shape[0]
    ids = torch.cat([rows.latents, rows.latents.new_full((fill,), -1)])
    block = torch.cat([block, block.new_zeros(fill, block.shape[1])])
    ids = torch.cat(all_gather(ids, group, "all_gather of the touched latents"))
    blocks = torch.cat(all_gather(block, group, "all_gather of the row-sparse gradients"))
    latents, inverse = torch.unique(ids, return_inverse=True)
    summed = blocks.new_zeros(latents.numel(), blocks.shape[1]).index_add_(0, inverse, blocks)
    if latents.numel() and int(latents[0]) < 0:  # the padding's slot (unique sorts it first)
        latents, summed = latents[1:], summed[1:]
    summed /= layout.replicas
    db = all_reduce_(db_dec.clone(), group, what="all_reduce of b_dec's gradient over the replicas")
    merged = RowSparseGrads(latents, summed[:, :d].t(), summed[:, 2 * d], summed[:, d:2 * d].to(rows.W_dec.dtype),
                            rows.d_sae)
    return merged, db / layout.replicas


@torch.no_grad()
def broadcast_parameters(module: nn.Module, layout: ParallelLayout) -> None:
    """Make the replicas identical: every shard takes replica 0's copy, and the replicated
    tensors (b_dec, ...) that are not split over latents take shard 0's copy first."""
    if layout.replica_group is not None:
        src = layout.replica_ranks()[0]
        split = getattr(module, "_is_latent", lambda name: False)
        for name, t in module.state_dict().items():
            if not split(name):
                checked(f"broadcast of {name} over the shards",
                        lambda t=t: dist.broadcast(t, src=src, group=layout.replica_group))
    if layout.shard_group is not None:
        src = layout.shard_ranks()[0]
        for name, t in module.state_dict().items():
            checked(f"broadcast of {name} over the replicas",
                    lambda t=t: dist.broadcast(t, src=src, group=layout.shard_group))


# ---------------------------------------------------------------------- the trainer's helpers
# fastsae.trainer.Trainer calls these on every layout; on a single-process one they are
# pass-throughs with no collective.

def all_ranks_agree(flags: list[bool], layout: ParallelLayout, device) -> list[bool]:
    """Each flag AND-ed over every rank (one all_reduce), so all ranks take the same branch
    (skip a batch, stop, raise) and none is left waiting in a collective."""
    if layout.world_size == 1:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int64, device=device)
    checked("all_reduce of the step's go/no-go flags", lambda: dist.all_reduce(t, op=dist.ReduceOp.MIN))
    return [bool(v) for v in t.tolist()]


def replica_batches(source, layout: ParallelLayout, device, dtype):
    """This rank's batches [N, d] from the run's batch stream. Replica r keeps the r-th of
    every R batches (replicas see disjoint data; the global batch is R x batch_size rows).
    Only each replica's shard 0 reads; it broadcasts the batch to the replica's other shards.
    Ends on every rank as soon as the stream ends on any replica."""
    if layout.world_size == 1:
        for b in source:
            yield b.reshape(-1, b.shape[-1])
        return
    batches = iter(source) if layout.shard == 0 else None
    src = layout.replica_ranks()[0]
    while True:
        x = None
        if batches is not None:
            try:
                for i in range(layout.replicas):
                    b = next(batches)
                    if i == layout.replica:
                        x = b.reshape(-1, b.shape[-1])
            except StopIteration:
                x = None
        shape = torch.tensor([-1, -1] if x is None else list(x.shape), dtype=torch.int64, device=device)
        if layout.replica_group is not None:
            checked("broadcast of the batch shape",
                    lambda: dist.broadcast(shape, src, group=layout.replica_group))  # noqa: B023 (called at once)
        if not all_ranks_agree([int(shape[0]) >= 0], layout, device)[0]:
            return
        if x is None:
            x = torch.empty(shape.tolist(), dtype=dtype, device=device)
        else:
            x = x.to(device, dtype).contiguous()
        if layout.replica_group is not None:
            checked("broadcast of the batch", lambda: dist.broadcast(x, src, group=layout.replica_group))  # noqa: B023
        yield x


@torch.no_grad()
def average_buffers(module: nn.Module, layout: ParallelLayout) -> None:
    """Average floating-point buffers over the replicas. BatchTopK's inference threshold is
    an EMA of each replica's own batches; averaging it every step keeps the replicas identical."""
    if layout.shard_group is None:
        return
    for name, b in module.named_buffers():
        if b.is_floating_point():
            all_reduce_(b, layout.shard_group, what=f"all_reduce of buffer {name} over the replicas")
            b /= layout.replicas


def gather_fired(fired: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """The latent ids that fired on any replica (each rank's dead-latent tracker, and with it
    AuxK, then sees the whole global batch and stays identical everywhere)."""
    if layout.shard_group is None:
        return fired
    ids = all_gather_padded(fired.unsqueeze(0), layout.shard_group, -1, "all_gather of the fired latents")[0]
    return ids[ids >= 0]


def replica_mean(scalars: dict[str, float], layout: ParallelLayout, device) -> dict[str, float]:
    """The step's logged numbers as the mean over the replicas (each saw a different batch)."""
    if layout.shard_group is None:
        return scalars
    keys = sorted(scalars)
    t = torch.tensor([scalars[k] for k in keys], dtype=torch.float64, device=device)
    all_reduce_(t, layout.shard_group, what="all_reduce of the step's metrics")
    return {k: v / layout.replicas for k, v in zip(keys, t.tolist())}
