"""Thin facades with the call signatures of SAELens's `SAE` and sparsify's `SparseCoder`,
backed by a fastsae module (its ops and kernels), so existing code runs after an import change:

    from fastsae.compat.facades import SAE              # was: from sae_lens import SAE
    sae = SAE.load_from_disk("path")             # any format fastsae.load reads
    feats = sae.encode(x); x_hat = sae.decode(feats)

    from fastsae.compat.facades import SparseCoder      # was: from sparsify import SparseCoder
    coder = SparseCoder.load_from_disk("run/layers.6")
    top_acts, top_indices, pre_acts = coder.encode(x)
    out = coder(x)                               # ForwardOutput(sae_out, latent_acts, ..., fvu, ...)

The facades hold no weights of their own: `.sae` is the fastsae module, and the parameter
properties (W_enc, W_dec, ...) are its parameters.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..ops import reference
from ..sae import BaseSAE
from ..sparse import SparseActs
from . import formats


def _delegate(name: str) -> property:
    """A read-only attribute of the wrapped fastsae module (its parameters, not copies)."""
    return property(lambda self: getattr(self.sae, name), doc=f"the fastsae module's {name}")


def _require(module: str, package: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise InputError(
            f"{what} goes through {package}'s own downloader: pip install {package} (or fastsae[compat]), "
            "or download the checkpoint yourself and use load_from_disk"
        ) from e


class _Metadata(SimpleNamespace):
    """SAELens's SAEMetadata: attribute access, None for anything not set."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self.__dict__

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _SAELensConfig(SimpleNamespace):
    """The fields of a SAELens SAEConfig, read from the fastsae config."""

    def architecture(self) -> str:
        return self._architecture

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        return {**d, "metadata": self.metadata.to_dict(), "architecture": self._architecture}


