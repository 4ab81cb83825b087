"""OpenAI sparse_autoencoder checkpoints: a torch.save'd `Autoencoder.state_dict()` (.pt).

Keys: pre_bias [d] (subtracted from the input, added to the output: fastsae's b_dec),
encoder.weight [n, d], latent_bias [n] (b_enc), decoder.weight [d, n] (or decoder.linear.weight
when tied), the stats_* / latents_* buffers (ignored), activation ("ReLU" or "TopK") and
activation_state_dict ({"k", "postact_fn"} for TopK). As in their `from_state_dict`, a TopK
autoencoder normalises its input with a per-row layer norm and undoes it on the output:
fastsae runs that as normalize_activations="layer_norm".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ...errors import CheckpointError
from .build import build_from_tensors, require_keys
from .files import read_torch_state

NAME = "openai"
LOOKS_LIKE = "OpenAI sparse_autoencoder"
DESCRIPTION = ("OpenAI sparse_autoencoder: a .pt state dict (pre_bias, encoder.weight, latent_bias, decoder.weight, "
               "activation)")
KEYS = ("pre_bias", "encoder.weight", "latent_bias")


def state_looks_like(state: dict) -> bool:
    return "pre_bias" in state and "latent_bias" in state


def looks_like(path: Path) -> bool:
    return path.is_file() and path.suffix in (".pt", ".pth", ".bin")


def from_state(state: dict[str, Any], source: str, device=None, dtype=None):
    require_keys(state, KEYS, source, LOOKS_LIKE)
    activation = state.get("activation", "ReLU")
    act_state = state.get("activation_state_dict") or {}
    if activation == "TopK":
        if act_state.get("postact_fn", "ReLU") != "ReLU":
            raise CheckpointError(
                f"{source}: TopK with postact_fn={act_state.get('postact_fn')!r} keeps negative values; "
                "fastsae's TopK applies ReLU, so only postact_fn='ReLU' loads exactly"
            )
        if "k" not in act_state:
            raise CheckpointError(f"{source}: activation is TopK but activation_state_dict has no 'k': {act_state}")
        arch, k, norm = "topk", int(act_state["k"]), "layer_norm"
    elif activation == "ReLU":
        arch, k, norm = "standard", None, "none"
    else:
        raise CheckpointError(
            f"{source}: OpenAI activation {activation!r} is not supported; fastsae loads 'ReLU' and 'TopK'"
        )
    enc = state["encoder.weight"]
    if "decoder.weight" in state:
        W_dec = state["decoder.weight"].t()
    elif "decoder.linear.weight" in state:  # tied: the decoder is the encoder's transpose
        W_dec = state["decoder.linear.weight"]
    else:
        raise CheckpointError(
            f"{source} looks like a {LOOKS_LIKE} checkpoint but has no decoder.weight (nor a tied "
            f"decoder.linear.weight); it holds {sorted(state)}"
        )
    d_sae, d_in = enc.shape
    return build_from_tensors(
        source=source, architecture=arch, d_in=int(d_in), d_sae=int(d_sae),
        W_enc=enc.t(), b_enc=state["latent_bias"], W_dec=W_dec, b_dec=state["pre_bias"], k=k,
        apply_b_dec_to_input=True, normalize_activations=norm,
        metadata={"source_format": NAME}, device=device, dtype=dtype if dtype is not None else enc.dtype,
    )


def load(path: str | os.PathLike, device=None, dtype=None):
    path = Path(path)
    return from_state(read_torch_state(path, LOOKS_LIKE), str(path), device=device, dtype=dtype)
