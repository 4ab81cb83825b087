"""dictionary_learning (saprmarks/dictionary_learning) checkpoints: ae.pt + config.json.

ae.pt is a torch state dict; config.json's ["trainer"]["dict_class"] names the class:
- AutoEncoder:     encoder.weight [n,d], encoder.bias, decoder.weight [d,n], bias (= b_dec) -> standard
- AutoEncoderTopK: encoder.*, decoder.weight [d,n], b_dec, k, threshold (unused by default) -> topk
- BatchTopKSAE:    as AutoEncoderTopK; inference keeps acts > threshold -> batchtopk
- MatryoshkaBatchTopKSAE: W_enc [d,n], b_enc, W_dec [n,d], b_dec, k, threshold, group_sizes
  (inference, all groups active, is BatchTopK's) -> batchtopk
- JumpReluAutoEncoder: W_enc, b_enc, W_dec, b_dec, threshold; does not subtract b_dec -> jumprelu
Without config.json the class is inferred from the keys where that is unambiguous.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError
from ...sae import sae_class
from .build import build_from_tensors, require_keys
from .files import read_json, read_torch_state

NAME = "dictionary_learning"
LOOKS_LIKE = "dictionary_learning"
WEIGHTS_NAME = "ae.pt"
CFG_NAME = "config.json"
DESCRIPTION = (f"dictionary_learning: a directory with {WEIGHTS_NAME} (+ {CFG_NAME} naming trainer.dict_class) "
               "for AutoEncoder, AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE, JumpReluAutoEncoder")
_LINEAR = ("encoder.weight", "encoder.bias", "decoder.weight")
_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
KEYS = {
    "AutoEncoder": _LINEAR + ("bias",),
    "AutoEncoderTopK": _LINEAR + ("b_dec", "k"),
    "BatchTopKSAE": _LINEAR + ("b_dec", "k", "threshold"),
    "MatryoshkaBatchTopKSAE": _PARAMS + ("k", "threshold"),
    "JumpReluAutoEncoder": _PARAMS + ("threshold",),
}


def _weights_path(path: Path) -> Path:
    return path / WEIGHTS_NAME if path.is_dir() else path


def state_looks_like(state: dict) -> bool:
    return ("encoder.weight" in state and "decoder.weight" in state
            and ("bias" in state or "b_dec" in state)) or ("W_enc" in state and "threshold" in state)


def looks_like(path: Path) -> bool:
    return (path / WEIGHTS_NAME).is_file() if path.is_dir() else path.name == WEIGHTS_NAME


def infer_dict_class(state: dict, source: str) -> str:
    if "bias" in state and "encoder.weight" in state:
        return "AutoEncoder"
    if "group_sizes" in state:
        return "MatryoshkaBatchTopKSAE"
    if "W_enc" in state and "k" not in state:
        return "JumpReluAutoEncoder"
    raise CheckpointError(
        f"{source}: cannot tell which dictionary_learning class this is from its keys {sorted(state)} "
        f"(AutoEncoderTopK and BatchTopKSAE share them): put its {CFG_NAME} beside it, or pass "
        f"dict_class=<one of {sorted(KEYS)}>"
    )


def from_state(dict_class: str, state: dict[str, Any], source: str, device=None, dtype=None,
               apply_b_dec_to_input: bool | None = None, metadata: dict | None = None):
    """A fastsae module from a dictionary_learning class name and state dict."""
    if dict_class not in KEYS:
        raise CheckpointError(
            f"{source}: dictionary_learning class {dict_class!r} is not supported; fastsae loads "
            f"{', '.join(KEYS)}"
        )
    require_keys(state, KEYS[dict_class], source, f"{LOOKS_LIKE} {dict_class}")
    state = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    if dict_class in ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE"):
        W_enc, b_enc = state["encoder.weight"].t(), state["encoder.bias"]
        W_dec = state["decoder.weight"].t()
        b_dec = state["bias"] if dict_class == "AutoEncoder" else state["b_dec"]
    else:
        W_enc, b_enc, W_dec, b_dec = (state[k] for k in _PARAMS)
    arch = {"AutoEncoder": "standard", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
            "MatryoshkaBatchTopKSAE": "batchtopk", "JumpReluAutoEncoder": "jumprelu"}[dict_class]
    threshold = state.get("threshold") if arch in ("batchtopk", "jumprelu") else None
    if arch == "batchtopk" and float(threshold) < 0:
        raise CheckpointError(
            f"{source}: this {dict_class} never learned its inference threshold (threshold = "
            f"{float(threshold)}), so dictionary_learning would run it as a plain ReLU SAE: load it "
            "with dict_class='AutoEncoderTopK' for per-row top-k, or train it further"
        )
    d_in, d_sae = W_enc.shape
    if apply_b_dec_to_input is None:  # JumpReluAutoEncoder's attribute, not in its state dict
        apply_b_dec_to_input = arch != "jumprelu"
    return build_from_tensors(
        source=source, architecture=arch, d_in=int(d_in), d_sae=int(d_sae),
        W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold,
        k=int(state["k"]) if sae_class(arch).needs_k else None,
        apply_b_dec_to_input=apply_b_dec_to_input,
        metadata={"source_format": NAME, "dict_class": dict_class, **(metadata or {})},
        device=device, dtype=dtype if dtype is not None else W_enc.dtype,
    )


def load(path: str | os.PathLike, device=None, dtype=None, dict_class: str | None = None,
         apply_b_dec_to_input: bool | None = None):
    """`path`: a directory with ae.pt (+ config.json), or the .pt file itself."""
    path = Path(path)
    weights = _weights_path(path)
    state = read_torch_state(weights, LOOKS_LIKE)
    trainer: dict[str, Any] = {}
    cfg_path = weights.parent / CFG_NAME
    if cfg_path.is_file():
        trainer = read_json(cfg_path, LOOKS_LIKE).get("trainer") or {}
    dict_class = dict_class or trainer.get("dict_class") or infer_dict_class(state, str(weights))
    if "k" in trainer and "k" in state and int(trainer["k"]) != int(state["k"]):
        raise CheckpointError(
            f"{cfg_path} says k={trainer['k']} but {weights} holds k={int(state['k'])}; the two files disagree"
        )
    extra = {k: trainer[k] for k in ("layer", "lm_name", "submodule_name") if k in trainer}
    return from_state(dict_class, state, str(weights), device=device, dtype=dtype,
                      apply_b_dec_to_input=apply_b_dec_to_input, metadata=extra)
