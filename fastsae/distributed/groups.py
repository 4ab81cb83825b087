"""The distributed parallel context: fastsae.parallel's replicas x shards over torch.distributed.

Rank r holds latent shard `r % shards` of replica `r // shards`. Two kinds of groups:

* replica group: the `shards` ranks that together hold one whole SAE. They see the same
  batch, gather each other's top-k candidates and sum their partial reconstructions.
* shard group: the `replicas` ranks that hold the same latent slice. They see different
  batches and average their gradients (data parallel). The mean over replicas of each
  replica's batch-mean loss is the loss of the whole global batch when replicas take equal
  batches, so a step equals the single-process step on the concatenated batch (for TopK,
  ReLU and JumpReLU; BatchTopK selects per replica batch, as any data-parallel BatchTopK does).

Every collective waits at most `timeout_s` (default 600 s, env FASTSAE_DIST_TIMEOUT), so a
rank that dies or stalls turns into an error on the others instead of a hang.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..errors import ConfigError
from ..parallel import LOCAL, ParallelContext
from ..sparse import RowSparseGrads, Selection, SparseActs
from .collectives import (
    all_gather,
    all_gather_padded,
    all_reduce_,
    checked,
    enter_group,
    group_rank,
    max_over_group,
    set_timeout,
    sum_over_group,
)

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "FASTSAE_DIST_TIMEOUT"


def default_timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds: set it to e.g. 600") from None
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be > 0 seconds, got {raw}")
    return value


@dataclass(frozen=True, eq=False, repr=False)
class ParallelLayout(ParallelContext):
    """fastsae.parallel.ParallelContext over torch.distributed process groups.

    replica group: the `shards` ranks that together hold one whole SAE (same batch; merge
    top-k candidates, sum partial reconstructions). shard group: the `replicas` ranks that
    hold the same latent slice (different batches; average gradients). A group is None when
    it would hold only this rank, and every collective over it is then the identity.
    """

    replicas: int = 1
    shards: int = 1
    rank: int = 0
    replica_group: Any = None
    shard_group: Any = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    def replica_ranks(self, replica: int | None = None) -> list[int]:
        r = self.replica if replica is None else replica
        return [r * self.shards + s for s in range(self.shards)]

    def shard_ranks(self, shard: int | None = None) -> list[int]:
        s = self.shard if shard is None else shard
        return [r * self.shards + s for r in range(self.replicas)]

    # ------------------------------------------------------------ the shards of one SAE
    def enter_shards(self, t):
        return enter_group(t, self.replica_group, "summing the encoder input's gradient over the shards")

    def sum_shards(self, t, what="the partial reconstructions"):
        return sum_over_group(t, self.replica_group, f"all_reduce of {what} over the shards")

    def sum_shards_(self, t):
        return all_reduce_(t, self.replica_group, what="all_reduce over the shards")

    def merge_topk(self, vals, idx, k, start, width, d_sae, what="top-k"):
        group = self.replica_group
        if group is None:
            return super().merge_topk(vals, idx, k, start, width, d_sae, what)
        if vals.shape[1] < width:  # every shard sends `width` candidates, so all_gather fits
            fill = width - vals.shape[1]
            vals = torch.cat([vals, vals.new_full((vals.shape[0], fill), float("-inf"))], 1)
            idx = torch.cat([idx, idx.new_zeros((idx.shape[0], fill))], 1)
        cand_v = all_gather(vals, group, f"all_gather of the {what} candidate values")
        cand_i = all_gather(idx + start, group, f"all_gather of the {what} candidate ids")
        me = group_rank(group)
        cand_v[me] = vals  # this shard's own candidates keep their autograd history
        top_v, pos = torch.cat(cand_v, 1).topk(k, dim=1)
        gidx = torch.cat(cand_i, 1).gather(1, pos)
        own = (pos // width) == me
        local = torch.where(own, gidx - start, torch.zeros_like(gidx))
        return Selection(top_v.masked_fill(~own, 0), local, SparseActs(top_v.detach(), gidx, d_sae))

    def gather_selection(self, values, local, start, d_sae):
        if self.replica_group is None:
            return super().gather_selection(values, local, start, d_sae)
        gv = all_gather_padded(values.detach(), self.replica_group, 0, "all_gather of the active values")
        gi = all_gather_padded(local + start, self.replica_group, 0, "all_gather of the active ids")
        return Selection(values, local, SparseActs(gv, gi, d_sae))

    def top_values(self, values, keep):
        if self.replica_group is None:
            return values
        if values.numel() < keep:
            values = torch.cat([values, values.new_zeros(keep - values.numel())])
        cands = torch.cat(all_gather(values, self.replica_group, "all_gather of the batch top-k candidates"))
        return cands.topk(keep).values

    def gather_dense(self, acts, d_sae):
        if self.replica_group is None:
            return acts
        sizes = [self.shard_range(d_sae, s) for s in range(self.shards)]
        parts = all_gather_padded(acts, self.replica_group, 0, "all_gather of the dense activations").split(
            max(e - s for s, e in sizes), dim=-1)
        return torch.cat([p[..., : e - s] for p, (s, e) in zip(parts, sizes)], -1)

    def fired_acts(self, acts, start, d_sae):
        if self.shards == 1:
            return acts
        nz = SparseActs.from_dense(acts.detach())
        return self.gather_selection(nz.values, nz.indices, start, d_sae).acts

    # ------------------------------------------------------------ the replicas (data parallel)
    def batches(self, source, device, dtype):
        """Replica r keeps the r-th of every R batches of the run's stream (replicas see disjoint
        data; the global batch is R x batch_size rows). Only each replica's shard 0 reads; it
        broadcasts the batch to the replica's other shards. Ends on every rank as soon as the
        stream ends on any replica."""
        if self.world_size == 1:
            yield from super().batches(source, device, dtype)
            return
        stream = iter(source) if self.shard == 0 else None
        src = self.replica_ranks()[0]
        while True:
            x = None
            if stream is not None:
                try:
                    for i in range(self.replicas):
                        b = next(stream)
                        if i == self.replica:
                            x = b.reshape(-1, b.shape[-1])
                except StopIteration:
                    x = None
            shape = torch.tensor([-1, -1] if x is None else list(x.shape), dtype=torch.int64, device=device)
            self._broadcast_in_replica(shape, src, "broadcast of the batch shape")
            if not self.agree([int(shape[0]) >= 0], device)[0]:
                return
            x = torch.empty(shape.tolist(), dtype=dtype, device=device) if x is None else \
                x.to(device, dtype).contiguous()
            self._broadcast_in_replica(x, src, "broadcast of the batch")
            yield x

    def _broadcast_in_replica(self, t, src: int, what: str) -> None:
        if self.replica_group is not None:
            checked(what, lambda: dist.broadcast(t, src, group=self.replica_group))

    def agree(self, flags, device=None):
        if self.world_size == 1:
            return list(flags)
        t = torch.tensor([int(f) for f in flags], dtype=torch.int64, device=device)
        checked("all_reduce of the step's go/no-go flags", lambda: dist.all_reduce(t, op=dist.ReduceOp.MIN))
        return [bool(v) for v in t.tolist()]

    def reduce_gradients(self, module):
        """A parameter without a gradient counts as zero, so replicas always exchange the same tensors."""
        group = self.shard_group
        if group is None:
            return
        params = [p for p in module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads)
        all_reduce_(flat, group, what="all_reduce of the gradients over the replicas")
        flat /= self.replicas
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)

    @torch.no_grad()
    def reduce_row_sparse(self, rows, db_dec):
        """The result covers the union of the latents any replica touched; a latent one replica
        did not touch contributes zero from it. Nothing O(d_sae) is communicated."""
        group = self.shard_group
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
        summed /= self.replicas
        db = all_reduce_(db_dec.clone(), group, what="all_reduce of b_dec's gradient over the replicas")
        merged = RowSparseGrads(latents, summed[:, :d].t(), summed[:, 2 * d],
                                summed[:, d:2 * d].to(rows.W_dec.dtype), rows.d_sae)
        return merged, db / self.replicas

    @torch.no_grad()
    def broadcast_parameters(self, module, latent_dims):
        """Every shard takes replica 0's copy, and the replicated tensors (b_dec, ...) that are not
        split over latents take shard 0's copy first."""
        if self.replica_group is not None:
            src = self.replica_ranks()[0]
            for name, t in module.state_dict().items():
                if name not in latent_dims:
                    checked(f"broadcast of {name} over the shards",
                            lambda t=t: dist.broadcast(t, src=src, group=self.replica_group))
        if self.shard_group is not None:
            src = self.shard_ranks()[0]
            for name, t in module.state_dict().items():
                checked(f"broadcast of {name} over the replicas",
                        lambda t=t: dist.broadcast(t, src=src, group=self.shard_group))

    @torch.no_grad()
    def average_buffers(self, module):
        """BatchTopK's inference threshold is an EMA of each replica's own batches; averaging it
        every step keeps the replicas identical."""
        if self.shard_group is None:
            return
        for name, b in module.named_buffers():
            if b.is_floating_point():
                all_reduce_(b, self.shard_group, what=f"all_reduce of buffer {name} over the replicas")
                b /= self.replicas

    def gather_fired(self, fired):
        """Each rank's dead-latent tracker, and with it AuxK, then sees the whole global batch and
        stays identical everywhere."""
        if self.shard_group is None:
            return fired
        ids = all_gather_padded(fired.unsqueeze(0), self.shard_group, -1, "all_gather of the fired latents")[0]
        return ids[ids >= 0]

    def replica_mean(self, scalars, device=None):
        if self.shard_group is None:
            return scalars
        keys = sorted(scalars)
        t = torch.tensor([scalars[k] for k in keys], dtype=torch.float64, device=device)
        all_reduce_(t, self.shard_group, what="all_reduce of the step's metrics")
        return {k: v / self.replicas for k, v in zip(keys, t.tolist())}

    def barrier(self, what):
        if self.world_size > 1:
            checked(what, dist.barrier)


