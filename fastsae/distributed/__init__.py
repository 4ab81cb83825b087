"""Training beyond one device: latent sharding (each rank owns a slice of the dictionary) and
data parallel (replicas of each slice) on torch.distributed. See docs/distributed.md.

    layout = init_distributed(shards=4)            # under torchrun; replicas = world / shards
    sae = ShardedSAE(cfg, layout)                  # this rank's latents
    out = sae.training_forward(x)                  # same x on every shard of a replica
    out.loss.backward(); reduce_gradients(sae, layout); opt.step()
    save_sharded(sae, "ckpt"); load_full("ckpt")   # any number of ranks, or one
"""

from .checkpoint import consolidate, is_sharded_checkpoint, load_full, load_sharded, read_manifest, save_sharded
from .collectives import DistributedError
from .data_parallel import broadcast_parameters, reduce_gradients, reduce_row_sparse
from .groups import ParallelLayout, build_layout, init_distributed, shard_range, single_process_layout
from .launch import RankResult, launch, run
from .sharded_sae import ShardedSAE, ShardSelection

__all__ = [
    "ParallelLayout", "build_layout", "init_distributed", "shard_range", "single_process_layout",
    "ShardedSAE", "ShardSelection", "DistributedError",
    "reduce_gradients", "reduce_row_sparse", "broadcast_parameters",
    "save_sharded", "load_sharded", "load_full", "consolidate", "read_manifest", "is_sharded_checkpoint",
    "launch", "run", "RankResult",
]
