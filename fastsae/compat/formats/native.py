"""fastsae's own checkpoint (cfg.json + sae_weights.safetensors, see fastsae/checkpoint.py).

SAELens uses the same two file names, so the format is told apart by what is inside: our
weights file carries the config in its metadata ("fastsae_cfg"), and our cfg.json has fields
SAELens never writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ...checkpoint import CFG_NAME, WEIGHTS_NAME, save_sae
from ...sae import load_sae
from .files import safetensors_metadata

NAME = "fastsae"
DESCRIPTION = f"fastsae: a directory with {CFG_NAME} (fastsae SAEConfig fields) + {WEIGHTS_NAME}"
_OWN_CFG_KEYS = ("check_finite", "backend", "batchtopk_threshold_momentum")


def looks_like(path: Path) -> bool:
    if not (path.is_dir() and (path / CFG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()):
        return False
    if "fastsae_cfg" in safetensors_metadata(path / WEIGHTS_NAME):
        return True
    try:
        cfg = json.loads((path / CFG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return looks_like_cfg(cfg)


def looks_like_cfg(cfg) -> bool:
    return isinstance(cfg, dict) and any(k in cfg for k in _OWN_CFG_KEYS)


def load(path: str | os.PathLike, device=None, dtype=None):
    return load_sae(path, device=device, dtype=dtype)


def save(sae, path: str | os.PathLike) -> Path:
    return save_sae(sae, path)
