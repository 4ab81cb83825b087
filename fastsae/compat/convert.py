"""Live modules of other SAE libraries -> the equivalent fastsae module.

    sae = fastsae.convert.from_module(saelens_sae)    # or a sparsify SparseCoder, a
                                                      # dictionary_learning dictionary, an
                                                      # OpenAI sparse_autoencoder Autoencoder
The weights are copied (the result does not share storage with the source) onto the source's
device, in its dtype unless `dtype` is given; the same conversions as loading its checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from .formats import dictionary_learning, openai, saelens, sparsify


def _source(module: nn.Module) -> str:
    return f"a live {type(module).__module__}.{type(module).__name__}"


def _state(module: nn.Module) -> dict:
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in module.state_dict().items()}


def _device(module: nn.Module):
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else None


def from_saelens(sae: nn.Module, dtype=None, norm_scaling_factor: float | None = None):
    """A SAELens SAE (inference or training class: standard, topk, jumprelu, batchtopk, gated,
    matryoshka_batchtopk, and the ReLU / JumpReLU (skip) transcoders)."""
    cfg = sae.cfg.to_dict()
    return saelens.from_state(cfg, _state(sae), _source(sae), device=_device(sae), dtype=dtype,
                              norm_scaling_factor=norm_scaling_factor)


def from_sparsify(coder: nn.Module, dtype=None):
    """A sparsify SparseCoder (activation='topk'; transcoders and skip connections included)."""
    if getattr(coder, "W_dec", None) is None:
        raise InputError(f"{_source(coder)} was built with decoder=False; fastsae needs its decoder")
    cfg = {**coder.cfg.to_dict(), "d_in": coder.d_in, "num_latents": coder.num_latents}
    return sparsify.from_state(cfg, _state(coder), _source(coder), device=_device(coder), dtype=dtype)


def from_dictionary_learning(ae: nn.Module, dtype=None):
    """A dictionary_learning AutoEncoder, AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE,
    JumpReluAutoEncoder (its apply_b_dec_to_input attribute is honoured) or GatedAutoEncoder. A
    live Matryoshka module does not know its trainer's group weights: they are left at 1."""
    return dictionary_learning.from_state(
        type(ae).__name__, _state(ae), _source(ae), device=_device(ae), dtype=dtype,
        apply_b_dec_to_input=getattr(ae, "apply_b_dec_to_input", None),
    )


def from_openai(autoencoder: nn.Module, dtype=None):
    """An OpenAI sparse_autoencoder Autoencoder (ReLU, or TopK with its input layer norm)."""
    return openai.from_state(_state(autoencoder), _source(autoencoder), device=_device(autoencoder), dtype=dtype)


# Top-level package of the module's class -> converter.
CONVERTERS = {
    "sae_lens": from_saelens,
    "sparsify": from_sparsify,
    "dictionary_learning": from_dictionary_learning,
    "sparse_autoencoder": from_openai,
}


def from_module(module: nn.Module, dtype=None):
    """Convert any supported live module, chosen by the library its class comes from."""
    package = type(module).__module__.split(".")[0]
    if package not in CONVERTERS:
        raise InputError(
            f"cannot convert {type(module).__module__}.{type(module).__name__}: fastsae converts modules "
            f"from {', '.join(CONVERTERS)}"
        )
    return CONVERTERS[package](module, dtype=dtype)
