"""Build a fastsae module from tensors already converted to fastsae's layout.

Every format module converts its own names and layouts, then hands the tensors here: one
place checks them against the config (naming the source file), picks dtype and device, and
assigns them without initialising weights that are about to be replaced.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from ...config import SAEConfig
from ...errors import CheckpointError, ConfigError
from ...sae import BaseSAE, build_sae


def require_keys(state: Mapping[str, Any], keys, source: str, looks_like: str) -> None:
    """Raise a CheckpointError naming the file, the format and the keys when any is missing."""
    missing = sorted(k for k in keys if k not in state)
    if missing:
        raise CheckpointError(
            f"{source} looks like a {looks_like} checkpoint but lacks {missing}: that format "
            f"needs {sorted(keys)}, the file holds {sorted(state)}. The file is incomplete or "
            "corrupt, or it is another format: pass format=... to fastsae.load to say which"
        )


def jsonable(value: Any) -> Any:
    """A JSON-safe copy of a foreign config (dtypes, paths and the like become strings)."""
    return json.loads(json.dumps(value, default=str))


def build_from_tensors(
    *,
    source: str,
    architecture: str,
    d_in: int,
    d_sae: int,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    threshold: torch.Tensor | None = None,
    k: int | None = None,
    apply_b_dec_to_input: bool = True,
    normalize_activations: str = "none",
    metadata: dict[str, Any] | None = None,
    device=None,
    dtype=None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    config: dict[str, Any] | None = None,
) -> BaseSAE:
    """A fastsae SAE (in eval mode: foreign checkpoints are inference exports) from tensors in
    fastsae's layout: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out],
    threshold [d_sae] (jumprelu) or [] (batchtopk, matryoshka_batchtopk); the architecture's own
    tensors (gated's r_mag, b_mag; a skip connection's W_skip [d_out, d_in]) in extra_tensors,
    checked against the module's shapes; other SAEConfig fields (transcoder, d_out,
    skip_connection, matryoshka_widths, ...) in `config`. dtype defaults to W_enc's."""
    config = dict(config or {})
    d_out = config.get("d_out") or d_in
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if architecture == "jumprelu":
        expected["threshold"], tensors["threshold"] = (d_sae,), threshold
    elif architecture in ("batchtopk", "matryoshka_batchtopk"):
        expected["threshold"], tensors["threshold"] = (), threshold
    for name, shape in expected.items():
        got = tensors[name]
        if got is None:
            raise CheckpointError(f"{source}: a {architecture} SAE needs {name}, and none was found")
        if name == "threshold" and expected[name] == () and got.numel() == 1:
            got = tensors[name] = got.reshape(())
        if tuple(got.shape) != shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(got.shape)}, but the config (d_in={d_in}, "
                f"d_sae={d_sae}) implies {shape}; the config and the weights disagree"
            )
    if architecture == "jumprelu":
        # Foreign JumpReLUs compute relu(pre)·1[pre > θ]; fastsae computes pre·1[pre > θ]. They
        # agree exactly for θ >= 0, and clamping θ at 0 keeps them equal when θ < 0.
        tensors["threshold"] = tensors["threshold"].clamp_min(0)
    dtype = dtype if dtype is not None else W_enc.dtype
    try:
        cfg = SAEConfig(
            d_in=d_in, d_sae=d_sae, architecture=architecture, k=k, dtype=dtype,
            device=str(device) if device is not None else "cpu",
            apply_b_dec_to_input=bool(apply_b_dec_to_input),
            normalize_activations=normalize_activations, metadata=jsonable(metadata or {}), **config,
        )
    except ConfigError as e:
        raise CheckpointError(f"{source} does not describe a valid SAE: {e}") from e
    with torch.device("meta"):  # no point initialising weights that are about to be replaced
        sae = build_sae(cfg.replace(device="meta"))
    shapes = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    for name, got in (extra_tensors or {}).items():
        if tuple(got.shape) != shapes.get(name):
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(got.shape)}, but the config (d_in={d_in}, d_out={d_out}, "
                f"d_sae={d_sae}) implies {shapes.get(name)}; the config and the weights disagree"
            )
        tensors[name] = got
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise CheckpointError(f"{source}: a {architecture} SAE with this config needs {missing}, and none was found")
    state = {name: t.detach().to(device=cfg.device, dtype=cfg.torch_dtype).contiguous()
             for name, t in tensors.items()}
    if "threshold" in state and expected["threshold"] == ():  # kept in float32 whatever the weights
        state["threshold"] = state["threshold"].float()
    sae.load_state_dict(state, strict=True, assign=True)
    sae.cfg = cfg
    return sae.eval()
