"""fastsae's native checkpoint: cfg.json + sae_weights.safetensors (SAELens's file names).

This module reads and writes the files (config and tensors); fastsae.sae builds modules from
them, so the dependency runs one way.

The weights file is the checkpoint: its metadata holds the config ("fastsae_cfg") and a
SHA-256 of the config and every tensor ("fastsae_sha256"). cfg.json is a copy for readers that
expect it (SAELens). A save writes cfg.json, then the weights, each atomically (temp file,
fsync, rename): the rename of the weights is the commit. Interrupted before it, the folder
still holds the previous weights with their own config, and that previous checkpoint loads;
after it, the new one does. A cfg.json that disagrees with the config inside the weights (a
save cut between the two renames, or an edit) is overruled by the weights, with a warning.
Loading checks the checksum, that every tensor is floating point and finite, and moves a
checkpoint saved on a device this machine lacks (cuda) to the CPU. See docs/checkpoints.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_write, atomic_write_text
from .config import SAEConfig, dtype_to_str
from .errors import CheckpointError, ConfigError

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
CFG_KEY = "fastsae_cfg"
CHECKSUM_KEY = "fastsae_sha256"


class CheckpointWarning(UserWarning):
    """A checkpoint loaded, but not exactly as its files say (stale cfg.json, device moved)."""


_HASH_BLOCK = 1 << 24  # 16 MiB


def sha256_tensors(named: Iterable[tuple[str, torch.Tensor]], prefix: bytes = b"") -> str:
    """A SHA-256 tree hash of `prefix` and each (name, dtype, shape, bytes) in the given order:
    each 16 MiB block of a tensor's bytes is hashed on its own, in threads (hashlib releases
    the GIL), and the block digests are hashed in order, so a wide SAE verifies on every core."""
    h = hashlib.sha256(prefix)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for name, t in named:
            t = t.detach().contiguous().cpu()
            h.update(f"\0{name}\0{dtype_to_str(t.dtype)}\0{tuple(t.shape)}\0".encode())
            if t.numel():
                data = t.reshape(-1).view(torch.uint8).numpy().data
                blocks = [data[i:i + _HASH_BLOCK] for i in range(0, len(data), _HASH_BLOCK)]
                for digest in pool.map(lambda b: hashlib.sha256(b).digest(), blocks):
                    h.update(digest)
    return h.hexdigest()


def _checksum(cfg_text: str, tensors: dict[str, torch.Tensor]) -> str:
    return sha256_tensors(sorted(tensors.items()), prefix=cfg_text.encode())


def saved_config(sae) -> SAEConfig:
    """sae.cfg with dtype and device as the module's weights actually are (sae.to(...) does
    not update the config)."""
    w = next(iter(sae.parameters()), None)
    if w is None:
        return sae.cfg
    return sae.cfg.replace(dtype=dtype_to_str(w.dtype), device=str(w.device))


def save_sae(sae, path: str | os.PathLike) -> Path:
    """Write the config and `sae.state_dict()` into directory `path` (see the module docstring)."""
    return write_checkpoint(path, saved_config(sae), sae.state_dict())


def write_checkpoint(path: str | os.PathLike, cfg: SAEConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `cfg` and `tensors` as a checkpoint in directory `path`: cfg.json, then the weights
    with the config and checksum in their metadata (the commit)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot save into {path}: it is a file, and a checkpoint is a directory")
    cfg_text = json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    metadata = {CFG_KEY: cfg_text, CHECKSUM_KEY: _checksum(cfg_text, tensors)}
    atomic_write_text(path / CFG_NAME, cfg_text + "\n")
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def _parse_config(raw, where: str) -> SAEConfig:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where} must hold a JSON object, got {type(raw).__name__}")
    try:
        return SAEConfig.from_dict(raw)
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{where} does not describe a valid SAE: {e}") from e


def read_config(path: str | os.PathLike) -> SAEConfig:
    """The config of cfg.json alone (read_checkpoint also checks it against the weights)."""
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
    return _parse_config(raw, str(cfg_path))


def _read_weights(weights_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file ({e}); it is corrupt") from e


def _check_tensors(weights_path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    for name, t in state.items():
        if not t.is_floating_point():
            raise CheckpointError(
                f"{weights_path}: {name} is {dtype_to_str(t.dtype)}, but an SAE's tensors are floating point: "
                "the file is corrupt or was not written by fastsae"
            )
    if CHECKSUM_KEY in metadata and _checksum(metadata.get(CFG_KEY, ""), state) != metadata[CHECKSUM_KEY]:
        raise CheckpointError(
            f"{weights_path} does not match the checksum it was saved with: the file is corrupt "
            "(a disk or copy error); restore it from a backup or save it again"
        )
    for name, t in state.items():
        # A NaN/inf anywhere makes the sum non-finite; a sum is ~20x faster than isfinite().
        # Only then count (an overflowing sum of finite values counts 0 and passes).
        if t.numel() == 0 or bool(torch.isfinite(t.sum())):
            continue
        bad = int(t.numel() - torch.isfinite(t).sum())
        if bad:
            raise CheckpointError(
                f"{weights_path}: {name} holds {bad} NaN/inf value(s) of {t.numel()}: the weights are "
                "corrupt (or the model diverged before it was saved); load an earlier checkpoint"
            )


def _config_fields_differing(a: SAEConfig, b: SAEConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return sorted(k for k in da if da[k] != db.get(k))


def _usable_device(cfg: SAEConfig, path: Path) -> SAEConfig:
    """cfg on the CPU when its device type is not on this machine (a GPU checkpoint on a laptop)."""
    try:
        device = torch.device(cfg.device)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: device {cfg.device!r} in its config is not a device name ({e})") from e
    available = device.type == "cpu" or (
        device.type == "cuda" and torch.cuda.is_available()
        or device.type == "mps" and torch.backends.mps.is_available()
        or device.type not in ("cuda", "mps")  # other device types: let torch decide
    )
    if available:
        return cfg
    warnings.warn(f"{path} was saved on {cfg.device}, which this machine does not have: loading it on the CPU "
                  "(pass device=... to choose)", CheckpointWarning, stacklevel=4)
    return cfg.replace(device="cpu")


def read_checkpoint(path: str | os.PathLike, device=None) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    """(config, tensors on CPU) of a checkpoint written by save_pretrained; the modules that
    hold them are built by fastsae.sae.load_sae. `device`: the device the caller will put the
    SAE on (None: the saved one, or the CPU if this machine lacks it, with a warning)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the directory does not exist")
    cfg = read_config(path)
    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        raise CheckpointError(f"{path} has {CFG_NAME} but no {WEIGHTS_NAME}: the checkpoint is incomplete")
    state, metadata = _read_weights(weights_path)
    _check_tensors(weights_path, state, metadata)
    if CFG_KEY in metadata:
        try:
            embedded = _parse_config(json.loads(metadata[CFG_KEY]), f"the config inside {weights_path}")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"the config inside {weights_path} is not valid JSON ({e}): the file is "
                                  "corrupt") from e
        differing = _config_fields_differing(cfg, embedded)
        if differing:
            warnings.warn(
                f"{path / CFG_NAME} disagrees with the config saved inside {WEIGHTS_NAME} on "
                f"{', '.join(differing)} (a save was interrupted, or {CFG_NAME} was edited): loading the "
                f"weights with their own config; save the SAE again to rewrite {CFG_NAME}",
                CheckpointWarning, stacklevel=2)
            cfg = embedded
    if device is None:
        cfg = _usable_device(cfg, path)
    return cfg, state
