"""Sharded checkpoints: one safetensors file per latent shard plus a manifest.

    <dir>/manifest.json                               cfg, d_sae and each file's latent range
    <dir>/shard-00000-of-00004.<save id>.safetensors  W_enc[:, s:e], b_enc[s:e], W_dec[s:e],
                                                      (threshold[s:e]) and the replicated
                                                      tensors (b_dec, BatchTopK's threshold)

Saving is collective: the ranks of replica 0 each write their shard atomically
(fastsae.atomic), all ranks meet at a barrier, then rank 0 writes the manifest atomically and
removes files of earlier saves. The manifest is the commit point: a save interrupted at any
moment leaves the previous manifest and the files it names intact. The save id in the file
names keeps a new save from overwriting files the old manifest still points at.

Loading reads only the latent range a rank needs (safetensors slices), so a checkpoint
written by S ranks loads into any other number of shards, and `load_full` / `consolidate`
give the single-process SAE (for inference on one device and for the format converters).
All ranks must see the same directory (a shared filesystem).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import atomic_write, atomic_write_text
from ..checkpoint import save_sae
from ..config import SAEConfig
from ..errors import CheckpointError, ConfigError
from ..parallel import ParallelContext, shard_range
from ..sae import BaseSAE, build_sae
from .collectives import checked

MANIFEST_NAME = "manifest.json"
FORMAT = "fastsae-sharded"
VERSION = 1


def shard_file_name(shard: int, shards: int, save_id: str) -> str:
    return f"shard-{shard:05d}-of-{shards:05d}.{save_id}.safetensors"


def _world_barrier(what: str) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        checked(what, dist.barrier)


def _agreed_save_id() -> str:
    """A fresh id, the same on every rank (rank 0 draws it)."""
    box = [secrets.token_hex(4)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        checked("broadcast of the checkpoint's save id", lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def save_sharded(sae: BaseSAE, path: str | os.PathLike) -> Path:
    """Write `sae` (every rank calls this) into directory `path`; returns the path."""
    path = Path(path)
    layout = sae.context
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot save into {path}: it is a file, and a sharded checkpoint is a directory")
    save_id = _agreed_save_id()
    cfg_text = json.dumps(sae.cfg.to_dict(), sort_keys=True)
    name = shard_file_name(layout.shard, layout.shards, save_id)
    error = None
    if layout.replica == 0:  # replicas hold identical copies: one writes
        tensors = {k: t.detach().contiguous().cpu() for k, t in sae.state_dict().items()}
        meta = {"fastsae_cfg": cfg_text, "shard": str(layout.shard), "shards": str(layout.shards),
                "start": str(sae.shard_start), "end": str(sae.shard_end)}
        try:
            atomic_write(path / name, lambda tmp: save_file(tensors, tmp, metadata=meta))
        except OSError as e:  # tell the others at the barrier instead of leaving them waiting
            error = e
    failed = _any_rank_failed(error is not None)
    if failed:
        raise CheckpointError(
            f"writing the sharded checkpoint {path} failed on {'this rank' if error else 'another rank'}"
            + (f" ({type(error).__name__}: {error})" if error else "")
            + "; the previous checkpoint there (if any) is intact: free disk space or fix permissions"
        ) from error
    if layout.is_main:
        manifest = {
            "format": FORMAT, "version": VERSION, "cfg": sae.cfg.to_dict(), "d_sae": sae.d_sae,
            "save_id": save_id,
            "shards": [{"file": shard_file_name(s, layout.shards, save_id),
                        "start": shard_range(sae.d_sae, layout.shards, s)[0],
                        "end": shard_range(sae.d_sae, layout.shards, s)[1]} for s in range(layout.shards)],
        }
        atomic_write_text(path / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
        keep = {s["file"] for s in manifest["shards"]}
        for old in path.glob("shard-*.safetensors"):  # files of earlier saves
            if old.name not in keep:
                old.unlink(missing_ok=True)
    _world_barrier("barrier after writing the checkpoint manifest")
    return path


def _any_rank_failed(failed: bool) -> bool:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return failed
    flag = torch.tensor([1 if failed else 0], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    checked("all_reduce of the checkpoint write status", lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX))
    return bool(flag.item())


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        hint = (" (it looks like a single-process checkpoint: load it with fastsae.load)"
                if (path / "cfg.json").is_file() else "")
        raise CheckpointError(f"no {MANIFEST_NAME} in {path}: not a sharded fastsae checkpoint{hint}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mpath} is not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath} is not a {FORMAT} manifest")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(f"{mpath} has version {manifest['version']}; this fastsae reads up to {VERSION}: upgrade")
    try:
        manifest["cfg"] = SAEConfig.from_dict(manifest["cfg"])
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{mpath} does not describe a valid SAE: {e}") from e
    expected, n = 0, manifest["cfg"].d_sae
    for s in manifest["shards"]:  # the files must tile [0, d_sae) in order
        if s["start"] != expected or s["end"] <= s["start"]:
            raise CheckpointError(f"{mpath}: the shard latent ranges do not tile [0, {n}) (at {s})")
        expected = s["end"]
        if not (path / s["file"]).is_file():
            raise CheckpointError(
                f"{path / s['file']} is missing: the checkpoint in {path} is incomplete (was it copied "
                "without all its shard files?)"
            )
    if expected != n:
        raise CheckpointError(f"{mpath}: the shards cover {expected} latents but d_sae={n}")
    return manifest


def _read_range(path: Path, manifest: dict, start: int, end: int, latent: dict[str, int]) -> dict[str, torch.Tensor]:
    """The state dict for latents [start, end): latent tensors assembled from the shard files
    that overlap the range, replicated tensors from the first file. latent: name -> the
    dimension that runs over latents."""
    parts: dict[str, list[torch.Tensor]] = {}
    replicated: dict[str, torch.Tensor] = {}
    for i, s in enumerate(manifest["shards"]):
        lo, hi = max(start, s["start"]), min(end, s["end"])
        if lo >= hi and i > 0:
            continue
        fpath = path / s["file"]
        try:
            with safe_open(str(fpath), framework="pt") as f:
                for name in f.keys():
                    if name not in latent:
                        if i == 0:
                            replicated[name] = f.get_tensor(name)
                        continue
                    if lo >= hi:
                        continue
                    sl = f.get_slice(name)
                    a, b = lo - s["start"], hi - s["start"]
                    parts.setdefault(name, []).append(sl[:, a:b] if latent[name] == 1 else sl[a:b])
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{fpath} is not a readable safetensors file ({e}); it is corrupt") from e
    state = dict(replicated)
    for name, chunks in parts.items():
        state[name] = torch.cat(chunks, latent[name])
    return state


def _check_state(state: dict, expected: dict, path: Path) -> None:
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(f"the shard files in {path} hold {sorted(state)}, expected {sorted(expected)}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(
                f"{path}: {name} reads as shape {tuple(state[name].shape)}, expected {shape}; the shard "
                "files disagree with the manifest"
            )


def _override(cfg: SAEConfig, device, dtype) -> SAEConfig:
    if device is not None:
        cfg = cfg.replace(device=str(device))
    return cfg if dtype is None else cfg.replace(dtype=dtype)


def load_sharded(path: str | os.PathLike, layout: ParallelContext | None = None, device=None,
                 dtype=None) -> BaseSAE:
    """This rank's shard, for `layout` (any number of shards), of a sharded checkpoint."""
    path = Path(path)
    manifest = read_manifest(path)
    cfg = manifest["cfg"]
    cfg = _override(cfg, device, dtype)
    with torch.device("meta"):
        sae = build_sae(cfg.replace(device="meta"), layout, init=False)
    state = _read_range(path, manifest, sae.shard_start, sae.shard_end, sae.latent_dims)
    _check_state(state, {k: tuple(v.shape) for k, v in sae.state_dict().items()}, path)
    sae.load_state_dict(state, strict=True, assign=True)
    sae.cfg = cfg
    return sae.to(device=cfg.device, dtype=cfg.torch_dtype)


def load_full(path: str | os.PathLike, device=None, dtype=None) -> BaseSAE:
    """The whole SAE of a sharded checkpoint, as the single-process module (no
    torch.distributed needed): for inference on one device and for the converters."""
    path = Path(path)
    manifest = read_manifest(path)
    cfg = manifest["cfg"]
    cfg = _override(cfg, device, dtype)
    with torch.device("meta"):
        sae = build_sae(cfg.replace(device="meta"), init=False)
    state = _read_range(path, manifest, 0, cfg.d_sae, sae.latent_dims)
    _check_state(state, {k: tuple(v.shape) for k, v in sae.state_dict().items()}, path)
    sae.load_state_dict(state, strict=True, assign=True)
    sae.cfg = cfg
    return sae.to(device=cfg.device, dtype=cfg.torch_dtype)


def consolidate(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Rewrite a sharded checkpoint as a single-process one (cfg.json + sae_weights.safetensors),
    the format fastsae.load and every converter read."""
    return save_sae(load_full(path), out)


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()
