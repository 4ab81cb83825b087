"""SAELens checkpoints: cfg.json + sae_weights.safetensors (W_enc [d,n], b_enc, W_dec [n,d], b_dec).

Loaded as SAELens's `SAE.load_from_disk` computes, with every reparameterisation folded into
the weights once, at load time (each fold is exact up to float rounding):
- `rescale_acts_by_decoder_norm` (topk): pre·‖W_dec‖ and acts/‖W_dec‖ become W_enc, b_enc ·‖W_dec‖
  and W_dec/‖W_dec‖;
- the pre-6.0 `scaling_factor` (finetuning): acts·s becomes W_dec·s;
- `expected_average_only_in` with a known `norm_scaling_factor` (load option): W_enc·s, W_dec/s,
  b_dec/s, as SAELens's `fold_activation_norm_scaling_factor`. Without it the runtime step is
  the identity, as in SAELens's `load_from_disk`;
- JumpReLU `log_threshold` (training checkpoints): threshold = exp(log_threshold);
- BatchTopK training checkpoints (`topk_threshold`): a fastsae BatchTopKSAE with that threshold.
`layer_norm` and `constant_norm_rescale` are per-row, so they stay a runtime step
(SAEConfig.normalize_activations). Saving writes SAELens 6's inference format: BatchTopK is
exported as JumpReLU with a per-latent copy of its threshold, as SAELens does.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError
from ...sae import sae_class
from .build import build_from_tensors, jsonable, require_keys
from .files import read_json, read_safetensors, write_checkpoint

NAME = "saelens"
LOOKS_LIKE = "SAELens"
CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
DESCRIPTION = f"SAELens: a directory with {CFG_NAME} + {WEIGHTS_NAME} (W_enc, b_enc, W_dec, b_dec[, threshold])"
SUPPORTED = ("standard", "topk", "jumprelu", "batchtopk")
_RUNTIME_NORMS = ("none", "layer_norm", "constant_norm_rescale")
# SAELens 6 reads cfgs without a version >= 6 through its pre-6.0 path; we write its format.
_WRITTEN_VERSION = "6.0.0"


def looks_like(path: Path) -> bool:
    return path.is_dir() and (path / CFG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def _upgrade_pre_6_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """SAELens < 6 named things differently; map them as SAELens's own loader does."""
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if version and str(version).split(".")[0].isdigit() and int(str(version).split(".")[0]) >= 6:
        return cfg
    cfg = dict(cfg)
    if "activation_fn_str" in cfg:
        cfg.setdefault("activation_fn", cfg.pop("activation_fn_str"))
    cfg.setdefault("architecture", "standard")
    cfg.setdefault("apply_b_dec_to_input", True)
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if cfg.get("activation_fn") == "topk" and kwargs.get("k") is not None:
        cfg["architecture"], cfg["k"] = "topk", kwargs["k"]
    if isinstance(cfg.get("normalize_activations"), bool):
        cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    return cfg


