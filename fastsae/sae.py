"""BaseSAE: what every SAE architecture shares, on one process or as one shard of many.

Parameter names and layouts follow SAELens: W_enc [d_in, d_sae], b_enc [d_sae],
W_dec [d_sae, d_in], b_dec [d_in] (+ an architecture's own tensors, e.g. JumpReLU's
threshold). Math lives in the ops (fastsae.ops picks a backend per device); this file is
policy: shapes, checks, losses.

An SAE module holds the latents [shard_start, shard_end) of a dictionary of width d_sae.
On one process (the default LocalContext) that is all of them; under
fastsae.distributed each rank's module holds one slice, and the module's `context` merges
what the slices compute (top-k candidates, partial reconstructions). Each architecture
(fastsae/architectures/) is written once against this: its activation, its penalty and its
statistics run on whatever slice the module holds, so the whole SAE and each shard of a
sharded one are the same code.

The public protocol the Trainer drives (and nothing else):
    takes_sparse_path              class constant: encode selects a SparseActs, and the
                                   explicit sparse backward applies (the TopK family)
    prepare(x) -> (x2, restore)    checked, flattened, normalised input [N, d_in]
    prepare_target(y, x2)          a transcoder's checked, flattened target [N, d_out]
    select(x2, train)              sparse architectures: a Selection
    select_for_training(x2, dead, k_aux)  select(x2, train=True) and, where the same pass can
                                   give it, AuxK's selection among the dead latents
    decode_selection(sel, x2)      the reconstruction of a Selection (+ the skip term of x2)
    sparse_loss(sel, x_hat, y)     the reconstruction objective and its gradient, for ...
    sparse_backward(x2, sel, g)    ... the row-sparse gradients of the latents that fired, db_dec
                                   (and the .grad of dense_parameters())
    dense_parameters()             parameters trained densely on the sparse path (W_skip)
    auxk_grads(x2, residual, dead, k_aux, scale, preacts)  AuxK's loss and row-sparse gradients
    training_forward(x, target)    autograd path: loss and its terms
    normalize_input(x)             the input in the space the SAE encodes (init, resampling)
    encode_prepared(x2), decode    inference on a prepared input (resampling, fine-tuning stage)
    local_view()                   this module's latents numbered from 0 (optimizer, init)
    latent_dims, shard_start/end   which tensors are latent-indexed; this module's latent slice
    l1_decoder_norm                attribute: ReLU SAEs' L1 weighting
    save_pretrained(path)

A transcoder (cfg.transcoder) is any architecture whose decoder maps to another activation
of width d_out: the target replaces x in the losses; everything else is unchanged.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Union

import torch
from torch import nn

from . import ops
from .checkpoint import CFG_NAME, WEIGHTS_NAME, read_checkpoint, save_sae
from .config import SAEConfig
from .errors import CheckpointError, ConfigError, InputError
from .init import tied_init_
from .losses import top_dead_preacts, total_variance
from .parallel import LOCAL, ParallelContext
from .sparse import RowSparseGrads, Selection, SparseActs

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

    mse: squared error summed over d_in, averaged over rows (SAELens convention; 0 for an
        empty batch).
    fvu: fraction of variance unexplained (squared error / variance of x about its batch mean);
        NaN when the batch has no variance (fewer than two rows, or all rows equal), where it is
        undefined. It is a metric, not part of the loss.
    sparsity: the architecture's penalty term, already multiplied by its coefficient
        (L1 for standard and gated, L0 for jumprelu, 0 for the TopK family).
    l0: mean active latents per row (not differentiable).
    aux: the architecture's other loss terms, not subject to a sparsity warmup (Gated: the
        gate path's reconstruction through the frozen decoder; Matryoshka: the inner levels'
        reconstructions); 0 for the others. loss = mse + sparsity + aux.
    """

    loss: torch.Tensor
    mse: torch.Tensor
    fvu: torch.Tensor
    sparsity: torch.Tensor
    l0: torch.Tensor
    x_hat: torch.Tensor
    acts: Acts
    aux: torch.Tensor | None = None

    def scalars(self) -> dict[str, float]:
        out = {k: float(getattr(self, k).detach()) for k in ("loss", "mse", "fvu", "sparsity", "l0")}
        if self.aux is not None:
            out["aux"] = float(self.aux.detach())
        return out


def sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """Σ t² as one BLAS dot (no squared copy: a training step's per-batch sums are passes over
    [N, d] tensors, and a fresh [N, d] temporary costs more than the sum itself)."""
    flat = t.reshape(-1)
    return torch.dot(flat, flat)


def reconstruction_terms(x_hat: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(err, mse, fvu) of a reconstruction x_hat of x [N, d] (TrainOutput's definitions)."""
    err = (x_hat - x).float()
    sq = sum_of_squares(err)
    mse = sq / max(x.shape[0], 1)
    xf = x.float()
    var = sum_of_squares(xf - xf.mean(0)) if x.shape[0] else sq.new_zeros(())
    fvu = sq / var if float(var) > 0 else sq.new_full((), float("nan"))
    return err, mse, fvu


def mse_loss(x_hat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over the features and averaged over rows, in at least float32
    (TrainOutput.mse's definition, differentiable)."""
    dt = torch.promote_types(x_hat.dtype, torch.float32)
    return (x_hat.to(dt) - target.to(dt)).pow(2).sum() / max(target.shape[0], 1)


def unequal_width_backward(x_in, values, indices, grad_out, W_enc, W_dec) -> RowSparseGrads:
    """ops "topk_sae_backward"(row_sparse=True, b_dec=None) for a decoder whose width differs
    from the encoder's (transcoders; the native kernels assume equal widths): plain PyTorch,
    O(N·k·(d_in + d_out)) memory, nothing of the dictionary's size."""
    latents, inverse = torch.unique(indices, return_inverse=True)
    inverse = inverse.reshape(-1)
    u = latents.numel()
    dvalues = torch.einsum("bd,bkd->bk", grad_out, W_dec[indices])
    dpre = dvalues * (values > 0)
    dW_dec = grad_out.new_zeros(u, W_dec.shape[1]).index_add_(
        0, inverse, (values.unsqueeze(-1) * grad_out.unsqueeze(1)).reshape(-1, W_dec.shape[1]))
    dW_enc_t = x_in.new_zeros(u, W_enc.shape[0]).index_add_(
        0, inverse, (dpre.unsqueeze(-1) * x_in.unsqueeze(1)).reshape(-1, W_enc.shape[0]))
    db_enc = dpre.new_zeros(u).index_add_(0, inverse, dpre.reshape(-1))
    return RowSparseGrads(latents, dW_enc_t.t(), db_enc, dW_dec, W_dec.shape[0])


class LocalView:
    """A module's own latents numbered from 0, as a module of width d_sae_local: what the
    latent-indexed helpers and the main optimizer (RowSparseAdam, init_from_data_,
    build_optimizer) see. Its parameters leave out the dense ones (a skip connection), which
    the Trainer steps with an optimizer of their own."""

    def __init__(self, sae: BaseSAE):
        self.sae = sae
        self.d_sae, self.d_in = sae.d_sae_local, sae.d_in
        self.device, self.dtype = sae.device, sae.dtype
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec

    def named_parameters(self):
        dense = self.sae.dense_parameters()
        return ((n, p) for n, p in self.sae.named_parameters() if n not in dense)


class BaseSAE(nn.Module):
    """Shared parameters, input checks, encode/decode/forward, the trainer's protocol and save/load.

    An architecture subclass sets `architecture`, `takes_sparse_path`, `needs_k`, and either
    `select` (sparse) or `activate` (dense); optionally `latent_dims` for its own
    latent-indexed tensors, `_init_architecture_state`, `_fused_forward` and
    `validate_config`. See fastsae/architectures/.
    """

    architecture: ClassVar[str] = ""
    takes_sparse_path: ClassVar[bool] = False
    needs_k: ClassVar[bool] = False
    # state-dict entries indexed by latent, and the dimension that runs over latents (split
    # over the shards of a sharded SAE; every other entry is replicated)
    latent_dims: ClassVar[dict[str, int]] = {"W_enc": 1, "b_enc": 0, "W_dec": 0}
    # the encoder's starting scale relative to W_decᵀ (fastsae.init.TOPK_ENCODER_INIT_SCALE for the TopK family)
    encoder_init_scale: ClassVar[float] = 1.0
    l1_decoder_norm: bool = True  # ReLU SAEs' L1 weighting (TrainConfig.l1_decoder_norm sets it)

    def __init__(self, cfg: SAEConfig | None = None, *, context: ParallelContext | None = None,
                 seed: int | None = None, init: bool = True, **kwargs: Any):
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
        self.context = context if context is not None else LOCAL
        self.shard_start, self.shard_end = self.context.shard_range(cfg.d_sae)
        d, n, d_out = cfg.d_in, self.d_sae_local, cfg.output_dim
        f = dict(dtype=cfg.torch_dtype, device=cfg.device)
        self.W_enc = nn.Parameter(torch.empty(d, n, **f))
        self.b_enc = nn.Parameter(torch.zeros(n, **f))
        self.W_dec = nn.Parameter(torch.empty(n, d_out, **f))
        self.b_dec = nn.Parameter(torch.zeros(d_out, **f))
        # replicated over shards like b_dec; SAELens's and sparsify's layout [d_out, d_in]
        self.W_skip = nn.Parameter(torch.zeros(d_out, d, **f)) if cfg.skip_connection else None
        self._init_architecture_state()
        if init:
            self.reset_parameters(seed)

    def _init_architecture_state(self) -> None:
        """Create the architecture's own parameters and buffers (local slice where latent-indexed)."""

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        """Raise ConfigError for settings this architecture cannot use."""
        if not cls.needs_k:
            return
        if cfg.k is None:
            raise ConfigError(
                f"architecture {cfg.architecture!r} needs k (active latents per row): pass k=<1..{cfg.d_sae}>"
            )
        if not isinstance(cfg.k, int) or isinstance(cfg.k, bool):
            raise ConfigError(f"k must be an integer, got {cfg.k!r}")
        if not 1 <= cfg.k <= cfg.d_sae:
            raise ConfigError(
                f"k={cfg.k} is out of range: it must satisfy 1 <= k <= d_sae={cfg.d_sae} "
                "(k is how many latents fire per row)"
            )

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Unit-norm random decoder rows and a tied encoder (W_enc = W_decᵀ, times the class's
        encoder_init_scale), zero biases (and
        a zero skip connection). A transcoder whose widths differ draws its encoder columns
        separately. A whole SAE draws from the global RNG unless given a seed; a shard draws
        its own slice from a generator keyed on (seed, shard), so replicas of a shard start
        identical and no rank generates the whole dictionary."""
        dev = self.W_dec.device
        gen = None
        if seed is not None or self.context.shards > 1:
            gen = torch.Generator(device=dev)
            gen.manual_seed((0 if seed is None else seed) * 1_000_003 + self.context.shard)

        def draw(width):
            return torch.randn((self.d_sae_local, width), generator=gen, dtype=torch.float32, device=dev)

        directions = draw(self.d_out)
        if self.d_out == self.d_in:
            tied_init_(self, directions)
        else:
            enc = draw(self.d_in)
            self.W_dec.copy_(directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12))
            self.W_enc.copy_((enc / enc.norm(dim=1, keepdim=True).clamp_min(1e-12)).t())
            self.b_enc.zero_()
            self.b_dec.zero_()
        if self.encoder_init_scale != 1.0:
            self.W_enc.mul_(self.encoder_init_scale)
        if self.W_skip is not None:
            self.W_skip.zero_()

    # ---------------------------------------------------------------- properties
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_out(self) -> int:
        """The reconstruction's width: d_in, or a transcoder's d_out."""
        return self.cfg.output_dim

    @property
    def d_sae(self) -> int:
        """The whole dictionary's width (latent ids run over [0, d_sae))."""
        return self.cfg.d_sae

    @property
    def d_sae_local(self) -> int:
        """How many latents this module holds (d_sae unless it is one shard of many)."""
        return self.shard_end - self.shard_start

    @property
    def sharded(self) -> bool:
        return self.context.shards > 1

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

    def op(self, name: str):
        """The implementation of op `name` this module uses (fastsae.ops: the backend's own, or the
        next backend's of the device's chain)."""
        device = self.device  # one parameter lookup: op() runs several times a training step
        return ops.get(name, ops.resolve_backend(self.cfg.backend, device), device)

    def local_view(self) -> LocalView:
        return LocalView(self)

    def dense_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters that are neither latent-indexed nor b_dec (the skip connection): the
        sparse path sets their .grad in sparse_backward and they take a dense optimizer."""
        return {"W_skip": self.W_skip} if self.W_skip is not None else {}

    def extra_repr(self) -> str:
        k = f", k={self.cfg.k}" if self.cfg.k is not None else ""
        where = (f", latents [{self.shard_start}, {self.shard_end}) of shard {self.context.shard}/"
                 f"{self.context.shards}" if self.sharded else "")
        out = f", d_out={self.d_out}" if self.d_out != self.d_in else ""
        return f"d_in={self.d_in}{out}, d_sae={self.d_sae}{k}{where}, dtype={self.dtype}, device={self.device}"

    # ---------------------------------------------------------------- input
    def prepare(self, x: torch.Tensor):
        """x [..., d_in] checked and flattened to [N, d_in] in the SAE's dtype, then normalised
        (cfg.normalize_activations); returns (x2, restore), restore mapping a reconstruction
        back to x's scale (the identity for "none")."""
        return self.normalize_input(self._check_input(x))

    def normalize_input(self, x: torch.Tensor):
        """cfg.normalize_activations applied to x [N, d_in] before encoding, and the map that
        takes a reconstruction back to x's scale. Mirrors SAELens and OpenAI."""
        mode = self.cfg.normalize_activations
        if mode == "layer_norm":  # OpenAI's LN: unbiased std, eps added to std, not undone
            mu = x.mean(-1, keepdim=True)
            std = (x - mu).std(-1, keepdim=True)
            return (x - mu) / (std + 1e-5), lambda y: y * std + mu
        if mode == "constant_norm_rescale":
            coeff = self.d_in ** 0.5 / x.norm(dim=-1, keepdim=True)
            return x * coeff, lambda y: y / coeff
        return x, lambda y: y

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InputError(
                f"x has dtype {x.dtype}, but SAEs take floating-point activations: pass x.to({self.dtype}) instead"
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

    def prepare_target(self, target: torch.Tensor | None, x2: torch.Tensor) -> torch.Tensor:
        """The reconstruction target of prepared input x2: x2 itself for an SAE, `target`
        [..., d_out] (checked, flattened to x2's rows) for a transcoder."""
        if not self.cfg.transcoder:
            if target is not None:
                raise InputError("this SAE reconstructs its input, so it takes no target: build it with "
                                 "transcoder=True to map one activation to another")
            return x2
        if target is None:
            raise InputError("a transcoder reconstructs another activation: pass its target, "
                             "training_forward(x, target) (or train on a fastsae.PairedSource)")
        if not isinstance(target, torch.Tensor) or not target.is_floating_point():
            raise InputError(f"the target must be a floating-point tensor, got {getattr(target, 'dtype', target)!r}")
        if target.dim() == 0 or target.shape[-1] != self.d_out or target.numel() // self.d_out != x2.shape[0]:
            raise InputError(
                f"the target has shape {tuple(target.shape)}, but this transcoder maps {x2.shape[0]} rows of "
                f"d_in={self.d_in} to d_out={self.d_out}: pass one target row [..., {self.d_out}] per input row"
            )
        if target.device != self.device:
            raise InputError(f"the target is on {target.device} but the SAE is on {self.device}: move it")
        if self.cfg.check_finite and target.numel() and not bool(torch.isfinite(target).all()):
            raise InputError("the target contains NaN/inf values: clean the activations "
                             "(or build the SAE with check_finite=False to skip this check)")
        return target.reshape(-1, self.d_out).to(self.dtype)

    def skip_term(self, x2: torch.Tensor) -> torch.Tensor | None:
        """x2 @ W_skip.T, the skip connection's part of the output (None without one)."""
        return None if self.W_skip is None else x2 @ self.W_skip.t()

    def encoder_input(self, x2: torch.Tensor) -> torch.Tensor:
        """x - b_dec (when applied to the input), entering the shards: each shard encodes its
        own latents from it, and its gradient is summed over them."""
        x_in = x2 - self.b_dec if self.cfg.apply_b_dec_to_input else x2
        return self.context.enter_shards(x_in)

    def encoder_args(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x, b_dec) for an encode op. A whole module hands b_dec to the op, whose backward
        then gives b_dec's gradient as W_enc @ db_enc instead of an [N, d_in] dx summed over
        rows; a shard subtracts it before entering the shards (encoder_input), which sum the
        input's gradient over them."""
        if self.cfg.apply_b_dec_to_input and not self.sharded:
            return x2, self.b_dec
        return self.encoder_input(x2), None

    def pre_activations(self, x2: torch.Tensor) -> torch.Tensor:
        """(x - b_dec) @ W_enc + b_enc of this module's latents [N, d_sae_local] (dense: for
        facades and tests, not the training path)."""
        return ops.reference.pre_activations(self.encoder_input(x2), self.W_enc, self.b_enc)

    # ---------------------------------------------------------------- per architecture
    def select(self, x2: torch.Tensor, train: bool = False) -> Selection:
        """Sparse architectures: the selection of prepared input x2 [N, d_in] (train=True also
        updates the architecture's statistics, e.g. BatchTopK's threshold)."""
        raise InputError(f"select() is for the sparse architectures, this one is {self.cfg.architecture!r}")

    def activate(self, x_in: torch.Tensor, train: bool):
        """Dense architectures: this module's activations [N, d_sae_local] of encoder input x_in,
        and (train=True) its part of the sparsity penalty times its coefficient. It may return
        a third item (train=True): this module's part of an auxiliary reconstruction decoded by
        a frozen decoder (Gated's gate path), scored against the target like x_hat."""
        raise NotImplementedError

    def select_for_training(self, x2: torch.Tensor, dead: torch.Tensor | None, k_aux: int):
        """(select(x2, train=True), AuxK's selection among the `dead` global latent ids for
        auxk_grads's `preacts`, or None where the architecture's pass cannot give it; then
        auxk_grads scans the dead latents' encoder columns itself)."""
        return self.select(x2, train=True), None

    def local_dead(self, dead: torch.Tensor) -> torch.Tensor:
        """The global latent ids `dead` that this module holds, as its local ids."""
        return dead[(dead >= self.shard_start) & (dead < self.shard_end)] - self.shard_start

    def selection_loss(self, sel: Selection, x_hat: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        """Sparse architectures: loss terms beyond the MSE of x_hat, from the training selection
        (differentiable; Matryoshka's inner levels). None for most."""
        return None

    def _fused_forward(self, x2: torch.Tensor) -> torch.Tensor | None:
        """x_hat in one fused pass (no autograd, whole SAE only) where the architecture has one."""
        return None

    # ---------------------------------------------------------------- API
    def encode(self, x: torch.Tensor, dense: bool = False) -> Acts:
        """Latent activations of x [..., d_in]: a SparseActs for the sparse architectures
        (dense=True gives a [..., d_sae] tensor), a dense tensor for the others."""
        lead = x.shape[:-1] if isinstance(x, torch.Tensor) and x.dim() else ()
        acts = self.encode_prepared(self.prepare(x)[0])
        if isinstance(acts, SparseActs):
            acts = acts.reshape_rows(tuple(lead))
            return acts.to_dense() if dense else acts
        return acts.reshape(*lead, self.d_sae)

    def encode_decode(self, x: torch.Tensor) -> tuple[Acts, torch.Tensor]:
        """(encode(x), forward(x)) from one encode: the activations and the reconstruction, the
        latter mapped back to x's scale when the SAE normalises its input."""
        lead = x.shape[:-1] if isinstance(x, torch.Tensor) and x.dim() else ()
        x2, restore = self.prepare(x)
        acts = self.encode_prepared(x2)
        x_hat = restore(self.decode(acts)).reshape(x.shape)
        if isinstance(acts, SparseActs):
            return acts.reshape_rows(tuple(lead)), x_hat
        return acts.reshape(*lead, self.d_sae), x_hat

    def encode_prepared(self, x2: torch.Tensor) -> Acts:
        """encode() of input already prepared (prepare(x)[0]): [N, ...] activations."""
        if self.takes_sparse_path:
            return self.select(x2).acts
        local = self.activate(self.encoder_input(x2), train=False)[0]
        return self.context.gather_dense(local, self.d_sae)

    def decode(self, acts: Acts) -> torch.Tensor:
        """Reconstruction [..., d_in] from a SparseActs over global ids or a dense [..., d_sae] tensor."""
        if isinstance(acts, SparseActs):
            if acts.d_sae != self.d_sae:
                raise InputError(f"acts have d_sae={acts.d_sae} but this SAE has d_sae={self.d_sae}")
            lead = acts.values.shape[:-1]
            flat = acts.flatten_rows()
            check_latent_ids(flat.indices, self.d_sae)
            values, local = flat.values.to(self.dtype), flat.indices - self.shard_start
            if self.sharded:  # other shards' latents: value 0 at local id 0
                own = (local >= 0) & (local < self.d_sae_local)
                values, local = values.masked_fill(~own, 0), torch.where(own, local, torch.zeros_like(local))
            partial = self.op("sparse_decode")(values, local, self.W_dec, None)
            return self.finish_decode(partial).reshape(*lead, self.d_out)
        if not isinstance(acts, torch.Tensor) or acts.dim() == 0 or acts.shape[-1] != self.d_sae:
            shape = tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__
            raise InputError(f"decode takes a SparseActs or a dense tensor [..., d_sae={self.d_sae}], got {shape}")
        lead = acts.shape[:-1]
        mine = acts.reshape(-1, self.d_sae)[:, self.shard_start:self.shard_end].to(self.dtype)
        return self.finish_decode(self.op("dense_decode")(mine, self.W_dec, None)).reshape(*lead, self.d_out)

    def finish_decode(self, partial: torch.Tensor) -> torch.Tensor:
        """Σ over the shards of their partial reconstructions, + b_dec."""
        return self.context.sum_shards(partial) + self.b_dec

    def decode_selection(self, sel: Selection, x2: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction [N, d_out] of a Selection (its local values and ids), plus the skip
        connection's term of input x2 when there is one and x2 is given."""
        decode = self.op("sparse_decode")
        values = sel.values.to(self.dtype)
        if self.sharded:  # b_dec once, after the shards' partial sums meet
            out = self.finish_decode(decode(values, sel.indices, self.W_dec, None))
        else:  # the op adds b_dec: no second [N, d] pass
            out = decode(values, sel.indices, self.W_dec, self.b_dec)
        skip = self.skip_term(x2) if x2 is not None else None
        return out if skip is None else out + skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction x_hat of x, same shape as x (a transcoder's output [..., d_out])."""
        x2, restore = self.prepare(x)
        x_hat = None if (self._needs_grad(x2) or self.sharded) else self._fused_forward(x2)
        if x_hat is None:
            x_hat = self._reconstruct(x2, train=False)[0]
        elif self.W_skip is not None:
            x_hat = x_hat + self.skip_term(x2)
        return restore(x_hat).reshape(*x.shape[:-1], self.d_out)

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _reconstruct(self, x2: torch.Tensor, train: bool, target: torch.Tensor | None = None):
        """(x_hat, acts over global ids, penalty, aux) of prepared input x2; aux (the
        architecture's other loss terms against `target`) only when a target is given."""
        zero = torch.zeros((), device=self.device)
        aux = None
        if self.takes_sparse_path:
            sel = self.select(x2, train=train)
            x_hat = self.decode_selection(sel, x2)
            if target is not None:
                aux = self.selection_loss(sel, x_hat, target)
            return x_hat, sel.acts, zero, aux
        local, penalty, *gate = self.activate(self.encoder_input(x2), train=train)
        x_hat = self.finish_decode(self.op("dense_decode")(local, self.W_dec, None))
        skip = self.skip_term(x2)
        if skip is not None:
            x_hat = x_hat + skip
        if penalty is None:
            penalty = zero
        else:
            penalty = self.context.sum_shards(penalty, "the sparsity penalty")
        if gate and gate[0] is not None and target is not None:  # decoded by the frozen decoder
            recon = self.context.sum_shards(gate[0], "the auxiliary reconstructions") + self.b_dec.detach()
            aux = mse_loss(recon, target)
        return x_hat, self.context.fired_acts(local, self.shard_start, self.d_sae), penalty, aux

    def training_forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> TrainOutput:
        """Encode, decode and score a batch; backpropagate `.loss` (on every rank when sharded:
        each gets the same loss). Losses are in the normalised space, as OpenAI's. A
        transcoder scores its reconstruction against `target` [..., d_out]."""
        lead = x.shape[:-1] if isinstance(x, torch.Tensor) and x.dim() else ()
        x2 = self.prepare(x)[0]
        y2 = self.prepare_target(target, x2)
        x_hat, acts, sparsity, aux = self._reconstruct(x2, train=True, target=y2)
        _, mse, fvu = reconstruction_terms(x_hat, y2)
        l0 = (acts.l0() if isinstance(acts, SparseActs) else (acts != 0).sum(-1)).float()
        l0 = l0.mean() if l0.numel() else l0.new_zeros(())
        out_acts = acts.reshape_rows(tuple(lead)) if isinstance(acts, SparseActs) else acts.reshape(*lead, -1)
        aux = mse.new_zeros(()) if aux is None else aux
        return TrainOutput(loss=mse + sparsity + aux, mse=mse, fvu=fvu, sparsity=sparsity, l0=l0,
                           x_hat=x_hat.reshape(*lead, self.d_out), acts=out_acts, aux=aux)

    # ---------------------------------------------------------------- the explicit sparse step
    @torch.no_grad()
    def sparse_loss(self, sel: Selection, x_hat: torch.Tensor, target: torch.Tensor):
        """The sparse path's reconstruction objective without autograd: (loss, grad_out), where
        grad_out is what sparse_backward takes. Here the MSE of x_hat and ∂MSE/∂x_hat =
        2/N·(x_hat - target) [N, d_out] (Matryoshka: its levels' summed losses and the
        gradient per level)."""
        err = (x_hat - target).float()
        n = max(target.shape[0], 1)
        loss = sum_of_squares(err) / n
        return loss, err.mul_(2.0 / n)  # err is this call's own tensor

    @torch.no_grad()
    def sparse_backward(self, x2: torch.Tensor, sel: Selection, grad_out: torch.Tensor):
        """The sparse architectures' backward outside autograd (ops "topk_sae_backward"):
        (RowSparseGrads over this module's own latent ids that were kept with a nonzero value,
        db_dec) for grad_out = ∂L/∂x_hat [N, d_out], the same on every shard. db_dec's encoder
        part is summed over the shards, so it is the whole SAE's db_dec everywhere. The dense
        parameters' .grad (the skip connection's) are set."""
        rows, db_dec = self._latent_backward(x2, sel.values, sel.indices, grad_out)
        if self.sharded:
            decoder_part = grad_out.sum(0).to(db_dec.dtype)
            db_dec = decoder_part - self.context.sum_shards_((decoder_part - db_dec).contiguous())
        if self.W_skip is not None:
            self.W_skip.grad = (grad_out.t().to(self.dtype) @ x2).to(self.W_skip.dtype)
        return rows, db_dec

    def _latent_backward(self, x2, values, indices, grad_out):
        """(RowSparseGrads of the slots' latents kept with a nonzero value, db_dec as the op
        gives it: Σ_b grad_out_b minus, when b_dec is subtracted from the input, Σ_b ∂L/∂x_in_b
        of these slots), for this module's local ids."""
        values, grad_out = values.to(self.dtype), grad_out.to(self.dtype)
        if self.d_out == self.d_in:
            g = self.op("topk_sae_backward")(x2, values, indices, grad_out, self.W_enc, self.W_dec,
                                             self.b_dec if self.cfg.apply_b_dec_to_input else None, row_sparse=True,
                                             need_dx=False)
            rows, db_dec = g["rows"], g["db_dec"]
        else:  # a transcoder never subtracts b_dec from its input
            rows = unequal_width_backward(x2, values, indices, grad_out, self.W_enc, self.W_dec)
            db_dec = grad_out.sum(0)
        # a latent selected with value 0 (fewer positive pre-activations than slots), and the
        # slots another shard won (value 0 at local id 0), have zero gradients: drop them (the
        # test alone where no value is 0, the usual case: the mask's indexing costs a third of
        # AuxK's backward at k_aux = 128)
        nonzero = values != 0
        if bool(nonzero.all()):
            return rows, db_dec
        kept = torch.zeros(self.d_sae_local, dtype=torch.bool, device=self.device)
        kept[indices[nonzero]] = True
        keep = kept[rows.latents]
        if not bool(keep.all()):
            rows = RowSparseGrads(rows.latents[keep], rows.W_enc[:, keep], rows.b_enc[keep], rows.W_dec[keep],
                                  self.d_sae_local)
        return rows, db_dec

    @torch.no_grad()
    def auxk_grads(self, x2: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, k_aux: int,
                   scale: float = 1.0, preacts: tuple[torch.Tensor, torch.Tensor] | None = None):
        """AuxK (Gao et al. 2024) and its gradient, outside autograd: each row's k_aux largest
        ReLU'd pre-activations among the `dead` global latent ids reconstruct the (detached)
        residual; the loss is normalised by the residual's variance and scaled by `scale`.
        Returns (loss, RowSparseGrads of this module's latents that AuxK picked with a nonzero
        value, or None if none). The gradient is the sparse backward of that selection (the
        TopK formula), so nothing of the dictionary's size is allocated and no parameter copy
        is gathered. The work is the encoder GEMM over the dead latents' columns plus
        O(rows·k_aux·d_in), or only the latter when `preacts` (this module's (values, local
        ids) from select_for_training) gives the selection. Every shard must call it with the
        same `dead`."""
        x_in = self.encoder_input(x2)
        mine = self.local_dead(dead)
        if preacts is not None:
            vals, ids = preacts
        else:
            vals, ids = top_dead_preacts(x_in, self.W_enc, self.b_enc, mine, min(k_aux, mine.numel()),
                                         self.op("topk_encode"))
        width = min(k_aux, max(int(((dead >= s) & (dead < e)).sum()) for s, e in
                               (self.context.shard_range(self.d_sae, i) for i in range(self.context.shards))))
        sel = self.context.merge_topk(vals, ids, min(k_aux, dead.numel()), self.shard_start, width, self.d_sae,
                                      what="AuxK")
        partial = self.op("sparse_decode")(sel.values, sel.indices, self.W_dec, None) if sel.values.numel() \
            else x_in.new_zeros((x_in.shape[0], self.d_out))
        recon = self.context.sum_shards(partial.to(self.dtype), "the AuxK reconstruction")
        residual = residual.float()
        variance = total_variance(residual)
        err = recon.float() - residual
        loss = scale * err.pow(2).sum() / variance
        if not bool((sel.values != 0).any()):
            return loss, None
        rows, _ = self._latent_backward(x2, sel.values, sel.indices, (2.0 * scale / variance) * err)
        return loss, rows

    # ---------------------------------------------------------------- whole / shards
    def to_full(self) -> BaseSAE:
        """The whole SAE (itself unless it is a shard; every shard of the replica must call it)."""
        if not self.sharded:
            return self
        from .distributed.sharded_sae import gather_full

        return gather_full(self)

    # ---------------------------------------------------------------- save / load
    def save_pretrained(self, path) -> None:
        """Write cfg.json + sae_weights.safetensors into directory `path`, atomically (a shard
        writes a sharded checkpoint with the others: every rank calls it)."""
        if self.sharded:
            from .distributed.checkpoint import save_sharded

            save_sharded(self, path)
        else:
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


# ---------------------------------------------------------------------- the architecture registry
SAE_CLASSES: dict[str, type[BaseSAE]] = {}


def register(cls: type[BaseSAE]) -> type[BaseSAE]:
    """Class decorator: make architecture `cls.architecture` buildable from a config."""
    SAE_CLASSES[cls.architecture] = cls
    return cls


def architectures() -> dict[str, type[BaseSAE]]:
    """architecture name -> class, every registered one (importing fastsae.architectures)."""
    importlib.import_module("fastsae.architectures")
    return SAE_CLASSES


def sae_class(architecture: str) -> type[BaseSAE]:
    known = architectures()
    try:
        return known[architecture]
    except KeyError:
        raise InputError(f"unknown architecture {architecture!r}: use one of {', '.join(known)}") from None


def sparse_architectures() -> tuple[str, ...]:
    """The architectures that take the sparse path (encode selects; explicit sparse backward)."""
    return tuple(name for name, cls in architectures().items() if cls.takes_sparse_path)


def build_sae(cfg: SAEConfig, context: ParallelContext | None = None, seed: int | None = None,
              init: bool = True) -> BaseSAE:
    """The SAE `cfg` describes; with a distributed `context`, this rank's slice of it."""
    return sae_class(cfg.architecture)(cfg, context=context, seed=seed, init=init)


def latent_slice(name: str, t: torch.Tensor, start: int, end: int, architecture: str) -> torch.Tensor:
    """Latents [start, end) of a whole SAE's state-dict entry (replicated entries whole)."""
    dim = sae_class(architecture).latent_dims.get(name)
    return t if dim is None else t.narrow(dim, start, end - start)


def load_sae(path, device=None, dtype=None) -> BaseSAE:
    """Load a checkpoint written by save_pretrained into the right SAE class."""
    cfg, state = read_checkpoint(path, device=device)
    weights_path = Path(path) / WEIGHTS_NAME
    changes = {}
    if device is not None:
        changes["device"] = str(device)
    if dtype is not None:
        changes["dtype"] = dtype
    if changes:
        cfg = cfg.replace(**changes)
    with torch.device("meta"):  # no point initialising weights that are about to be replaced
        sae = build_sae(cfg.replace(device="meta"), init=False)
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
    "BaseSAE", "TrainOutput", "LocalView", "SAE_CLASSES", "register", "architectures", "sae_class",
    "sparse_architectures", "build_sae", "latent_slice", "load_sae", "check_latent_ids", "reconstruction_terms",
    "mse_loss", "unequal_width_backward",
]
