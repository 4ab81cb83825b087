"""The SAE modules: StandardSAE (ReLU + L1), TopKSAE, BatchTopKSAE, JumpReLUSAE.

Parameter names and layouts follow SAELens: W_enc [d_in, d_sae], b_enc [d_sae],
W_dec [d_sae, d_in], b_dec [d_in] (+ threshold for JumpReLU). Math lives in the ops
(fastsae.ops picks a backend per device); this file is policy: shapes, checks, losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Union

import torch
from torch import nn

from . import ops
from .checkpoint import CFG_NAME, WEIGHTS_NAME, read_checkpoint, save_sae
from .config import SAEConfig
from .errors import CheckpointError, InputError
from .init import tied_init_
from .ops import reference
from .sparse import Selection, SparseActs

Acts = Union[torch.Tensor, SparseActs]


def check_latent_ids(indices: torch.Tensor, d_sae: int) -> None:
    """Raise InputError unless every id is in [0, d_sae). The GPU kernels index W_dec with the
    ids unchecked, so user-made SparseActs are checked here (one min/max; the trainer's own
    selections skip it)."""
    if indices.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(indices))
    if lo < 0 or hi >= d_sae:
        raise InputError(
            f"acts.indices hold latent ids from {lo} to {hi}, but this SAE's latents are 0..{d_sae - 1}: "
            "decode SparseActs made by this SAE's encode (or of its width)"
        )


@dataclass
class TrainOutput:
    """What a training forward returns: the loss to backpropagate and its terms.

    mse: squared error summed over d_in, averaged over rows (SAELens convention).
    fvu: fraction of variance unexplained (squared error / variance of x about its batch mean).
    sparsity: the architecture's penalty term, already multiplied by its coefficient
        (L1 for standard, L0 for jumprelu, 0 for topk/batchtopk).
    l0: mean active latents per row (not differentiable).
    """

    loss: torch.Tensor
    mse: torch.Tensor
    fvu: torch.Tensor
    sparsity: torch.Tensor
    l0: torch.Tensor
    x_hat: torch.Tensor
    acts: Acts

    def scalars(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("loss", "mse", "fvu", "sparsity", "l0")}


class BaseSAE(nn.Module):
    """Shared parameters, input checks, encode/decode/forward and save/load."""

    architecture: ClassVar[str] = ""

    def __init__(self, cfg: SAEConfig | None = None, **kwargs: Any):
        super().__init__()
        if cfg is None:
            kwargs.setdefault("architecture", self.architecture)
            cfg = SAEConfig(**kwargs)
        elif kwargs:
            cfg = cfg.replace(**kwargs)
        if cfg.architecture != self.architecture:
            raise InputError(
                f"{type(self).__name__} needs architecture={self.architecture!r}, the config says "
                f"{cfg.architecture!r}: build it with fastsae.sae_class({cfg.architecture!r})(cfg)"
            )
        self.cfg = cfg
        d, n = cfg.d_in, cfg.d_sae
        f = dict(dtype=cfg.torch_dtype, device=cfg.device)
        self.W_enc = nn.Parameter(torch.empty(d, n, **f))
        self.b_enc = nn.Parameter(torch.zeros(n, **f))
        self.W_dec = nn.Parameter(torch.empty(n, d, **f))
        self.b_dec = nn.Parameter(torch.zeros(d, **f))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Unit-norm random decoder rows and a tied encoder (W_enc = W_decᵀ), zero biases."""
        tied_init_(self, torch.randn(self.cfg.d_sae, self.cfg.d_in, dtype=torch.float32, device=self.W_dec.device))

    # ---------------------------------------------------------------- properties
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def backend(self) -> str:
        """The backend the ops run on for this module's device (see fastsae.ops)."""
        return ops.resolve_backend(self.cfg.backend, self.device)

    def _op(self, name: str):
        return ops.get(name, self.backend)

    def _input_b_dec(self):
        return self.b_dec if self.cfg.apply_b_dec_to_input else None

    def _normalize_input(self, x: torch.Tensor):
        """cfg.normalize_activations applied to x [N, d_in] before encoding, and the map that takes
        a reconstruction back to x's scale (identity for "none"). Mirrors SAELens and OpenAI."""
        mode = self.cfg.normalize_activations
        if mode == "layer_norm":  # OpenAI's LN: unbiased std, eps added to std, not undone
            mu = x.mean(-1, keepdim=True)
            std = (x - mu).std(-1, keepdim=True)
            return (x - mu) / (std + 1e-5), lambda y: y * std + mu
        if mode == "constant_norm_rescale":
            coeff = self.d_in ** 0.5 / x.norm(dim=-1, keepdim=True)
            return x * coeff, lambda y: y / coeff
        return x, lambda y: y

    # ---------------------------------------------------------------- checks
    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        """Validate x [..., d_in]; return it flattened to [N, d_in] in the SAE's dtype."""
        if not isinstance(x, torch.Tensor):
            raise InputError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not (x.is_floating_point()):
            raise InputError(
                f"x has dtype {x.dtype}, but SAEs take floating-point activations: "
                f"pass x.to({self.dtype}) instead"
            )
        if x.dim() == 0 or x.shape[-1] != self.d_in:
            got = "a scalar" if x.dim() == 0 else f"last dimension {x.shape[-1]} (shape {tuple(x.shape)})"
            raise InputError(
                f"x has {got}, but this SAE has d_in={self.d_in}: pass activations of shape "
                f"[..., {self.d_in}] from the hook point the SAE was trained on"
            )
        if x.device != self.device:
            raise InputError(
                f"x is on {x.device} but the SAE is on {self.device}: move one of them, "
                f"e.g. x.to('{self.device}') or sae.to('{x.device}')"
            )
        if self.cfg.check_finite and x.numel() and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise InputError(
                f"x contains {bad} NaN/inf value(s) out of {x.numel()}: clean the activations "
                "(or build the SAE with check_finite=False to skip this check)"
            )
        return x.reshape(-1, self.d_in).to(self.dtype)

    # ---------------------------------------------------------------- API
    def encode(self, x: torch.Tensor, dense: bool = False) -> Acts:
        """Latent activations of x [..., d_in]: a SparseActs for the TopK family (dense=True
        gives a [..., d_sae] tensor), a dense tensor for ReLU/JumpReLU."""
        lead = x.shape[:-1] if isinstance(x, torch.Tensor) and x.dim() else ()
        acts = self._encode_2d(self._normalize_input(self._check_input(x))[0])
        if isinstance(acts, SparseActs):
            acts = acts.reshape_rows(tuple(lead))
            return acts.to_dense() if dense else acts
        return acts.reshape(*lead, self.d_sae)

    def decode(self, acts: Acts) -> torch.Tensor:
        """Reconstruction [..., d_in] from a SparseActs or a dense [..., d_sae] tensor."""
        return self._decode(acts, check_ids=True)

    def _decode(self, acts: Acts, check_ids: bool) -> torch.Tensor:
        """decode; check_ids=False for acts this module's own encode just made."""
        if isinstance(acts, SparseActs):
            if acts.d_sae != self.d_sae:
                raise InputError(f"acts have d_sae={acts.d_sae} but this SAE has d_sae={self.d_sae}")
            lead = acts.values.shape[:-1]
            flat = acts.flatten_rows()
            if check_ids:
                check_latent_ids(flat.indices, self.d_sae)
            out = self._op("sparse_decode")(flat.values.to(self.dtype), flat.indices, self.W_dec, self.b_dec)
            return out.reshape(*lead, self.d_in)
        if not isinstance(acts, torch.Tensor) or acts.dim() == 0 or acts.shape[-1] != self.d_sae:
            shape = tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__
            raise InputError(
                f"decode takes a SparseActs or a dense tensor [..., d_sae={self.d_sae}], got {shape}"
            )
        lead = acts.shape[:-1]
        out = self._op("dense_decode")(acts.reshape(-1, self.d_sae).to(self.dtype), self.W_dec, self.b_dec)
        return out.reshape(*lead, self.d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction x_hat of x, same shape as x."""
        x2, restore = self._normalize_input(self._check_input(x))
        x_hat = None if self._needs_grad(x2) else self._fused_forward(x2)
        if x_hat is None:
            x_hat = self._decode(self._encode_2d(x2), check_ids=False)
        return restore(x_hat).reshape(x.shape)

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """x_hat in one fused pass where the architecture has one (no autograd), else None."""
        return None

    def training_forward(self, x: torch.Tensor) -> TrainOutput:
        """Encode, decode and score a batch; backpropagate `.loss`."""
        lead = x.shape[:-1] if isinstance(x, torch.Tensor) and x.dim() else ()
        x2 = self._normalize_input(self._check_input(x))[0]  # losses in normalised space, as OpenAI
        acts, sparsity = self._train_encode(x2)
        x_hat = self._decode(acts, check_ids=False)
        err = (x_hat - x2).float()
        mse = err.pow(2).sum(-1).mean()
        var = (x2.float() - x2.float().mean(0)).pow(2).sum()
        fvu = err.pow(2).sum() / var.clamp_min(torch.finfo(torch.float32).tiny)
        l0 = (acts.l0() if isinstance(acts, SparseActs) else (acts != 0).sum(-1)).float().mean()
        out_acts = acts.reshape_rows(tuple(lead)) if isinstance(acts, SparseActs) else acts.reshape(*lead, self.d_sae)
        return TrainOutput(
            loss=mse + sparsity, mse=mse, fvu=fvu, sparsity=sparsity, l0=l0,
            x_hat=x_hat.reshape(*lead, self.d_in), acts=out_acts,
        )

    # ---------------------------------------------------------------- per architecture
    def _encode_2d(self, x: torch.Tensor, train: bool = False) -> Acts:
        raise NotImplementedError

    def _train_encode(self, x: torch.Tensor) -> tuple[Acts, torch.Tensor]:
        """Training-mode encode and the sparsity penalty (times its coefficient)."""
        return self._encode_2d(x, train=True), torch.zeros((), device=self.device)

    # ---------------------------------------------------------------- the trainer's seam
    # fastsae.trainer.Trainer drives a single-process SAE and a ShardedSAE through these four
    # methods (ShardedSAE has the same ones, with collectives inside), so one training loop
    # serves both.
    def select(self, x2: torch.Tensor, train: bool = False) -> Selection:
        """TopK-family encode of normalised 2-D input x2 [N, d_in]."""
        acts = self._encode_2d(x2, train=train)
        if not isinstance(acts, SparseActs):
            raise InputError(f"select() is for topk/batchtopk SAEs, this one is {self.cfg.architecture!r}")
        return Selection(acts.values, acts.indices, acts)

    def _decode_selection(self, sel: Selection) -> torch.Tensor:
        return self._op("sparse_decode")(sel.values.to(self.dtype), sel.indices, self.W_dec, self.b_dec)

    @torch.no_grad()
    def sparse_backward(self, x2: torch.Tensor, sel: Selection, grad_out: torch.Tensor):
        """The TopK-family backward outside autograd (ops "topk_sae_backward"): (RowSparseGrads
        of the latents that fired, db_dec) for grad_out = dL/dx_hat [N, d_in]."""
        g = self._op("topk_sae_backward")(x2, sel.values.to(self.dtype), sel.indices, grad_out.to(self.dtype),
                                          self.W_enc, self.W_dec, self._input_b_dec(), row_sparse=True)
        return g["rows"], g["db_dec"]

    def auxk_loss(self, x_in: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, k_aux: int,
                  scale: float = 1.0):
        """AuxK (fastsae.losses.auxk_loss) from each row's k_aux largest pre-activations among
        the `dead` latent ids. The gradient goes to leaf copies of the touched latents only:
        returns (loss, latent ids u, (W_enc[:, u], b_enc[u], W_dec[u]) leaves)."""
        from .losses import auxk_loss, top_dead_latents

        x_in = x_in.detach()
        idx = top_dead_latents(x_in, self.W_enc.detach(), self.b_enc.detach(), dead, k_aux,
                               topk_encode=self._op("topk_encode"))
        u, local = torch.unique(idx, return_inverse=True)
        leaves = (self.W_enc.detach()[:, u].requires_grad_(), self.b_enc.detach()[u].requires_grad_(),
                  self.W_dec.detach()[u].requires_grad_())
        return auxk_loss(x_in, residual, local, *leaves, scale), u, leaves

    # ---------------------------------------------------------------- save / load
    def save_pretrained(self, path) -> None:
        """Write cfg.json + sae_weights.safetensors into directory `path`, atomically."""
        save_sae(self, path)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> BaseSAE:
        sae = load_sae(path, device=device, dtype=dtype)
        if not isinstance(sae, cls):
            raise InputError(
                f"{path} holds a {type(sae).__name__} ({sae.cfg.architecture}), not a {cls.__name__}: "
                "use fastsae.load(path) to get the right class"
            )
        return sae

    def extra_repr(self) -> str:
        k = f", k={self.cfg.k}" if self.cfg.k is not None else ""
        return f"d_in={self.d_in}, d_sae={self.d_sae}{k}, dtype={self.dtype}, device={self.device}"


class StandardSAE(BaseSAE):
    """ReLU SAE trained with an L1 penalty weighted by decoder row norms (Anthropic, 2024)."""

    architecture = "standard"
    l1_decoder_norm = True  # TrainConfig.l1_decoder_norm sets it per run

    def _encode_2d(self, x, train=False):
        return self._op("relu_encode")(x, self.W_enc, self.b_enc, self._input_b_dec())

    def _fused_forward(self, x):
        return self._op("relu_forward")(x, self.W_enc, self.b_enc, self._input_b_dec(), self.W_dec, self.b_dec)

    def _train_encode(self, x):
        acts = self._encode_2d(x, train=True)
        # Σ_j |f_j|·‖W_dec[j]‖ per row (or Σ_j |f_j| with l1_decoder_norm off), mean over rows;
        # not divided by d_sae, so the coefficient means the same at every width.
        weighted = acts.abs() * self.W_dec.norm(dim=1) if self.l1_decoder_norm else acts.abs()
        l1 = weighted.sum(-1).mean()
        return acts, self.cfg.l1_coefficient * l1.float()


class TopKSAE(BaseSAE):
    """Keeps the k largest pre-activations of every row (Gao et al. 2024)."""

    architecture = "topk"

    def _encode_2d(self, x, train=False):
        values, indices = self._op("topk_encode")(x, self.W_enc, self.b_enc, self._input_b_dec(), self.cfg.k)
        return SparseActs(values, indices, self.d_sae)


class BatchTopKSAE(BaseSAE):
    """Keeps the N·k largest activations of a batch of N rows in training (Bussmann et al.
    2024); at inference it is a JumpReLU with the learned scalar `threshold` (an EMA of the
    smallest kept activation in training). Until a threshold has been learned (threshold < 0),
    inference falls back to batch top-k selection."""

    architecture = "batchtopk"

    def __init__(self, cfg: SAEConfig | None = None, **kwargs: Any):
        super().__init__(cfg, **kwargs)
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32, device=self.device))

    def _encode_2d(self, x, train=False):
        args = (x, self.W_enc, self.b_enc, self._input_b_dec())
        if train or self.training or float(self.threshold) < 0:
            acts = self._op("batchtopk_encode")(*args, self.cfg.k)
            if train:
                self._update_threshold(acts)
            return acts
        return self._op("threshold_encode")(*args, self.threshold.to(self.dtype))

    @torch.no_grad()
    def _update_threshold(self, acts: SparseActs) -> None:
        kept = acts.values[acts.values > 0]
        if kept.numel() == 0:
            return
        smallest = kept.min().float()
        m = self.cfg.batchtopk_threshold_momentum
        if float(self.threshold) < 0:
            self.threshold.copy_(smallest)
        else:
            self.threshold.mul_(m).add_((1 - m) * smallest)


class JumpReLUSAE(BaseSAE):
    """pre·1[pre > θ_j] with a learned per-latent threshold θ (Rajamanoharan et al. 2024),
    trained through a straight-through estimator with an L0 penalty."""

    architecture = "jumprelu"

    def __init__(self, cfg: SAEConfig | None = None, **kwargs: Any):
        super().__init__(cfg, **kwargs)
        self.threshold = nn.Parameter(
            torch.full((self.d_sae,), self.cfg.jumprelu_init_threshold, dtype=self.dtype, device=self.device)
        )

    def _encode_2d(self, x, train=False):
        return self._op("jumprelu_encode")(
            x, self.W_enc, self.b_enc, self._input_b_dec(), self.threshold, self.cfg.jumprelu_bandwidth
        )

    def _fused_forward(self, x):
        return self._op("jumprelu_forward")(
            x, self.W_enc, self.b_enc, self._input_b_dec(), self.threshold, self.W_dec, self.b_dec
        )

    def _train_encode(self, x):
        # One GEMM feeds both the activation and the L0 penalty's straight-through estimator.
        pre = reference.pre_activations(x, self.W_enc, self.b_enc, self._input_b_dec())
        eps = self.cfg.jumprelu_bandwidth
        acts = reference.JumpReLU.apply(pre, self.threshold, eps)
        l0 = reference.Step.apply(pre, self.threshold, eps).sum(-1).mean()
        return acts, self.cfg.l0_coefficient * l0.float()


SAE_CLASSES: dict[str, type[BaseSAE]] = {
    cls.architecture: cls for cls in (StandardSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE)
}


def sae_class(architecture: str) -> type[BaseSAE]:
    try:
        return SAE_CLASSES[architecture]
    except KeyError:
        raise InputError(
            f"unknown architecture {architecture!r}: use one of {', '.join(SAE_CLASSES)}"
        ) from None


def build_sae(cfg: SAEConfig) -> BaseSAE:
    return sae_class(cfg.architecture)(cfg)


def load_sae(path, device=None, dtype=None) -> BaseSAE:
    """Load a checkpoint written by save_pretrained into the right SAE class."""
    cfg, state = read_checkpoint(path)
    weights_path = Path(path) / WEIGHTS_NAME

    changes = {}
    if device is not None:
        changes["device"] = str(device)
    if dtype is not None:
        changes["dtype"] = dtype
    if changes:
        cfg = cfg.replace(**changes)
    with torch.device("meta"):  # no point initialising weights that are about to be replaced
        sae = build_sae(cfg.replace(device="meta"))
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(
            f"{weights_path} lacks tensors {missing} for a {cfg.architecture} SAE; it holds "
            f"{sorted(state)} (expected {sorted(expected)})"
        )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{weights_path} has tensors {unexpected} that a {cfg.architecture} SAE does not use "
            f"(expected {sorted(expected)}): is {CFG_NAME}'s architecture right?"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(
                f"{weights_path}: {name} has shape {tuple(state[name].shape)} but {CFG_NAME} "
                f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) implies {shape}; the two files disagree"
            )
    sae.load_state_dict(state, strict=True, assign=True)
    sae.cfg = cfg
    return sae.to(device=cfg.device, dtype=cfg.torch_dtype)


__all__ = [
    "BaseSAE", "StandardSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "TrainOutput",
    "SAE_CLASSES", "sae_class", "build_sae", "load_sae",
]
