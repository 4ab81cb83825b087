"""Train an SAE on activation shards (fastsae train --data DIR ... or --config run.json/.toml).

The same command trains across GPUs when torchrun starts it:

    torchrun --nproc-per-node 4 -m fastsae train --shards 4 --data acts/ --expansion 256 --k 32

--shards (latent shards per replica; default every rank one shard) or --replicas pick the
layout, replicas x shards = the number of ranks; --batch-size is per replica (the global
batch is replicas x batch size). Only rank 0 logs and shows progress.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import tomllib

from .cli import check_device
from .config import RESUMABLE, SAEConfig, TrainConfig
from .data import PairedSource, ShardSource
from .errors import ConfigError
from .run_dir import RunDir
from .trainer import Trainer

# flag -> (TrainConfig or SAEConfig field, type); None type means a boolean switch
SAE_FLAGS = {"d_in": int, "d_sae": int, "architecture": str, "k": int, "dtype": str, "device": str,
             "l1_coefficient": float, "l0_coefficient": float, "backend": str, "d_out": int}
TRAIN_FLAGS = {"steps": int, "batch_size": int, "lr": float, "optimizer": str, "optimizer_state": str,
               "master_weights": str, "warmup_steps": int,
               "decay": str, "decay_start": float, "sparsity_warmup_steps": int, "auxk_coefficient": float,
               "k_aux": int, "dead_tokens": int, "resample_every": int, "finetune_steps": int, "finetune": str,
               "finetune_lr": float,
               "init": str, "b_dec_init": str, "nonfinite": str,
               "log_every": int, "checkpoint_every": int, "keep_checkpoints": int, "out_dir": str, "seed": int}
DATA_KEYS = ("path", "targets", "buffer_rows", "chunk_rows", "shuffle")
HELP = {
    "d_in": "activation size (default: read from the shards)", "d_sae": "number of latents",
    "architecture": "topk, batchtopk, standard (ReLU + L1), jumprelu, gated, matryoshka_batchtopk, or another "
                    "registered one",
    "k": "active latents per row (topk/batchtopk)", "dtype": "weights' dtype: float32 or bfloat16",
    "device": "cpu or cuda[:N]", "l1_coefficient": "weight of the L1 penalty (standard)",
    "l0_coefficient": "weight of the L0 penalty (jumprelu)", "backend": "auto, cpp, triton or reference",
    "d_out": "a transcoder's output width (default: the targets' width)",
    "steps": "optimizer steps", "batch_size": "rows per batch (per replica)",
    "optimizer": "adam, row_sparse_adam (sparse architectures: updates only the latents that fired), signum "
                 "or row_sparse_signum",
    "optimizer_state": "the optimizer's moments: fp32, bf16 or int8 (8-bit blockwise; see docs/wide.md)",
    "master_weights": "how bf16 weights are updated: fp32 copies, kahan, stochastic rounding, or none",
    "lr": "peak learning rate", "warmup_steps": "linear lr warmup steps", "decay": "linear, cosine or constant",
    "decay_start": "fraction of the steps after which the lr decays",
    "sparsity_warmup_steps": "steps over which the L1/L0 penalty ramps up from 0",
    "auxk_coefficient": "weight of AuxK, on while latents are dead (TopK family; 0 disables)",
    "k_aux": "dead latents AuxK uses per row (default d_in // 2)",
    "dead_tokens": "tokens without firing after which a latent counts as dead (default: a fortieth of the run's "
                   "tokens, at most 1e7)",
    "resample_every": "steps between resamplings of dead latents (default: the dead window; see --resample-dead)",
    "finetune_steps": "after --steps, this many steps refitting the decoder without the sparsity penalty, the "
                      "encoder frozen: the shrinkage fix",
    "finetune_lr": "peak lr of the fine-tuning stage (default: --lr)",
    "finetune": "what the fine-tuning stage refits: scale (each decoder row's norm, directions kept) or "
                "decoder (whole rows)",
    "init": "tied, data (decoder atoms from activation samples, tied encoder) or data_decoder (atoms from "
            "samples, random encoder)",
    "b_dec_init": "zeros (default), geometric_median or mean of a sample",
    "nonfinite": "raise, or skip batches holding NaN/inf (counted in the log)",
    "log_every": "steps between log lines", "checkpoint_every": "steps between checkpoints (0: only at the end)",
    "keep_checkpoints": "how many checkpoints to keep", "out_dir": "where the run goes", "seed": "random seed",
}


def _default(name: str):
    """The dataclass default of a TrainConfig or SAEConfig field (None when it has none)."""
    for cls in (TrainConfig, SAEConfig):
        for f in dataclasses.fields(cls):
            if f.name == name and f.default is not dataclasses.MISSING:
                return f.default
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON or TOML file: training fields, an [sae] table and a [data] table "
                                    "(path, buffer_rows, chunk_rows, shuffle); flags override it")
    p.add_argument("--data", help="activation shards: a directory of .npy/.safetensors files (as written by "
                                  "`fastsae harvest`) or one file")
    p.add_argument("--buffer-rows", type=int, help="shuffle buffer size in rows (default 262144)")
    p.add_argument("--chunk-rows", type=int, help="rows read contiguously from a shard (default 4096)")
    p.add_argument("--expansion", type=int, help="d_sae = expansion * d_in (instead of --d-sae)")
    p.add_argument("--targets", help="train a transcoder: the target activations (shards paired row for row with "
                                     "--data, e.g. two hooks of one `fastsae harvest --hook A --hook B`)")
    p.add_argument("--skip-connection", action="store_true", help="a transcoder with a linear skip (W_skip)")
    p.add_argument("--matryoshka-widths", help="comma-separated nested widths ending at d_sae "
                                               "(matryoshka_batchtopk), e.g. 1024,4096,16384")
    for name, typ in {**SAE_FLAGS, **TRAIN_FLAGS}.items():
        default = _default(name)
        shown = "" if default is None or "default" in HELP[name] else f" (default: {default})"
        p.add_argument("--" + name.replace("_", "-"), type=typ, dest=name, default=None, help=HELP[name] + shown)
    dead = p.add_mutually_exclusive_group()
    dead.add_argument("--resample-dead", dest="resample_dead", action="store_const", const=True, default=None,
                      help="resample dead latents (default: on for standard/jumprelu, whose dead latents AuxK "
                           "cannot revive)")
    dead.add_argument("--no-resample-dead", dest="resample_dead", action="store_const", const=False,
                      help="never resample dead latents")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="any other TrainConfig field, value as JSON (e.g. --set final_lr_fraction=0.1)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out-dir from its latest checkpoint that reads back; its saved "
                        "settings hold, and only " + ", ".join(sorted(RESUMABLE - {"out_dir"})) + " may change")
    p.add_argument("--checkpoint", help="with --resume: resume from this checkpoint folder instead")
    p.add_argument("--allow-new-data", action="store_true",
                   help="with --resume: continue even though the activations differ from the run's (recorded)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh run even though --out-dir holds one (its files are replaced)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from .train_model_cli import add_arguments as add_model_arguments

    add_model_arguments(p)  # --model, --hook, --text, ...: activations streamed from the model
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
    known = {f.name for f in dataclasses.fields(SAEConfig)}
    unknown = sorted(set(sae) - known)
    if unknown:
        raise ConfigError(f"unknown [sae] field(s) {unknown} in {args.config}: known ones are {sorted(known)}")
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
    if args.skip_connection:
        sae["skip_connection"] = True
    if args.matryoshka_widths:
        try:
            sae["matryoshka_widths"] = [int(w) for w in args.matryoshka_widths.split(",")]
        except ValueError:
            raise ConfigError(f"--matryoshka-widths {args.matryoshka_widths!r}: write whole numbers separated by "
                              "commas, e.g. 1024,4096,16384") from None
    if args.targets:
        data["targets"] = args.targets
        sae.setdefault("transcoder", True)
        sae.setdefault("apply_b_dec_to_input", False)
    for key, flag in (("path", "data"), ("buffer_rows", "buffer_rows"), ("chunk_rows", "chunk_rows")):
        if getattr(args, flag) is not None:
            data[key] = getattr(args, flag)
    unknown = sorted(set(data) - set(DATA_KEYS))
    if unknown:
        raise ConfigError(f"unknown [data] key(s) {unknown}: use {', '.join(DATA_KEYS)}")
    if "path" not in data and not getattr(args, "model", None):
        raise ConfigError("no activations: pass --data DIR (shards from `fastsae harvest`) or set data.path, or "
                          "stream them from a model: --model M --hook H --text FILE")
    if args.no_progress:
        train["progress"] = False
    if args.overwrite:
        train["overwrite"] = True
    return {"sae": sae, **train}, data


def _source(data: dict, batch_size: int, seed: int) -> ShardSource | PairedSource:
    """The activation source the [data] settings describe: shards, or inputs paired with targets."""
    opts = {k: data[k] for k in ("buffer_rows", "chunk_rows", "shuffle") if k in data}
    if "targets" in data:
        return PairedSource(data["path"], data["targets"], batch_size, seed=seed, **opts)
    return ShardSource(data["path"], batch_size=batch_size, seed=seed, **opts)


def prepare(args: argparse.Namespace) -> tuple[dict, ShardSource]:
    """(TrainConfig dict with its "sae" dict completed, the shard source) from the parsed flags:
    d_in comes from the shards, d_sae from --expansion, metadata from the harvest manifest."""
    train, data = build(args)
    if "device" in train["sae"]:
        check_device(train["sae"]["device"])
    source = _source(data, int(train.get("batch_size", _default("batch_size"))), int(train.get("seed", 0)))
    sae = train["sae"]
    if isinstance(source, PairedSource):
        sae.setdefault("d_in", source.widths[0])
        sae.setdefault("d_out", source.widths[1])
    else:
        sae.setdefault("d_in", source.d_in)
    if args.expansion:
        sae.setdefault("d_sae", args.expansion * sae["d_in"])
    if "d_sae" not in sae:
        raise ConfigError("say how wide the SAE is: --d-sae N or --expansion E")
    manifest = getattr(source, "manifest", None) or getattr(getattr(source, "inputs", None), "manifest", None)
    if manifest:
        sae.setdefault("metadata", {}).update(
            {k: manifest[k] for k in ("model", "hook", "dataset") if k in manifest})
    return train, source


def prepare_resume(args: argparse.Namespace) -> tuple[str, dict, ShardSource]:
    """(out_dir, TrainConfig overrides, source) for --resume: the run's saved config is the
    default; the data comes from the flags (or the config file), read with the saved batch size
    and seed. Flags that would change the SAE are refused here, the training ones by
    Trainer.resume."""
    train, data = build(args)
    if args.overwrite:
        raise ConfigError("--resume continues the run in --out-dir and --overwrite replaces it: pick one")
    out_dir = train.get("out_dir", _default("out_dir"))
    saved = RunDir(out_dir, _no_layout()).read_config()
    sae_saved = saved.get("sae", {})
    changed = {k: v for k, v in train.pop("sae").items() if sae_saved.get(k) != v}
    if changed:
        raise ConfigError(f"{out_dir} trained an SAE with " + ", ".join(f"{k}={sae_saved.get(k)!r}" for k in changed)
                          + ": a resumed run keeps its SAE; drop " + ", ".join("--" + k.replace("_", "-")
                                                                              for k in changed))
    source = _source(data, int(saved.get("batch_size", _default("batch_size"))), int(saved.get("seed", 0)))
    return out_dir, train, source


def _no_layout():
    from .parallel import LOCAL

    return LOCAL


def run(args: argparse.Namespace) -> int:
    from .train_model_cli import stream_flags

    if stream_flags(args):  # activations streamed from a model (fastsae.streaming, fastsae.e2e)
        from .train_model_cli import run as run_from_model

        return run_from_model(args)
    from .distributed.groups import init_distributed  # a plain run gets the local context: no process group

    layout = init_distributed(args.shards, args.replicas, args.dist_backend, args.dist_timeout)
    if args.resume:
        out_dir, overrides, source = prepare_resume(args)
        overrides.pop("out_dir", None)
        trainer = Trainer.resume(out_dir, source, checkpoint=args.checkpoint, layout=layout,
                                 allow_new_data=args.allow_new_data, **overrides)
    else:
        if args.checkpoint:
            raise ConfigError("--checkpoint picks where a resumed run continues from: add --resume")
        train, source = prepare(args)
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