class SAE(nn.Module):
    """SAELens's `SAE` methods over a fastsae module: encode -> dense [..., d_sae] features,
    decode, forward (with use_error_term), fold_W_dec_norm, get_W_dec_norm,
    fold_activation_norm_scaling_factor, save_model, load_from_disk, cfg, W_enc/b_enc/W_dec/
    b_dec/threshold. As in SAELens, with layer_norm / constant_norm_rescale inputs, encode keeps
    the normalisation statistics and the next decode uses them up."""

    def __init__(self, sae: BaseSAE, use_error_term: bool = False):
        super().__init__()
        if not isinstance(sae, BaseSAE):
            raise InputError(f"SAE wraps a fastsae module, got {type(sae).__name__}: use SAE.load_from_disk(path)")
        self.sae = sae
        self.use_error_term = use_error_term
        self._restore = None
        self._d_head: int | None = None

    # ------------------------------------------------------------ loading and saving
    @classmethod
    def load_from_disk(cls, path: str | os.PathLike, device: str = "cpu", dtype: str | None = None,
                       fold_W_dec_norm: bool = False, **options) -> SAE:
        """Any checkpoint fastsae.load reads (SAELens, sparsify, ..., fastsae)."""
        facade = cls(formats.load(path, device=device, dtype=dtype, **options))
        if fold_W_dec_norm:
            facade.fold_W_dec_norm()
        return facade

    @classmethod
    def from_pretrained(cls, release: str, sae_id: str, device: str = "cpu", dtype: str = "float32",
                        **kwargs) -> SAE:
        """A released SAE, fetched through SAELens's own registry and loaders (needs sae-lens and
        the network), then converted: the same weights and folds SAELens applies."""
        from .convert import from_saelens

        sae_lens = _require("sae_lens", "sae-lens", "SAE.from_pretrained")
        return cls(from_saelens(sae_lens.SAE.from_pretrained(release, sae_id, device=device, dtype=dtype, **kwargs)))

    def save_model(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write SAELens's format; returns (weights path, cfg path) as SAELens does."""
        path = formats.save(self.sae, path, format="saelens")
        return path / formats.saelens.WEIGHTS_NAME, path / formats.saelens.CFG_NAME

    # ------------------------------------------------------------ SAELens attributes
    @property
    def cfg(self) -> _SAELensConfig:
        c = self.sae.cfg
        arch = "jumprelu" if c.architecture == "batchtopk" else c.architecture
        meta = {k: v for k, v in c.metadata.items() if k not in ("reshape_activations",)}
        fields = dict(d_in=c.d_in, d_sae=c.d_sae, dtype=str(self.dtype).removeprefix("torch."),
                      device=str(self.device), apply_b_dec_to_input=c.apply_b_dec_to_input,
                      normalize_activations=c.normalize_activations,
                      reshape_activations=c.metadata.get("reshape_activations", "none"),
                      metadata=_Metadata(**meta), _architecture=arch)
        if arch == "topk":
            fields.update(k=c.k, rescale_acts_by_decoder_norm=False)
        return _SAELensConfig(**fields)

    W_enc = _delegate("W_enc")
    b_enc = _delegate("b_enc")
    W_dec = _delegate("W_dec")
    b_dec = _delegate("b_dec")
    dtype = _delegate("dtype")
    device = _delegate("device")

    @property
    def threshold(self) -> Tensor:
        if self.sae.cfg.architecture == "batchtopk":  # SAELens's JumpReLU export of BatchTopK
            return self.sae.threshold.expand(self.sae.d_sae).to(self.dtype)
        if self.sae.cfg.architecture != "jumprelu":
            raise AttributeError(f"a {self.sae.cfg.architecture} SAE has no threshold")
        return self.sae.threshold

    # ------------------------------------------------------------ encode / decode / forward
    def _flatten_heads(self, x: Tensor) -> Tensor:
        if self.sae.cfg.metadata.get("reshape_activations") == "hook_z" and x.dim() >= 2:
            self._d_head = x.shape[-1]
            return x.flatten(-2)
        return x

    def _unflatten_heads(self, x: Tensor) -> Tensor:
        if self.sae.cfg.metadata.get("reshape_activations") == "hook_z" and self._d_head:
            return x.unflatten(-1, (-1, self._d_head))
        return x

    def encode(self, x: Tensor) -> Tensor:
        """Dense feature activations [..., d_sae], as SAELens returns them."""
        x = self._flatten_heads(x)
        lead = x.shape[:-1]
        x2, restore = self.sae.prepare(x)
        if self.sae.cfg.normalize_activations != "none":
            self._restore = restore
        acts = self.sae.encode_prepared(x2)
        dense = acts.to_dense() if isinstance(acts, SparseActs) else acts
        return dense.reshape(*lead, self.sae.d_sae)

    def decode(self, feature_acts: Tensor | SparseActs) -> Tensor:
        """Reconstruction from dense (or torch sparse, or SparseActs) features."""
        if isinstance(feature_acts, Tensor) and feature_acts.is_sparse:
            feature_acts = feature_acts.to_dense()
        out = self.sae.decode(feature_acts)
        if self.sae.cfg.normalize_activations != "none":
            if self._restore is None:
                raise InputError(
                    f"this SAE normalises its input ({self.sae.cfg.normalize_activations}): call encode(x) "
                    "before decode, as in SAELens, or use forward(x)"
                )
            out = self._restore(out.reshape(-1, self.sae.d_in)).reshape(out.shape)
            self._restore = None
        return self._unflatten_heads(out)

    def forward(self, x: Tensor) -> Tensor:
        x_flat = self._flatten_heads(x)
        out = self.sae(x_flat)  # the fast path: no dense feature matrix for the TopK family
        if self.use_error_term:  # SAELens adds (x - x_hat) computed without grad
            out = out + (x_flat.to(out.dtype) - out).detach()
        return self._unflatten_heads(out)

    # ------------------------------------------------------------ folds
    @torch.no_grad()
    def get_W_dec_norm(self) -> Tensor:
        return self.sae.W_dec.norm(dim=-1).clamp(min=1e-8)

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Unit-norm decoder rows, the norms moved into the encoder (and JumpReLU thresholds)."""
        arch = self.sae.cfg.architecture
        if self.sae.takes_sparse_path:
            raise NotImplementedError(
                f"folding W_dec norms changes which latents a {arch} SAE selects, so it is not safe "
                "(SAELens refuses it too unless the SAE was trained with rescale_acts_by_decoder_norm)"
            )
        norms = self.get_W_dec_norm()
        self.sae.W_dec.div_(norms.unsqueeze(1))
        self.sae.W_enc.mul_(norms)
        self.sae.b_enc.mul_(norms)
        if arch == "jumprelu":
            self.sae.threshold.mul_(norms)

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Make an SAE trained on x·s run on raw x (SAELens's method of that name)."""
        self.sae.W_enc.mul_(scaling_factor)
        self.sae.W_dec.div_(scaling_factor)
        self.sae.b_dec.div_(scaling_factor)


class EncoderOutput(NamedTuple):
    """sparsify's EncoderOutput (same fields, same order)."""

    top_acts: Tensor
    top_indices: Tensor
    pre_acts: Tensor


class ForwardOutput(NamedTuple):
    """sparsify's ForwardOutput (same fields, same order)."""

    sae_out: Tensor
    latent_acts: Tensor
    latent_indices: Tensor
    fvu: Tensor
    auxk_loss: Tensor
    multi_topk_fvu: Tensor


class SparseCoder(nn.Module):
    """sparsify's `SparseCoder` over a fastsae TopKSAE: encode -> EncoderOutput, decode(top_acts,
    top_indices), forward(x, y=None, *, dead_mask=None, total_variance=None) -> ForwardOutput
    (fvu, AuxK and multi-TopK losses as sparsify computes them), save_to_disk, load_from_disk,
    load_many (local run directories), set_decoder_norm_to_unit_norm,
    remove_gradient_parallel_to_decoder_directions, cfg, d_in, num_latents, encoder, W_dec, b_dec.

    encode() also returns sparsify's dense pre_acts (relu of all pre-activations); forward()
    computes them only when an AuxK (dead_mask) or multi-TopK loss needs them.
    """

    def __init__(self, sae: BaseSAE, multi_topk: bool = False):
        super().__init__()
        if not isinstance(sae, BaseSAE) or sae.cfg.architecture != "topk":
            what = sae.cfg.architecture if isinstance(sae, BaseSAE) else type(sae).__name__
            raise InputError(f"SparseCoder wraps a fastsae TopKSAE (sparsify's only kind), got {what}")
        if sae.cfg.normalize_activations != "none":
            raise InputError("sparsify coders do not normalise their input; use facades.SAE for this SAE")
        self.sae = sae
        c = sae.cfg
        self.cfg = SimpleNamespace(
            activation="topk", expansion_factor=max(1, c.d_sae // c.d_in), normalize_decoder=True,
            num_latents=c.d_sae, k=c.k, multi_topk=multi_topk, skip_connection=False,
            transcode=not c.apply_b_dec_to_input,
        )
        self.W_skip = None

    @staticmethod
    def load_from_disk(path: str | os.PathLike, device: str | torch.device = "cpu", *, decoder: bool = True,
                       **options) -> SparseCoder:
        if not decoder:
            raise InputError("fastsae facades always load the decoder: drop decoder=False")
        return SparseCoder(formats.load(path, device=device, **options))

    @staticmethod
    def load_many(name: str | os.PathLike, local: bool = True, layers: list[str] | None = None,
                  device: str | torch.device = "cpu", **_) -> dict[str, SparseCoder]:
        if not local:
            raise InputError("fastsae does not download from the Hub: pass a local run directory with local=True")
        coders = formats.sparsify.load_many(name, device=device, layers=layers)
        return {hook: SparseCoder(sae) for hook, sae in coders.items()}

    @staticmethod
    def load_from_hub(name: str, hookpoint: str | None = None, device: str | torch.device = "cpu",
                      *, decoder: bool = True) -> SparseCoder:
        """A coder from the Hugging Face Hub, fetched by sparsify's own loader (needs
        eai-sparsify and the network), then converted."""
        from .convert import from_sparsify

        sparsify = _require("sparsify", "eai-sparsify", "SparseCoder.load_from_hub")
        return SparseCoder(from_sparsify(sparsify.SparseCoder.load_from_hub(name, hookpoint, device=device)))

    def save_to_disk(self, path: str | os.PathLike) -> None:
        formats.save(self.sae, path, format="sparsify")

    d_in = _delegate("d_in")
    num_latents = _delegate("d_sae")
    device = _delegate("device")
    dtype = _delegate("dtype")
    W_dec = _delegate("W_dec")
    b_dec = _delegate("b_dec")

    @property
    def encoder(self) -> SimpleNamespace:
        """sparsify's nn.Linear view: weight [num_latents, d_in] (a view of W_enc), bias."""
        return SimpleNamespace(weight=self.sae.W_enc.t(), bias=self.sae.b_enc)

    def _pre_acts(self, x: Tensor) -> Tensor:
        pre = self.sae.pre_activations(self.sae.prepare(x)[0])
        return pre.relu().reshape(*x.shape[:-1], self.num_latents)

    def encode(self, x: Tensor) -> EncoderOutput:
        acts = self.sae.encode(x)
        return EncoderOutput(acts.values, acts.indices, self._pre_acts(x))

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        return self.sae.decode(SparseActs(top_acts, top_indices, self.num_latents))

    def forward(self, x: Tensor, y: Tensor | None = None, *, dead_mask: Tensor | None = None,
                total_variance: Tensor | None = None) -> ForwardOutput:
        acts = self.sae.encode(x)
        y = x if y is None else y
        sae_out = self.sae.decode(acts)
        e = y - sae_out
        if total_variance is None:
            total_variance = (y - y.mean(0)).pow(2).sum()
        need_pre = self.cfg.multi_topk or (dead_mask is not None and int(dead_mask.sum()) > 0)
        # sparsify's fused encoder drops the gradient of pre_acts, so the AuxK and multi-TopK
        # losses train the decoder only; detached pre_acts do the same here.
        with torch.no_grad():
            pre_acts = self._pre_acts(x) if need_pre else None
        if dead_mask is not None and (num_dead := int(dead_mask.sum())) > 0:
            k_aux = y.shape[-1] // 2  # sparsify's heuristic (Gao et al. appendix B.1)
            scale = min(num_dead / k_aux, 1.0)
            masked = torch.where(dead_mask[None], pre_acts, -torch.inf)
            aux_vals, aux_idx = masked.topk(min(k_aux, num_dead), sorted=False)
            e_hat = reference.sparse_decode(aux_vals, aux_idx, self.sae.W_dec, None)
            auxk_loss = scale * (e_hat - e.detach()).pow(2).sum() / total_variance
        else:
            auxk_loss = sae_out.new_tensor(0.0)
        fvu = e.pow(2).sum() / total_variance
        latent_acts, latent_indices = acts.values, acts.indices
        if self.cfg.multi_topk:  # as sparsify: the outputs become the 4k-latent ones
            latent_acts, latent_indices = pre_acts.topk(4 * self.cfg.k, sorted=False)
            sae_out = self.decode(latent_acts, latent_indices)
            multi_topk_fvu = (sae_out - y).pow(2).sum() / total_variance
        else:
            multi_topk_fvu = sae_out.new_tensor(0.0)
        return ForwardOutput(sae_out, latent_acts, latent_indices, fvu, auxk_loss, multi_topk_fvu)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True) + eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        if self.W_dec.grad is None:
            raise InputError("W_dec has no gradient yet: call backward() first")
        parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)


Sae = SparseCoder  # sparsify's alternate name

__all__ = ["SAE", "SparseCoder", "Sae", "EncoderOutput", "ForwardOutput"]
