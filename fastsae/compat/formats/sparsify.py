"""EleutherAI sparsify checkpoints: cfg.json + sae.safetensors, one per hookpoint.

Weights: encoder.weight [n, d], encoder.bias [n], W_dec [n, d], b_dec [d]. A training run
directory holds one such folder per hookpoint (`layers.6`, `layers.6.mlp`, ...).
sparsify encodes top-k of relu(x·Wᵀ + b) after subtracting b_dec (not for transcoders);
fastsae's TopK gives the same values and latents. Transcoders (transcode=True) load as a
TopK SAE with transcoder=True (b_dec not subtracted; sparsify's output has the input's
width); a skip connection (skip_connection=True, W_skip [d, d] applied as x·W_skipᵀ) is
fastsae's W_skip as it is. groupmax activations have no fastsae equivalent and are refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError
from .build import build_from_tensors, require_keys
from .files import read_json, read_safetensors, write_checkpoint

NAME = "sparsify"
LOOKS_LIKE = "sparsify"
CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"
DESCRIPTION = (f"sparsify: a directory with {CFG_NAME} + {WEIGHTS_NAME} (encoder.weight, encoder.bias, "
               "W_dec, b_dec), or a run directory with one such folder per hookpoint")
KEYS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")


def _is_coder_dir(path: Path) -> bool:
    return (path / CFG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def hookpoints(path: Path) -> list[str]:
    """The hookpoint folders of a sparsify run directory, sorted."""
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if p.is_dir() and _is_coder_dir(p))


def looks_like(path: Path) -> bool:
    return path.is_dir() and (_is_coder_dir(path) or bool(hookpoints(path)))


def from_state(cfg: dict[str, Any], state: dict[str, torch.Tensor], source: str, device=None, dtype=None):
    """A fastsae TopKSAE from a sparsify cfg dict (with d_in) and state dict."""
    if cfg.get("activation", "topk") != "topk":
        raise CheckpointError(
            f"{source}: sparsify activation {cfg.get('activation')!r} is not supported; fastsae loads "
            "activation='topk' coders"
        )
    skip = bool(cfg.get("skip_connection")) or "W_skip" in state
    require_keys(state, KEYS + (("W_skip",) if skip else ()), source, LOOKS_LIKE)
    d_in = cfg.get("d_in")
    if not isinstance(d_in, int):
        raise CheckpointError(f"{source}: the sparsify config needs an integer 'd_in', got {d_in!r}")
    n = cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 32))
    enc = state["encoder.weight"]
    transcode = bool(cfg.get("transcode", False))
    return build_from_tensors(
        source=source, architecture="topk", d_in=d_in, d_sae=int(n),
        W_enc=enc.t(), b_enc=state["encoder.bias"], W_dec=state["W_dec"], b_dec=state["b_dec"],
        k=int(cfg.get("k", 32)), apply_b_dec_to_input=not transcode,
        metadata={"source_format": NAME, "sparsify_cfg": cfg}, device=device,
        dtype=dtype if dtype is not None else enc.dtype,
        extra_tensors={"W_skip": state["W_skip"]} if skip else None,
        config={"transcoder": transcode, "skip_connection": skip},
    )


def _load_dir(path: Path, device=None, dtype=None):
    cfg = read_json(path / CFG_NAME, LOOKS_LIKE)
    state, _ = read_safetensors(path / WEIGHTS_NAME, LOOKS_LIKE)
    return from_state(cfg, state, str(path / WEIGHTS_NAME), device=device, dtype=dtype)


def load(path: str | os.PathLike, device=None, dtype=None, hookpoint: str | None = None):
    """One coder: `path` is its folder, or a run directory plus `hookpoint` (needed when the
    run has several)."""
    path = Path(path)
    if hookpoint is not None:
        path = path / hookpoint
    elif not _is_coder_dir(path):
        found = hookpoints(path)
        if len(found) != 1:
            raise CheckpointError(
                f"{path} is a sparsify run directory with hookpoints {found}: pass hookpoint=<one of them> "
                "(or use fastsae.compat.formats.sparsify.load_many to load them all)"
            )
        path = path / found[0]
    return _load_dir(path, device=device, dtype=dtype)


def load_many(path: str | os.PathLike, device=None, dtype=None, layers: list[str] | None = None) -> dict:
    """Every coder of a run directory, by hookpoint (as sparsify's SparseCoder.load_many)."""
    path = Path(path)
    names = sorted(layers) if layers is not None else hookpoints(path)
    if not names:
        raise CheckpointError(f"{path} holds no sparsify hookpoint folders ({CFG_NAME} + {WEIGHTS_NAME} each)")
    return {name: _load_dir(path / name, device=device, dtype=dtype) for name in names}


def to_state(sae) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    c = sae.cfg
    if c.architecture != "topk":
        raise CheckpointError(
            f"sparsify stores per-row TopK coders only; this SAE is {c.architecture!r}: save it with "
            "format='saelens' instead"
        )
    if c.normalize_activations != "none":
        raise CheckpointError(
            f"sparsify has no input normalisation, and this SAE uses normalize_activations="
            f"{c.normalize_activations!r}: save it with format='saelens' instead"
        )
    if c.output_dim != c.d_in:
        raise CheckpointError(
            f"sparsify's transcoders write activations of their input's width; this one maps d_in={c.d_in} to "
            f"d_out={c.output_dim}: save it with format='fastsae'"
        )
    W_enc, b_enc = sae.W_enc.detach(), sae.b_enc.detach()
    if not c.apply_b_dec_to_input and not c.transcoder:  # x·W + b == (x - b_dec)·W + (b + b_dec·W)
        b_enc = b_enc + sae.b_dec.detach() @ W_enc
    tensors = {"encoder.weight": W_enc.t(), "encoder.bias": b_enc,
               "W_dec": sae.W_dec.detach(), "b_dec": sae.b_dec.detach()}
    if c.skip_connection:
        tensors["W_skip"] = sae.W_skip.detach()
    cfg = {"activation": "topk", "expansion_factor": max(1, c.d_sae // c.d_in), "normalize_decoder": True,
           "num_latents": c.d_sae, "k": c.k, "multi_topk": False, "skip_connection": c.skip_connection,
           "transcode": c.transcoder, "d_in": c.d_in}
    return cfg, tensors


def save(sae, path: str | os.PathLike) -> Path:
    """Write a TopK `sae` (or TopK transcoder, with or without skip connection) as sparsify does;
    `SparseCoder.load_from_disk(path)` reads it."""
    cfg, tensors = to_state(sae)
    return write_checkpoint(path, WEIGHTS_NAME, tensors, CFG_NAME, cfg)
