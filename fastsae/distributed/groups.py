"""Process-group layout for training over many ranks: replicas × shards.

Rank r holds latent shard `r % shards` of replica `r // shards`. Two kinds of groups:

* replica group: the `shards` ranks that together hold one whole SAE. They see the same
  batch, gather each other's top-k candidates and sum their partial reconstructions.
* shard group: the `replicas` ranks that hold the same latent slice. They see different
  batches and average their gradients (data parallel).

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

from ..errors import ConfigError
from .collectives import set_timeout

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


@dataclass(frozen=True, eq=False)
class ParallelLayout:
    """Where this rank sits in the replicas × shards grid, and the groups it talks in.

    A group is None when it would hold only this rank (nothing to communicate), so a
    single-process layout needs no torch.distributed at all.
    """

    replicas: int = 1
    shards: int = 1
    rank: int = 0
    replica_group: Any = None
    shard_group: Any = None
    timeout_s: float = DEFAULT_TIMEOUT_S

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

    def replica_ranks(self, replica: int | None = None) -> list[int]:
        r = self.replica if replica is None else replica
        return [r * self.shards + s for s in range(self.shards)]

    def shard_ranks(self, shard: int | None = None) -> list[int]:
        s = self.shard if shard is None else shard
        return [r * self.shards + s for r in range(self.replicas)]

    def __repr__(self) -> str:
        return (f"ParallelLayout(replicas={self.replicas}, shards={self.shards}, rank={self.rank}: "
                f"replica {self.replica}, shard {self.shard})")


def single_process_layout() -> ParallelLayout:
    return ParallelLayout()


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
                 timeout_s: float | None = None) -> ParallelLayout:
    """The layout of the already initialised default process group. Every rank must call
    this, in the same order relative to other group creations (new_group is collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        replicas, shards = resolve_sizes(1, shards, replicas)
        return ParallelLayout(replicas, shards, 0, timeout_s=timeout_s or default_timeout_s())
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
                     timeout_s: float | None = None) -> ParallelLayout:
    """Join the job torchrun started (env:// rendezvous: RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) and build the layout. Without those variables (a plain `python` run) it is
    the single-process layout. backend: "nccl" on CUDA, "gloo" otherwise, unless given."""
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
