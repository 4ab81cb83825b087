"""A sharded fastsae checkpoint (fastsae.distributed): one file per latent shard + manifest.json.

Loading it here gives the whole SAE as one single-process module, so `fastsae.load` and the
converters read sharded training runs too.
"""

from __future__ import annotations

import os
from pathlib import Path

NAME = "fastsae-sharded"
MANIFEST = "manifest.json"
DESCRIPTION = f"fastsae-sharded: a directory with {MANIFEST} + one safetensors file per latent shard"


def looks_like(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def load(path: str | os.PathLike, device=None, dtype=None):
    from ...distributed.checkpoint import load_full  # torch.distributed is only needed here

    return load_full(path, device=device, dtype=dtype)
