"""Train an SAE on activation shards (fastsae train --data DIR ... or --config run.json/.toml).

The same command trains across GPUs when torchrun starts it:

    torchrun --nproc-per-node 4 -m fastsae train --shards 4 --data acts/ --expansion 256 --k 32

--shards (latent shards per replica; default every rank one shard) or --replicas pick the
layout, replicas x shards = the number of ranks; --batch-size is per replica (the global
batch is replicas x batch size). Only rank 0 logs and shows progress.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import tomllib

from .config import SAEConfig
from .data import ShardSource, read_manifest
from .distributed.groups import init_distributed
from .errors import ConfigError
from .trainer import TrainConfig, Trainer

# flag -> (TrainConfig or SAEConfig field, type); None type means a boolean switch
SAE_FLAGS = {"d_in": int, "d_sae": int, "architecture": str, "k": int, "dtype": str, "device": str,
             "l1_coefficient": float, "l0_coefficient": float, "backend": str}
TRAIN_FLAGS = {"steps": int, "batch_size": int, "lr": float, "optimizer": str, "warmup_steps": int,
               "decay": str, "decay_start": float, "sparsity_warmup_steps": int, "auxk_coefficient": float,
               "k_aux": int, "dead_tokens": int, "resample_every": int, "finetune_steps": int, "finetune": str,
               "finetune_lr": float,
               "init": str, "b_dec_init": str, "nonfinite": str,
               "log_every": int, "checkpoint_every": int, "keep_checkpoints": int, "out_dir": str, "seed": int}
DATA_KEYS = ("path", "buffer_rows", "chunk_rows", "shuffle")
HELP = {
    "d_in": "activation size (default: read from the shards)", "d_sae": "number of latents",
    "architecture": "topk (default), batchtopk, standard (ReLU + L1) or jumprelu",
    "k": "active latents per row (topk/batchtopk)", "dtype": "float32 (default) or bfloat16 weights",
    "optimizer": "adam (default) or row_sparse_adam (TopK family: updates only the latents that fired)",
    "lr": "peak learning rate (default 2e-4)", "decay": "linear (default), cosine or constant",
    "decay_start": "fraction of the steps after which the lr decays (default 0.8)",
    "dead_tokens": "tokens without firing after which a latent counts as dead (default: a tenth of the run's "
                   "tokens, at most 1e7)",
    "resample_every": "steps between resamplings of dead latents (default: the dead window; see --resample-dead)",
    "finetune_steps": "after --steps, this many steps refitting the decoder without the sparsity penalty, the "
                      "encoder frozen: the shrinkage fix (default 0)",
    "finetune_lr": "peak lr of the fine-tuning stage (default: --lr)",
    "finetune": "what the fine-tuning stage refits: scale (default: each decoder row's norm, directions kept) or "
                "decoder (whole rows)",
    "steps": "optimizer steps (default 1000)", "batch_size": "rows per step and replica (default 4096)",
    "warmup_steps": "linear lr warmup steps (default 0)",
    "sparsity_warmup_steps": "steps over which the L1/L0 penalty ramps up from 0 (default 0)",
    "auxk_coefficient": "weight of AuxK, on while latents are dead (TopK family; default 1/32; 0 disables)",
    "k_aux": "latents AuxK uses per row (default d_in // 2)", "seed": "seeds the init and the data order",
    "log_every": "steps between log lines (default 100)", "keep_checkpoints": "checkpoints kept (default 3)",
    "l1_coefficient": "L1 penalty weight (standard)", "l0_coefficient": "L0 penalty weight (jumprelu)",
    "device": "cpu (default) or cuda[:N]", "backend": "auto (default), reference, cpp or triton",
    "init": "tied (default), data (decoder atoms from activation samples, tied encoder) or data_decoder "
            "(atoms from samples, random encoder)",
    "b_dec_init": "geometric_median (default), mean or zeros",
    "nonfinite": "raise (default) or skip batches holding NaN/inf (counted in the log)",
    "checkpoint_every": "steps between checkpoints (0: only at the end)",
    "out_dir": "where the run goes (default runs/sae)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON or TOML file: training fields, an [sae] table and a [data] table "
                                    "(path, buffer_rows, chunk_rows, shuffle); flags override it")
    p.add_argument("--data", help="activation shards: a directory of .npy/.safetensors files (as written by "
                                  "`fastsae harvest`) or one file")
    p.add_argument("--buffer-rows", type=int, help="shuffle buffer size in rows (default 262144)")
    p.add_argument("--chunk-rows", type=int, help="rows read contiguously from a shard (default 4096)")
    p.add_argument("--expansion", type=int, help="d_sae = expansion * d_in (instead of --d-sae)")
    for name, typ in {**SAE_FLAGS, **TRAIN_FLAGS}.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, dest=name, default=None, help=HELP.get(name))
    dead = p.add_mutually_exclusive_group()
    dead.add_argument("--resample-dead", dest="resample_dead", action="store_const", const=True, default=None,
                      help="resample dead latents (default: on for standard/jumprelu, whose dead latents AuxK "
                           "cannot revive)")
    dead.add_argument("--no-resample-dead", dest="resample_dead", action="store_const", const=False,
                      help="never resample dead latents")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="any other TrainConfig field, value as JSON (e.g. --set final_lr_fraction=0.1)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("under torchrun")
    g.add_argument("--shards", type=int, help="latent shards per replica (default: every rank one shard)")
    g.add_argument("--replicas", type=int, help="data-parallel replicas (default: world size / shards)")
    g.add_argument("--dist-timeout", type=float,
                   help="seconds a collective may wait before the job stops with an error (default 600)")
    g.add_argument("--dist-backend", choices=("nccl", "gloo"), help="default: nccl with CUDA, else gloo")


def _read_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        return tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{p} is not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {e}") from e


def build(args: argparse.Namespace) -> tuple[dict, dict]:
    """(TrainConfig dict, data dict) from the config file and the flags."""
    raw = _read_config(args.config) if args.config else {}
    sae = dict(raw.pop("sae", {}))
    data = dict(raw.pop("data", {}))
    train = raw
    for name in SAE_FLAGS:
        if getattr(args, name) is not None:
            sae[name] = getattr(args, name)
    for name in TRAIN_FLAGS:
        if getattr(args, name) is not None:
            train[name] = getattr(args, name)
    if getattr(args, "resample_dead", None) is not None:
        train["resample_dead"] = args.resample_dead
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: write FIELD=VALUE, e.g. --set final_lr_fraction=0.1")
        try:
            train[key] = json.loads(value)
        except json.JSONDecodeError:
            train[key] = value
    for key, flag in (("path", "data"), ("buffer_rows", "buffer_rows"), ("chunk_rows", "chunk_rows")):
        if getattr(args, flag) is not None:
            data[key] = getattr(args, flag)
    unknown = sorted(set(data) - set(DATA_KEYS))
    if unknown:
        raise ConfigError(f"unknown [data] key(s) {unknown}: use {', '.join(DATA_KEYS)}")
    if "path" not in data:
        raise ConfigError("no activations: pass --data DIR (shards from `fastsae harvest`) or set data.path")
    if args.no_progress:
        train["progress"] = False
    return {"sae": sae, **train}, data


def prepare(args: argparse.Namespace) -> tuple[dict, ShardSource]:
    """(TrainConfig dict with its "sae" dict completed, the shard source) from the parsed flags:
    d_in comes from the shards, d_sae from --expansion, metadata from the harvest manifest."""
    train, data = build(args)
    opts = {k: data[k] for k in ("buffer_rows", "chunk_rows", "shuffle") if k in data}
    source = ShardSource(data["path"], batch_size=int(train.get("batch_size", 4096)),
                         seed=int(train.get("seed", 0)), **opts)
    sae = train["sae"]
    sae.setdefault("d_in", source.d_in)
    if args.expansion:
        sae.setdefault("d_sae", args.expansion * sae["d_in"])
    if "d_sae" not in sae:
        raise ConfigError("say how wide the SAE is: --d-sae N or --expansion E")
    manifest = read_manifest(data["path"]) if Path(data["path"]).is_dir() else {}
    if manifest:
        sae.setdefault("metadata", {}).update(
            {k: manifest[k] for k in ("model", "hook", "dataset") if k in manifest})
    return train, source


def run(args: argparse.Namespace) -> int:
    # a plain `python` run (no torchrun variables) gets the single-process layout, no process group
    layout = init_distributed(args.shards, args.replicas, args.dist_backend, args.dist_timeout)
    train, source = prepare(args)
    if args.resume:
        out_dir = train.get("out_dir", "runs/sae")
        overrides = {k: v for k, v in train.items() if k in ("steps", "progress")}
        trainer = Trainer.resume(out_dir, source, layout=layout, **overrides)
    else:
        cfg = TrainConfig.from_dict({**train, "sae": SAEConfig.from_dict(train["sae"])})
        trainer = Trainer(cfg, source, layout=layout)
    res = trainer.fit()
    if layout.is_main:
        summary = {"out_dir": str(res.out_dir), "final": str(res.final_dir) if res.final_dir else None,
                   "log": str(res.log_path), "curves": str(res.plot_path) if res.plot_path else None,
                   "checkpoint": str(res.last_checkpoint) if res.last_checkpoint else None}
        if layout.world_size > 1:
            summary.update(final_sharded=str(res.final_sharded_dir) if res.final_sharded_dir else None,
                           layout=f"{layout.replicas}x{layout.shards}")
        print(json.dumps(summary))
    return 0
