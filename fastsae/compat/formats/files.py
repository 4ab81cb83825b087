"""Reading and writing the files foreign checkpoints are made of, with errors that name them."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ...atomic import atomic_write, atomic_write_text
from ...errors import CheckpointError


def need_file(path: Path, looks_like: str, why: str) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a {looks_like} checkpoint needs it ({why})")
    return path


def read_json(path: Path, looks_like: str) -> dict[str, Any]:
    need_file(path, looks_like, "the config")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} (a {looks_like} config) is not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} (a {looks_like} config) must hold a JSON object, got {type(raw).__name__}")
    return raw


def read_safetensors(path: Path, looks_like: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors file, and its metadata header."""
    need_file(path, looks_like, "the weights")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} (the weights of a {looks_like} checkpoint) is not a readable safetensors file "
            f"({e}); it is corrupt or truncated"
        ) from e


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The metadata header alone (cheap: no tensor is read); {} for an unreadable file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return {}


def read_torch_state(path: Path, looks_like: str) -> dict[str, Any]:
    """A torch.save'd state dict, loaded without unpickling arbitrary objects."""
    need_file(path, looks_like, "the state dict")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a corrupt or foreign pickle
        raise CheckpointError(
            f"{path} (a {looks_like} checkpoint) could not be read by torch.load(weights_only=True) "
            f"({type(e).__name__}: {e}); it is corrupt, or not a plain state dict"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} should hold a state dict (a dict of tensors), got {type(state).__name__}")
    return state


def read_npz(path: Path, looks_like: str) -> dict[str, torch.Tensor]:
    need_file(path, looks_like, "the parameters")
    try:
        with np.load(str(path)) as data:
            return {k: torch.from_numpy(np.array(data[k])) for k in data.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path} (a {looks_like} params file) is not a readable .npz ({e}); it is corrupt") from e


def write_checkpoint(directory: str | os.PathLike, weights_name: str, tensors: dict[str, torch.Tensor],
                     cfg_name: str, cfg: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """Weights then config, each written atomically, into `directory` (created if absent)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"cannot save into {directory}: it is a file, and a checkpoint is a directory")
    tensors = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    atomic_write(directory / weights_name, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write_text(directory / cfg_name, json.dumps(cfg, indent=2) + "\n")
    return directory