def resolve_sizes(world_size: int, shards: int | None = None, replicas: int | None = None) -> tuple[int, int]:
    """(replicas, shards) for a world: given one, the other follows; given neither, every
    rank is a shard of one replica (pure latent sharding)."""
    if shards is None and replicas is None:
        shards = world_size
    if shards is None:
        if replicas < 1 or world_size % replicas:
            raise ConfigError(
                f"replicas={replicas} does not divide the {world_size} ranks: pick a divisor of {world_size}"
            )
        shards = world_size // replicas
    if replicas is None:
        if shards < 1 or world_size % shards:
            raise ConfigError(
                f"shards={shards} does not divide the {world_size} ranks: pick a divisor of {world_size}"
            )
        replicas = world_size // shards
    if replicas * shards != world_size:
        raise ConfigError(
            f"replicas={replicas} × shards={shards} = {replicas * shards}, but {world_size} ranks were "
            f"launched: launch replicas × shards processes (torchrun --nproc-per-node ...)"
        )
    return replicas, shards


def build_layout(shards: int | None = None, replicas: int | None = None,
                 timeout_s: float | None = None) -> ParallelContext:
    """The layout of the already initialised default process group. Every rank must call
    this, in the same order relative to other group creations (new_group is collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        resolve_sizes(1, shards, replicas)  # says so if the sizes need more ranks
        return LOCAL
    world, rank = dist.get_world_size(), dist.get_rank()
    replicas, shards = resolve_sizes(world, shards, replicas)
    timeout_s = timeout_s or default_timeout_s()
    timeout = datetime.timedelta(seconds=timeout_s)
    replica_group = shard_group = None
    for r in range(replicas):  # all ranks create all groups, in the same order
        ranks = [r * shards + s for s in range(shards)]
        group = dist.new_group(ranks, timeout=timeout) if shards > 1 else None
        if rank in ranks:
            replica_group = group
    for s in range(shards):
        ranks = [r * shards + s for r in range(replicas)]
        group = dist.new_group(ranks, timeout=timeout) if replicas > 1 else None
        if rank in ranks:
            shard_group = group
    set_timeout(timeout_s)
    return ParallelLayout(replicas, shards, rank, replica_group, shard_group, timeout_s)


def init_distributed(shards: int | None = None, replicas: int | None = None, backend: str | None = None,
                     timeout_s: float | None = None) -> ParallelContext:
    """Join the job torchrun started (env:// rendezvous: RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) and build the layout. Without those variables (a plain `python` run) it is
    the single-process context, fastsae.parallel.LOCAL. backend: "nccl" on CUDA, "gloo" otherwise, unless given."""
    timeout_s = timeout_s or default_timeout_s()
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # a plain `python` run: nothing to join
            ranks = (shards or 1) * (replicas or 1)
            if ranks > 1:
                raise ConfigError(
                    f"shards={shards}, replicas={replicas} need {ranks} ranks, but this "
                    "is one plain process: start it with torchrun --nproc-per-node N (N = replicas x shards), "
                    "or drop --shards/--replicas to train on one process"
                )
            return build_layout(shards, replicas, timeout_s)
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":  # one GPU per rank, picked by the local rank torchrun sets
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return build_layout(shards, replicas, timeout_s)