def from_state(cfg: dict[str, Any], state: dict[str, torch.Tensor], source: str,
               device=None, dtype=None, norm_scaling_factor: float | None = None):
    """A fastsae module from a SAELens cfg dict and state dict (a file's or a live SAE's)."""
    cfg = _upgrade_pre_6_cfg(cfg)
    arch = cfg.get("architecture", "standard")
    if arch not in SUPPORTED:
        raise CheckpointError(
            f"{source}: SAELens architecture {arch!r} is not supported; fastsae loads "
            f"{', '.join(SUPPORTED)}"
        )
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int):
            raise CheckpointError(f"{source}: the SAELens config needs an integer {key!r}, got {cfg.get(key)!r}")
    state = {k: v.detach() for k, v in state.items()}
    if arch == "jumprelu" and "threshold" not in state and "log_threshold" in state:
        state["threshold"] = state.pop("log_threshold").exp()
    needed = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
    require_keys(state, needed, source, f"{LOOKS_LIKE} {arch}")
    compute = torch.promote_types(state["W_enc"].dtype, torch.float32)  # folds in >= fp32
    W_enc, b_enc, W_dec, b_dec = (state[k].to(compute) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    threshold = state.get("threshold")
    if threshold is not None:
        threshold = threshold.to(compute)

    scaling = state.get("finetuning_scaling_factor", state.get("scaling_factor"))
    if scaling is not None:
        W_dec = W_dec * scaling.to(compute).reshape(-1, 1)
    if sae_class(arch).takes_sparse_path and cfg.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.norm(dim=-1)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms.unsqueeze(1)
    if arch == "batchtopk":
        threshold = state.get("topk_threshold", torch.tensor(-1.0))

    norm = cfg.get("normalize_activations") or "none"
    if norm == "expected_average_only_in":
        if norm_scaling_factor is not None:
            s = float(norm_scaling_factor)
            W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s
        norm = "none"  # SAELens's load_from_disk runs it as the identity too
    elif norm not in _RUNTIME_NORMS:
        raise CheckpointError(
            f"{source}: normalize_activations={norm!r} needs statistics the checkpoint does not hold; "
            "fold it into the weights with SAELens first (e.g. sae.fold_activation_whitening(...)) and save again"
        )
    meta = dict(cfg.get("metadata") or {})
    if cfg.get("reshape_activations", "none") != "none":
        meta["reshape_activations"] = cfg["reshape_activations"]  # facades.SAE flattens heads
    meta["source_format"] = NAME
    k = cfg.get("k")
    if k is not None and arch == "batchtopk" and not float(k).is_integer():
        # SAELens's BatchTopK k is a per-row average; fastsae's is an integer (inference uses
        # the threshold, not k): round up, and keep SAELens's value.
        meta["saelens_k"], k = k, math.ceil(k)
    return build_from_tensors(
        source=source, architecture=arch, d_in=cfg["d_in"], d_sae=cfg["d_sae"],
        W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold,
        k=int(k) if k is not None and sae_class(arch).needs_k else None,
        apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True), normalize_activations=norm,
        metadata=meta, device=device,
        dtype=dtype if dtype is not None else cfg.get("dtype") or state["W_enc"].dtype,
    )


def load(path: str | os.PathLike, device=None, dtype=None, norm_scaling_factor: float | None = None):
    path = Path(path)
    cfg = read_json(path / CFG_NAME, LOOKS_LIKE)
    state, _ = read_safetensors(path / WEIGHTS_NAME, LOOKS_LIKE)
    return from_state(cfg, state, str(path / WEIGHTS_NAME), device=device, dtype=dtype,
                      norm_scaling_factor=norm_scaling_factor)


def to_state(sae) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """SAELens 6 inference cfg dict and state dict of a fastsae module."""
    c = sae.cfg
    arch = "jumprelu" if c.architecture == "batchtopk" else c.architecture
    tensors = {k: getattr(sae, k).detach() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if c.architecture == "jumprelu":
        tensors["threshold"] = sae.threshold.detach()
    elif c.architecture == "batchtopk":
        if float(sae.threshold) < 0:
            raise CheckpointError(
                "this BatchTopK SAE has not learned its inference threshold yet (threshold < 0), and "
                "SAELens stores BatchTopK SAEs as JumpReLU with that threshold: train it first"
            )
        tensors["threshold"] = torch.full_like(sae.b_enc.detach(), float(sae.threshold))
    meta = {k: v for k, v in jsonable(c.metadata).items() if k not in ("source_format", "reshape_activations")}
    meta.update(sae_lens_version=_WRITTEN_VERSION, sae_lens_training_version=_WRITTEN_VERSION,
                written_by="fastsae")
    cfg = {
        "architecture": arch, "d_in": c.d_in, "d_sae": c.d_sae, "dtype": c.dtype, "device": "cpu",
        "apply_b_dec_to_input": c.apply_b_dec_to_input, "normalize_activations": c.normalize_activations,
        "reshape_activations": c.metadata.get("reshape_activations", "none"), "metadata": meta,
    }
    if arch == "topk":
        cfg.update(k=c.k, rescale_acts_by_decoder_norm=False)
    return cfg, tensors


def save(sae, path: str | os.PathLike) -> Path:
    """Write `sae` as SAELens writes an inference SAE; `SAE.load_from_disk(path)` reads it."""
    cfg, tensors = to_state(sae)
    return write_checkpoint(path, WEIGHTS_NAME, tensors, CFG_NAME, cfg)
