"""Train one SAE across GPUs: `torchrun --nproc-per-node N -m fastsae train-dist --shards N ...`

Takes every flag of `fastsae train`, plus the layout: --shards (latent shards per replica;
default all ranks) or --replicas; replicas × shards must equal the number of ranks.
--batch-size is per replica (the global batch is replicas × batch size). Only rank 0 logs
and shows progress. Without torchrun it runs on one process, as `fastsae train` would.
"""

from __future__ import annotations

import argparse
import json

from .. import train_cli
from ..config import SAEConfig
from ..trainer import TrainConfig
from .groups import init_distributed
from .train import ShardedTrainer


def add_arguments(p: argparse.ArgumentParser) -> None:
    train_cli.add_arguments(p)
    p.add_argument("--shards", type=int, help="latent shards per replica (default: every rank one shard)")
    p.add_argument("--replicas", type=int, help="data-parallel replicas (default: world size / shards)")
    p.add_argument("--dist-timeout", type=float,
                   help="seconds a collective may wait before the job stops with an error (default 600)")
    p.add_argument("--dist-backend", choices=("nccl", "gloo"), help="default: nccl with CUDA, else gloo")


def run(args: argparse.Namespace) -> int:
    layout = init_distributed(args.shards, args.replicas, args.dist_backend, args.dist_timeout)
    train, source = train_cli.prepare(args)
    sae = train["sae"]
    if args.resume:
        overrides = {k: v for k, v in train.items() if k in ("steps", "progress")}
        trainer = ShardedTrainer.resume(train.get("out_dir", "runs/sae"), source, layout, **overrides)
    else:
        cfg = TrainConfig.from_dict({**train, "sae": SAEConfig.from_dict(sae)})
        trainer = ShardedTrainer(cfg, source, layout)
    res = trainer.fit()
    if layout.is_main:
        print(json.dumps({"out_dir": str(res.out_dir), "final": str(res.final_dir) if res.final_dir else None,
                          "final_sharded": str(res.final_sharded_dir) if res.final_sharded_dir else None,
                          "layout": f"{layout.replicas}x{layout.shards}",
                          "checkpoint": str(trainer.last_checkpoint) if trainer.last_checkpoint else None}))
    return 0


__all__ = ["add_arguments", "run"]
