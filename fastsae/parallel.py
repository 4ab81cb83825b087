"""The process layout a module and the Trainer run in: replicas x shards.

Rank r holds latent shard `r % shards` of replica `r // shards`. The shards of one replica
together hold one whole SAE: they see the same batch, merge each other's top-k candidates
and sum their partial reconstructions. The replicas of one shard hold the same latents and
see different batches (data parallel).

`ParallelContext` is what the SAE modules and the Trainer talk to. This module defines the
single-process one, `LocalContext`, whose collectives are all the identity; it needs nothing
of torch.distributed. `fastsae.distributed.ParallelLayout` is the same interface over real
process groups, loaded only when a distributed run asks for it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .errors import ConfigError
from .sparse import RowSparseGrads, Selection, SparseActs


def shard_range(d_sae: int, shards: int, shard: int) -> tuple[int, int]:
    """Latents [start, end) of `shard`: contiguous, sizes differ by at most one (the first
    d_sae % shards shards hold one more)."""
    if not 0 <= shard < shards:
        raise ConfigError(f"shard {shard} is out of range for {shards} shards")
    if shards > d_sae:
        raise ConfigError(
            f"cannot split d_sae={d_sae} latents over {shards} shards (each shard needs at least one "
            f"latent): use at most {d_sae} shards"
        )
    base, extra = divmod(d_sae, shards)
    start = shard * base + min(shard, extra)
    return start, start + base + (1 if shard < extra else 0)


class ParallelContext:
    """Where this rank sits in the replicas x shards grid, and the collectives it uses.

    Latent-group collectives (the shards of one replica) are what an SAE module needs; the
    replica collectives are what the Trainer needs. Every method here is the identity on a
    single process; fastsae.distributed.ParallelLayout overrides them with process groups.
    """

    replicas: int = 1
    shards: int = 1
    rank: int = 0

    @property
    def world_size(self) -> int:
        return self.replicas * self.shards

    @property
    def replica(self) -> int:
        """Which replica (data-parallel index) this rank belongs to."""
        return self.rank // self.shards

    @property
    def shard(self) -> int:
        """Which latent slice this rank holds."""
        return self.rank % self.shards

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, shows progress and writes shared files."""
        return self.rank == 0

    def shard_range(self, d_sae: int, shard: int | None = None) -> tuple[int, int]:
        return shard_range(d_sae, self.shards, self.shard if shard is None else shard)

    def widest_shard(self, d_sae: int) -> int:
        return max(e - s for s, e in (self.shard_range(d_sae, i) for i in range(self.shards)))

    def as_dict(self) -> dict[str, int]:
        return {"replicas": self.replicas, "shards": self.shards}

    # ------------------------------------------------------------ the shards of one SAE
    def enter_shards(self, t: torch.Tensor) -> torch.Tensor:
        """t, replicated over the shards, each using it for its own part: the identity forward,
        its gradient summed over the shards in backward."""
        return t

    def sum_shards(self, t: torch.Tensor, what: str = "the partial reconstructions") -> torch.Tensor:
        """Σ over the shards of each one's partial t (differentiable: every shard then holds the
        same sum, and each its own gradient)."""
        return t

    def sum_shards_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place Σ over the shards, outside autograd; returns t."""
        return t

    def merge_topk(self, vals: torch.Tensor, idx: torch.Tensor, k: int, start: int, width: int, d_sae: int,
                   what: str = "top-k") -> Selection:
        """The group-wide top-k of each row from every shard's candidates (vals [N, m <= width],
        ids idx local to this shard, whose latents start at `start`). Exact: every global
        winner is among its own shard's candidates. values/indices of the result are this
        shard's own slots (value 0 and local id 0 in slots another shard won), acts the whole
        selection over global ids."""
        return Selection(vals, idx, SparseActs(vals, idx + start, d_sae))

    def gather_selection(self, values: torch.Tensor, local: torch.Tensor, start: int, d_sae: int) -> Selection:
        """A selection each shard made alone (BatchTopK, thresholds), with its global view."""
        return Selection(values, local, SparseActs(values, local + start, d_sae))

    def top_values(self, values: torch.Tensor, keep: int) -> torch.Tensor:
        """The `keep` largest of every shard's `values` (1-D, each shard's own top `keep` or
        fewer), the same on every shard. A single process's BatchTopK already holds exactly
        the batch's top values, so they are returned as they are."""
        return values

    def gather_dense(self, acts: torch.Tensor, d_sae: int) -> torch.Tensor:
        """Every shard's [N, n_local] activations as the whole [N, d_sae] (inference only)."""
        return acts

    def fired_acts(self, acts: torch.Tensor, start: int, d_sae: int):
        """A dense architecture's training activations [N, n_local] as the Trainer's record of
        what fired: the dense tensor itself on one shard, a SparseActs over global ids when
        the dictionary is split (no [N, d_sae] tensor on any rank)."""
        return acts

    # ------------------------------------------------------------ the replicas (data parallel)
    def batches(self, source, device, dtype) -> Iterator[torch.Tensor]:
        """This rank's batches [N, d] from the run's batch stream."""
        for b in source:
            yield b.reshape(-1, b.shape[-1])

    def agree(self, flags: list[bool], device=None) -> list[bool]:
        """Each flag AND-ed over every rank, so all ranks take the same branch."""
        return list(flags)

    def reduce_gradients(self, module: nn.Module) -> None:
        """Average every trainable parameter's .grad over the replicas."""

    def reduce_row_sparse(self, rows: RowSparseGrads, db_dec: torch.Tensor):
        """Average a row-sparse gradient (and the dense db_dec) over the replicas."""
        return rows, db_dec

    def broadcast_parameters(self, module: nn.Module, latent_dims: dict[str, int]) -> None:
        """Make the replicas identical (and the replicated tensors identical across shards)."""

    def average_buffers(self, module: nn.Module) -> None:
        """Average floating-point buffers (BatchTopK's threshold) over the replicas."""

    def gather_fired(self, fired: torch.Tensor) -> torch.Tensor:
        """The latent ids that fired on any replica."""
        return fired

    def replica_mean(self, scalars: dict[str, float], device=None) -> dict[str, float]:
        """The step's logged numbers as the mean over the replicas."""
        return scalars

    def barrier(self, what: str) -> None:
        """Wait for every rank."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(replicas={self.replicas}, shards={self.shards}, rank={self.rank}: "
                f"replica {self.replica}, shard {self.shard})")


class LocalContext(ParallelContext):
    """A single process: one replica, one shard, no collectives."""


LOCAL = LocalContext()


def single_process_layout() -> ParallelContext:
    return LOCAL


__all__ = ["ParallelContext", "LocalContext", "LOCAL", "shard_range", "single_process_layout"]
