"""Training beyond one device: latent sharding (each rank owns a slice of the dictionary) and
data parallel (replicas of each slice) on torch.distributed. See docs/distributed.md.

    layout = init_distributed(shards=4)            # under torchrun; replicas = world / shards
    sae = fastsae.build_sae(cfg, layout)           # this rank's latents (also: ShardedSAE(cfg, layout))
    out = sae.training_forward(x)                  # same x on every shard of a replica
    out.loss.backward(); reduce_gradients(sae, layout); opt.step()
    save_sharded(sae, "ckpt"); load_full("ckpt")   # any number of ranks, or one

Most users need none of this directly: `fastsae.Trainer(cfg, data, layout=init_distributed(...))`
runs the same training loop on every rank.
"""

from ..parallel import shard_range, single_process_layout
from ..sparse import Selection
from .checkpoint import consolidate, is_sharded_checkpoint, load_full, load_sharded, read_manifest, save_sharded
from .collectives import DistributedError
from .groups import ParallelLayout, build_layout, init_distributed
from .launch import RankResult, launch, run
from .sharded_sae import ShardedSAE, gather_full, shard_of

ShardSelection = Selection  # the name the sharded selection had first


def reduce_gradients(module, layout) -> None:
    """Average .grad of every trainable parameter over the replicas (after backward)."""
    layout.reduce_gradients(module)


def reduce_row_sparse(rows, db_dec, layout):
    """Average a row-sparse gradient (and db_dec) over the replicas."""
    return layout.reduce_row_sparse(rows, db_dec)


def broadcast_parameters(module, layout) -> None:
    """Make the replicas identical: every shard takes replica 0's copy."""
    layout.broadcast_parameters(module, module.latent_dims)


__all__ = [
    "ParallelLayout", "build_layout", "init_distributed", "shard_range", "single_process_layout",
    "ShardedSAE", "ShardSelection", "shard_of", "gather_full", "DistributedError",
    "reduce_gradients", "reduce_row_sparse", "broadcast_parameters",
    "save_sharded", "load_sharded", "load_full", "consolidate", "read_manifest", "is_sharded_checkpoint",
    "launch", "run", "RankResult",
]
