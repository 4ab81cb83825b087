"""dictionary_learning (saprmarks/dictionary_learning) checkpoints: ae.pt + config.json.

ae.pt is a torch state dict; config.json's ["trainer"]["dict_class"] names the class:
- AutoEncoder:     encoder.weight [n,d], encoder.bias, decoder.weight [d,n], bias (= b_dec) -> standard
- AutoEncoderTopK: encoder.*, decoder.weight [d,n], b_dec, k, threshold (unused by default) -> topk
- BatchTopKSAE:    as AutoEncoderTopK; inference keeps acts > threshold -> batchtopk
- MatryoshkaBatchTopKSAE: W_enc [d,n], b_enc, W_dec [n,d], b_dec, k, threshold, group_sizes
  -> matryoshka_batchtopk (widths = cumulative group sizes; level weights from config.json's
  trainer.group_weights when it is there)
- JumpReluAutoEncoder: W_enc, b_enc, W_dec, b_dec, threshold; does not subtract b_dec -> jumprelu
- GatedAutoEncoder: encoder.weight [n,d], gate_bias (= b_enc), r_mag, mag_bias (= b_mag),
  decoder.weight [d,n], decoder_bias (= b_dec) -> gated
Without config.json the class is inferred from the keys where that is unambiguous. `save`
writes Gated and Matryoshka BatchTopK SAEs as dictionary_learning does (ae.pt + config.json),
which `GatedAutoEncoder.from_pretrained` / `MatryoshkaBatchTopKSAE.from_pretrained` read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ...atomic import atomic_write, atomic_write_text
from ...errors import CheckpointError
from ...sae import sae_class
from .build import build_from_tensors, require_keys
from .files import read_json, read_torch_state

NAME = "dictionary_learning"
LOOKS_LIKE = "dictionary_learning"
WEIGHTS_NAME = "ae.pt"
CFG_NAME = "config.json"
DESCRIPTION = (f"dictionary_learning: a directory with {WEIGHTS_NAME} (+ {CFG_NAME} naming trainer.dict_class) "
               "for AutoEncoder, AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE, JumpReluAutoEncoder, "
               "GatedAutoEncoder")
_LINEAR = ("encoder.weight", "encoder.bias", "decoder.weight")
_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
KEYS = {
    "AutoEncoder": _LINEAR + ("bias",),
    "AutoEncoderTopK": _LINEAR + ("b_dec", "k"),
    "BatchTopKSAE": _LINEAR + ("b_dec", "k", "threshold"),
    "MatryoshkaBatchTopKSAE": _PARAMS + ("k", "threshold"),
    "JumpReluAutoEncoder": _PARAMS + ("threshold",),
    "GatedAutoEncoder": ("encoder.weight", "gate_bias", "r_mag", "mag_bias", "decoder.weight", "decoder_bias"),
}
ARCHITECTURES = {"AutoEncoder": "standard", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
                 "MatryoshkaBatchTopKSAE": "matryoshka_batchtopk", "JumpReluAutoEncoder": "jumprelu",
                 "GatedAutoEncoder": "gated"}


def _weights_path(path: Path) -> Path:
    return path / WEIGHTS_NAME if path.is_dir() else path


def state_looks_like(state: dict) -> bool:
    return ("encoder.weight" in state and "decoder.weight" in state
            and ("bias" in state or "b_dec" in state or "decoder_bias" in state)) or (
        "W_enc" in state and "threshold" in state)


def looks_like(path: Path) -> bool:
    return (path / WEIGHTS_NAME).is_file() if path.is_dir() else path.name == WEIGHTS_NAME


def infer_dict_class(state: dict, source: str) -> str:
    if "bias" in state and "encoder.weight" in state:
        return "AutoEncoder"
    if "group_sizes" in state:
        return "MatryoshkaBatchTopKSAE"
    if "gate_bias" in state:
        return "GatedAutoEncoder"
    if "W_enc" in state and "k" not in state:
        return "JumpReluAutoEncoder"
    raise CheckpointError(
        f"{source}: cannot tell which dictionary_learning class this is from its keys {sorted(state)} "
        f"(AutoEncoderTopK and BatchTopKSAE share them): put its {CFG_NAME} beside it, or pass "
        f"dict_class=<one of {sorted(KEYS)}>"
    )


def from_state(dict_class: str, state: dict[str, Any], source: str, device=None, dtype=None,
               apply_b_dec_to_input: bool | None = None, metadata: dict | None = None,
               group_weights: list[float] | None = None):
    """A fastsae module from a dictionary_learning class name and state dict."""
    if dict_class not in KEYS:
        raise CheckpointError(
            f"{source}: dictionary_learning class {dict_class!r} is not supported; fastsae loads "
            f"{', '.join(KEYS)}"
        )
    require_keys(state, KEYS[dict_class], source, f"{LOOKS_LIKE} {dict_class}")
    state = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    extra, config = {}, {}
    if dict_class in ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE"):
        W_enc, b_enc = state["encoder.weight"].t(), state["encoder.bias"]
        W_dec = state["decoder.weight"].t()
        b_dec = state["bias"] if dict_class == "AutoEncoder" else state["b_dec"]
    elif dict_class == "GatedAutoEncoder":  # x_enc = encoder(x - decoder_bias), always
        W_enc, b_enc, W_dec, b_dec = (state["encoder.weight"].t(), state["gate_bias"], state["decoder.weight"].t(),
                                      state["decoder_bias"])
        extra = {"r_mag": state["r_mag"], "b_mag": state["mag_bias"]}
        apply_b_dec_to_input = True
    else:
        W_enc, b_enc, W_dec, b_dec = (state[k] for k in _PARAMS)
    arch = ARCHITECTURES[dict_class]
    if arch == "matryoshka_batchtopk":
        sizes = [int(s) for s in state["group_sizes"].tolist()]
        config["matryoshka_widths"] = [sum(sizes[:i + 1]) for i in range(len(sizes))]
        if group_weights is not None:
            config["matryoshka_weights"] = [float(w) for w in group_weights]
    threshold = state.get("threshold") if arch in ("batchtopk", "matryoshka_batchtopk", "jumprelu") else None
    if arch in ("batchtopk", "matryoshka_batchtopk") and float(threshold) < 0:
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
        device=device, dtype=dtype if dtype is not None else W_enc.dtype, extra_tensors=extra, config=config,
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
                      apply_b_dec_to_input=apply_b_dec_to_input, metadata=extra,
                      group_weights=trainer.get("group_weights"))


def to_state(sae) -> tuple[dict[str, Any], dict[str, Any]]:
    """dictionary_learning's state dict and config.json of a Gated or Matryoshka BatchTopK SAE."""
    c = sae.cfg
    if c.transcoder or c.skip_connection or c.normalize_activations != "none":
        raise CheckpointError("dictionary_learning has no transcoders, skip connections or input normalisation: "
                              "save this SAE with format='fastsae'")
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, k).detach() for k in _PARAMS)
    if c.architecture == "gated":
        if not c.apply_b_dec_to_input:  # x·W == (x - b_dec)·W + b_dec·W: fold it into both paths' biases
            shift = b_dec @ W_enc
            b_enc, b_mag = b_enc + shift, sae.b_mag.detach() + shift * sae.r_mag.detach().exp()
        else:
            b_mag = sae.b_mag.detach()
        state = {"decoder_bias": b_dec, "encoder.weight": W_enc.t(), "r_mag": sae.r_mag.detach(),
                 "gate_bias": b_enc, "mag_bias": b_mag, "decoder.weight": W_dec.t()}
        trainer = {"dict_class": "GatedAutoEncoder", "activation_dim": c.d_in, "dict_size": c.d_sae,
                   "l1_penalty": c.l1_coefficient}
    elif c.architecture == "matryoshka_batchtopk":
        if not c.apply_b_dec_to_input:
            raise CheckpointError("dictionary_learning's Matryoshka SAE always subtracts b_dec from its input, "
                                  "and a top-k selection cannot fold it into b_enc: save with format='saelens'")
        widths = list(c.matryoshka_widths)
        sizes = [b - a for a, b in zip([0] + widths[:-1], widths)]
        state = {"k": torch.tensor(c.k, dtype=torch.int), "threshold": sae.threshold.detach().float(),
                 "group_sizes": torch.tensor(sizes), "W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        trainer = {"dict_class": "MatryoshkaBatchTopKSAE", "activation_dim": c.d_in, "dict_size": c.d_sae,
                   "k": c.k, "group_fractions": [s / c.d_sae for s in sizes],
                   "group_weights": list(c.matryoshka_weights or [1.0] * len(sizes)),
                   "threshold_beta": c.batchtopk_threshold_momentum}
    else:
        raise CheckpointError(
            f"fastsae writes dictionary_learning's Gated and Matryoshka BatchTopK SAEs; this one is "
            f"{c.architecture!r}: save it with format='saelens' or 'fastsae'"
        )
    for k in ("layer", "lm_name", "submodule_name"):
        if k in c.metadata:
            trainer[k] = c.metadata[k]
    return state, {"trainer": trainer}


def save(sae, path: str | os.PathLike) -> Path:
    """Write `sae` as dictionary_learning does: ae.pt (a torch state dict) + config.json."""
    state, cfg = to_state(sae)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot save into {path}: it is a file, and a checkpoint is a directory")
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: torch.save(state, tmp))
    atomic_write_text(path / CFG_NAME, json.dumps(cfg, indent=2) + "\n")
    return path
