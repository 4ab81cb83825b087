"""fastsae's native checkpoint: cfg.json + sae_weights.safetensors (SAELens's file names).

This module reads and writes the files (config and tensors); fastsae.sae builds modules from
them, so the dependency runs one way.

Each file is written atomically (temp file, fsync, rename), weights first: an interrupted
save leaves the previous checkpoint loadable. The config is also embedded in the
safetensors metadata ("fastsae_cfg"), so the weights file alone says what it holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_write, atomic_write_text
from .config import SAEConfig
from .errors import CheckpointError, ConfigError

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"


def save_sae(sae, path: str | os.PathLike) -> Path:
    """Write `sae.cfg` and `sae.state_dict()` into directory `path`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot save into {path}: it is a file, and a checkpoint is a directory")
    cfg_text = json.dumps(sae.cfg.to_dict(), indent=2, sort_keys=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in sae.state_dict().items()}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"fastsae_cfg": cfg_text}))
    atomic_write_text(path / CFG_NAME, cfg_text + "\n")
    return path


def read_config(path: str | os.PathLike) -> SAEConfig:
    cfg_path = Path(path) / CFG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(
            f"no {CFG_NAME} in {path}: a fastsae checkpoint is a directory with {CFG_NAME} and "
            f"{WEIGHTS_NAME}, as written by sae.save_pretrained(dir)"
        )
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object, got {type(raw).__name__}")
    try:
        return SAEConfig.from_dict(raw)
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{cfg_path} does not describe a valid SAE: {e}") from e


def read_checkpoint(path: str | os.PathLike) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    """(config, tensors on CPU) of a checkpoint written by save_pretrained; the modules that
    hold them are built by fastsae.sae.load_sae."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the directory does not exist")
    cfg = read_config(path)
    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        raise CheckpointError(f"{path} has {CFG_NAME} but no {WEIGHTS_NAME}: the checkpoint is incomplete")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file ({e}); it is corrupt") from e
    return cfg, state
