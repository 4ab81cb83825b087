"""The format registry, format detection, and the one loader and saver over all formats."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch

from ...errors import CheckpointError, InputError
from . import dictionary_learning, gemma_scope, native, openai, saelens, sharded, sparsify
from .files import safetensors_metadata

# Detection tries these in order: fastsae before SAELens (same file names, told apart by content).
FORMATS = {m.NAME: m for m in (native, sharded, saelens, sparsify, dictionary_learning, gemma_scope, openai)}
SAVABLE = tuple(name for name, m in FORMATS.items() if hasattr(m, "save"))
# Naming one of a checkpoint's files means its directory.
_DIRECTORY_FILES = {"cfg.json", "sae_weights.safetensors", "sae.safetensors", "config.json"}


def _listing(path: Path) -> str:
    if path.is_dir():
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        return f"it holds {names[:20]}{' ...' if len(names) > 20 else ''}"
    return f"it is a {path.suffix or 'suffix-less'} file"


def _torch_file_format(path: Path) -> str | None:
    """Which library wrote a .pt state dict, from its keys (mmap: nothing big is read)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format checkpoint: fall back to a plain read
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"{path} could not be read by torch.load(weights_only=True) ({type(e).__name__}: {e}); "
                f"it is corrupt, or not a plain state dict. {_expected()}"
            ) from e
    if not isinstance(state, dict):
        return None
    if openai.state_looks_like(state):
        return openai.NAME
    if dictionary_learning.state_looks_like(state):
        return dictionary_learning.NAME
    raise CheckpointError(
        f"{path} is a torch state dict with keys {sorted(state)[:20]}, which match no format fastsae "
        f"reads: an OpenAI sparse_autoencoder one needs {list(openai.KEYS)}, a dictionary_learning one "
        f"needs e.g. {list(dictionary_learning.KEYS['AutoEncoder'])}. {_expected()}"
    )


def _expected() -> str:
    return "Formats fastsae reads: " + "; ".join(m.DESCRIPTION for m in FORMATS.values()) + "."


def detect_format(path: str | os.PathLike) -> str:
    """The name of the checkpoint format at `path` (a key of FORMATS)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    if path.is_file() and path.name in _DIRECTORY_FILES:
        path = path.parent
    for name, module in FORMATS.items():
        if module is openai:
            continue  # told apart from dictionary_learning's .pt files by their keys, below
        if module.looks_like(path):
            if module is dictionary_learning and path.is_file():
                break
            return name
    if path.is_file() and openai.looks_like(path):
        found = _torch_file_format(path)
        if found is not None:
            return found
    if path.is_dir():
        _raise_incomplete(path)
        raise CheckpointError(
            f"no cfg.json in {path}, nor any other checkpoint file fastsae knows ({_listing(path)}); "
            f"fastsae's own checkpoints are written by sae.save_pretrained(dir). {_expected()}"
        )
    raise CheckpointError(f"{path} is not a checkpoint fastsae recognises ({_listing(path)}). {_expected()}")


def _raise_incomplete(path: Path) -> None:
    """A directory with half of a two-file checkpoint: say which format it looked like."""
    cfg_file, weights_file = path / "cfg.json", path / native.WEIGHTS_NAME
    if weights_file.is_file() and not cfg_file.is_file():
        fmt = "fastsae" if "fastsae_cfg" in safetensors_metadata(weights_file) else "fastsae or SAELens"
        raise CheckpointError(
            f"no cfg.json in {path}: it holds {native.WEIGHTS_NAME}, so it looks like a {fmt} checkpoint, "
            f"which needs cfg.json beside it (as written by save_pretrained / save_model); it is incomplete"
        )
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cfg = {}
        if isinstance(cfg, dict) and ("num_latents" in cfg or "expansion_factor" in cfg):
            fmt, missing = sparsify.LOOKS_LIKE, sparsify.WEIGHTS_NAME
        else:
            fmt, missing = ("fastsae" if native.looks_like_cfg(cfg) else "SAELens"), native.WEIGHTS_NAME
        raise CheckpointError(
            f"{path} has cfg.json but no {missing}: it looks like a {fmt} checkpoint, and is incomplete"
        )


def _directory(path: Path) -> Path:
    return path.parent if path.is_file() and path.name in _DIRECTORY_FILES else path


def load(path: str | os.PathLike, format: str | None = None, device=None, dtype=None, **options):
    """Load an SAE checkpoint of any supported format into a fastsae module.

    format: one of FORMATS (detected when None). options go to that format's loader, e.g.
    hookpoint= (sparsify run directories), norm_scaling_factor= (SAELens), dict_class= and
    apply_b_dec_to_input= (dictionary_learning).
    """
    name = format or detect_format(path)
    if name not in FORMATS:
        raise InputError(f"format {name!r} is unknown: use one of {', '.join(FORMATS)} (or None to detect it)")
    loader = FORMATS[name].load
    accepted = set(inspect.signature(loader).parameters) - {"path", "device", "dtype"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise InputError(
            f"the {name} loader takes no option(s) {unknown}; it takes {sorted(accepted) or 'none'}"
        )
    return loader(_directory(Path(path)), device=device, dtype=dtype, **options)


def save(sae, path: str | os.PathLike, format: str = "fastsae") -> Path:
    """Save a fastsae module as `format` ("fastsae", "saelens" or "sparsify")."""
    if format not in SAVABLE:
        raise InputError(f"cannot save as {format!r}: fastsae writes {', '.join(SAVABLE)}")
    return FORMATS[format].save(sae, path)
