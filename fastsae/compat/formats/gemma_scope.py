"""Gemma Scope checkpoints: params.npz with W_enc [d,n], W_dec [n,d], b_enc, b_dec, threshold.

Gemma Scope SAEs are JumpReLU: acts = relu(pre)·1[pre > threshold] with pre = x·W_enc + b_enc,
so b_dec is *not* subtracted from the input (apply_b_dec_to_input=False); x_hat = acts·W_dec + b_dec.
Some exports spell the matrices w_enc / w_dec; both load.
"""

from __future__ import annotations

import os
from pathlib import Path

from .build import build_from_tensors, require_keys
from .files import read_npz

NAME = "gemma_scope"
LOOKS_LIKE = "Gemma Scope"
WEIGHTS_NAME = "params.npz"
DESCRIPTION = f"Gemma Scope: {WEIGHTS_NAME} (W_enc, W_dec, b_enc, b_dec, threshold), or a directory holding it"
KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def _params_path(path: Path) -> Path:
    return path / WEIGHTS_NAME if path.is_dir() else path


def looks_like(path: Path) -> bool:
    return _params_path(path).is_file() and _params_path(path).suffix == ".npz"


def load(path: str | os.PathLike, device=None, dtype=None):
    params_path = _params_path(Path(path))
    raw = read_npz(params_path, LOOKS_LIKE)
    state = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in raw.items()}
    require_keys(state, KEYS, str(params_path), LOOKS_LIKE)
    d_in, d_sae = state["W_enc"].shape
    return build_from_tensors(
        source=str(params_path), architecture="jumprelu", d_in=int(d_in), d_sae=int(d_sae),
        W_enc=state["W_enc"], b_enc=state["b_enc"], W_dec=state["W_dec"], b_dec=state["b_dec"],
        threshold=state["threshold"], apply_b_dec_to_input=False,
        metadata={"source_format": NAME}, device=device,
        dtype=dtype if dtype is not None else state["W_enc"].dtype,
    )
