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
- BatchTopK training checkpoints (`topk_threshold`): a fastsae BatchTopKSAE with that threshold;
  Matryoshka BatchTopK training checkpoints (`matryoshka_widths`, `topk_threshold`) likewise;
- Gated: b_gate is fastsae's b_enc; r_mag, b_mag as they are;
- transcoders (`transcoder`, `skip_transcoder`, `jumprelu_transcoder`,
  `jumprelu_skip_transcoder`): a ReLU / JumpReLU fastsae SAE with transcoder=True, d_out and
  (skip) W_skip [d_out, d_in].
`layer_norm` and `constant_norm_rescale` are per-row, so they stay a runtime step
(SAEConfig.normalize_activations). Saving writes SAELens 6's inference format: BatchTopK is
exported as JumpReLU with a per-latent copy of its threshold, as SAELens does. SAELens has
Matryoshka SAEs only as a training class, so a Matryoshka SAE is written in that class's
format (`MatryoshkaBatchTopKTrainingSAE.load_from_disk` reads it; level weights other than 1,
which SAELens does not have, ride in its metadata).
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
SUPPORTED = ("standard", "topk", "jumprelu", "batchtopk", "gated", "matryoshka_batchtopk")
# SAELens transcoder architecture -> (fastsae architecture, skip connection)
TRANSCODERS = {"transcoder": ("standard", False), "skip_transcoder": ("standard", True),
               "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True)}
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
    config: dict[str, Any] = {}
    if arch in TRANSCODERS:
        arch, skip = TRANSCODERS[arch]
        config = {"transcoder": True, "d_out": cfg.get("d_out"), "skip_connection": skip}
        if not isinstance(config["d_out"], int):
            raise CheckpointError(f"{source}: the SAELens transcoder config needs an integer 'd_out', "
                                  f"got {config['d_out']!r}")
    elif arch not in SUPPORTED:
        raise CheckpointError(
            f"{source}: SAELens architecture {arch!r} is not supported; fastsae loads "
            f"{', '.join((*SUPPORTED, *TRANSCODERS))}"
        )
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int):
            raise CheckpointError(f"{source}: the SAELens config needs an integer {key!r}, got {cfg.get(key)!r}")
    state = {k: v.detach() for k, v in state.items()}
    if arch == "jumprelu" and "threshold" not in state and "log_threshold" in state:
        state["threshold"] = state.pop("log_threshold").exp()
    if arch == "gated":  # SAELens's gate bias is fastsae's b_enc
        require_keys(state, ["b_gate", "r_mag", "b_mag"], source, f"{LOOKS_LIKE} gated")
        state["b_enc"] = state.pop("b_gate")
    needed = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if arch == "jumprelu" else []) + (
        ["W_skip"] if config.get("skip_connection") else [])
    require_keys(state, needed, source, f"{LOOKS_LIKE} {cfg.get('architecture')}")
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
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        threshold = state.get("topk_threshold", torch.tensor(-1.0))
    extra = {k: state[k].to(compute) for k in ("r_mag", "b_mag", "W_skip") if k in needed or
             (arch == "gated" and k != "W_skip")}

    norm = cfg.get("normalize_activations") or "none"
    if config.get("transcoder") and norm != "none":
        raise CheckpointError(f"{source}: a transcoder with normalize_activations={norm!r} is not supported; "
                              "fastsae's transcoders take activations as they are")
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
    if arch == "matryoshka_batchtopk":
        widths = [int(w) for w in cfg.get("matryoshka_widths") or []]
        if widths and widths[-1] != cfg["d_sae"]:
            widths.append(cfg["d_sae"])  # SAELens adds the whole dictionary as the last level too
        config["matryoshka_widths"] = widths
        config["matryoshka_weights"] = meta.pop("fastsae_matryoshka_weights", None)
    if "topk_threshold_lr" in cfg and arch in ("batchtopk", "matryoshka_batchtopk"):
        config["batchtopk_threshold_momentum"] = 1.0 - float(cfg["topk_threshold_lr"])
    if k is not None and arch in ("batchtopk", "matryoshka_batchtopk") and not float(k).is_integer():
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
        extra_tensors=extra, config=config,
    )


def load(path: str | os.PathLike, device=None, dtype=None, norm_scaling_factor: float | None = None):
    path = Path(path)
    cfg = read_json(path / CFG_NAME, LOOKS_LIKE)
    state, _ = read_safetensors(path / WEIGHTS_NAME, LOOKS_LIKE)
    return from_state(cfg, state, str(path / WEIGHTS_NAME), device=device, dtype=dtype,
                      norm_scaling_factor=norm_scaling_factor)


def to_state(sae) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """SAELens 6 inference cfg dict and state dict of a fastsae module (a Matryoshka SAE's in
    SAELens's training format, the only one it has)."""
    c = sae.cfg
    arch = "jumprelu" if c.architecture == "batchtopk" else c.architecture
    tensors = {k: getattr(sae, k).detach() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if c.transcoder:
        if c.architecture not in ("standard", "jumprelu"):
            raise CheckpointError(
                f"SAELens has ReLU and JumpReLU transcoders only; this one is {c.architecture!r}: save it with "
                + ("format='sparsify'" if c.architecture == "topk" and c.output_dim == c.d_in else "format='fastsae'")
            )
        arch = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}[c.architecture]
        if c.skip_connection:
            arch = arch.replace("transcoder", "skip_transcoder")
            tensors["W_skip"] = sae.W_skip.detach()
    elif c.skip_connection:
        raise CheckpointError("SAELens has skip connections on transcoders only: save this SAE with format='fastsae' "
                              "(or format='sparsify' for a TopK SAE)")
    if c.architecture == "gated":
        tensors["b_gate"] = tensors.pop("b_enc")
        tensors.update(r_mag=sae.r_mag.detach(), b_mag=sae.b_mag.detach())
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
    if c.transcoder:
        cfg["d_out"] = c.output_dim
    if arch == "matryoshka_batchtopk":
        tensors["topk_threshold"] = sae.threshold.detach().double()
        cfg.update(k=float(meta.get("saelens_k", c.k)), matryoshka_widths=list(c.matryoshka_widths),
                   rescale_acts_by_decoder_norm=False, topk_threshold_lr=1.0 - c.batchtopk_threshold_momentum)
        if c.matryoshka_weights is not None and any(w != 1 for w in c.matryoshka_weights):
            meta["fastsae_matryoshka_weights"] = list(c.matryoshka_weights)
        meta.pop("saelens_k", None)
    return cfg, tensors


def save(sae, path: str | os.PathLike) -> Path:
    """Write `sae` as SAELens writes an inference SAE; `SAE.load_from_disk(path)` reads it."""
    cfg, tensors = to_state(sae)
    return write_checkpoint(path, WEIGHTS_NAME, tensors, CFG_NAME, cfg)
