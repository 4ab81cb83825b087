"""Training loop for every architecture: schedules, AuxK, constraints, tracking, checkpoints.

Two step paths:
* sparse (TopK / BatchTopK, the default for them): encode and decode without autograd, then
  the whole backward through ops "topk_sae_backward"(row_sparse=True), which returns
  gradients for the latents that fired only. Nothing [B, d_sae]-shaped is built here, so
  memory is set by the encode op (the native backends stream the top-k). The gradients
  feed RowSparseAdam, or dense Adam's step_row_sparse (persistent gradient buffers).
* autograd (ReLU / JumpReLU, or sparse_backward=False): `sae.training_forward` + backward.
Both reach the SAE only through its training seam (select, _decode_selection,
sparse_backward, auxk_loss, training_forward), which a ShardedSAE has too: the same loop
trains one process or a torchrun job of replicas x shards (see Trainer and
fastsae.distributed); on one process every collective here is skipped.

A run lives in one directory: train_config.json, log.jsonl, curves.png, checkpoints/
(step_XXXXXXXX/ with the SAE and trainer_state.pt, plus LATEST) and final/ (the SAE). A
distributed run writes a sharded SAE and one trainer_state.rankR.pt per rank into each
checkpoint, and final_sharded/ next to final/.
`Trainer.resume(out_dir, source)` continues the same run: same data position, optimizer
state, tracker state and RNG, so on CPU the loss curve after a resume equals the
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .atomic import atomic_write, atomic_write_text, fsync_dir
from .checkpoint import save_sae
from .config import SAEConfig
from .constraints import normalize_rows_
from .data import ActivationSource, as_source
from .distributed.checkpoint import consolidate, is_sharded_checkpoint, load_sharded, save_sharded
from .distributed.collectives import DistributedError, checked
from .distributed.data_parallel import (
    all_ranks_agree,
    average_buffers,
    broadcast_parameters,
    gather_fired,
    reduce_gradients,
    reduce_row_sparse,
    replica_batches,
    replica_mean,
)
from .distributed.groups import ParallelLayout, single_process_layout
from .distributed.sharded_sae import ShardedSAE
from .errors import CheckpointError, ConfigError, InputError
from .init import init_b_dec_, init_from_data_
from .losses import total_variance
from .optim import DenseAdam, RowSparseAdam, merge_row_sparse
from .sae import BaseSAE, build_sae, load_sae
from .schedules import DECAY_SHAPES, lr_factor, sparsity_factor
from .sparse import RowSparseGrads, SparseActs
from .tracking import Tracker, plot_curves, read_log

TOPK_FAMILY = ("topk", "batchtopk")
STATE_NAME = "trainer_state.pt"
STATE_PATTERN = "trainer_state.rank{rank}.pt"
CONSOLIDATE_MAX_BYTES = 1 << 30  # a sharded SAE up to this size is also written as one final/
LATEST_NAME = "LATEST"


@dataclass
class TrainConfig:
    """Everything about a training run except the data. `sae` is the SAEConfig (or a dict).

    optimizer: "adam" (dense, torch's fused kernel) or "row_sparse_adam" (TopK family; see
        fastsae.optim for how it differs from dense Adam).
    sparse_backward: None = on for TopK/BatchTopK (required by row_sparse_adam).
    row_sparse_catch_up: row_sparse_adam's mode (True: silent latents get dense Adam's
        momentum steps in closed form when they fire again; False: lazy Adam).
    lr schedule: linear warmup over warmup_steps, then flat, then from decay_start (fraction
        of steps) a linear/cosine decay to final_lr_fraction·lr.
    sparsity_warmup_steps: the L1/L0 penalty ramps linearly from 0 over these steps.
    l1_decoder_norm: ReLU SAEs' L1 is Σ_j |f_j|·‖W_dec[j]‖ (True) or Σ_j |f_j| (False). The
        penalty is a sum over latents, never divided by d_sae, so a coefficient means the same
        at every width. Weighting by the decoder norm makes it invariant to trading scale
        between f_j and W_dec[j] (otherwise the SAE can shrink f and grow W_dec to dodge
        it); the unweighted form needs unit_norm_decoder=True for the same reason.
    auxk_coefficient, k_aux: AuxK for TopK family (0 disables; k_aux None = d_in // 2).
    dead_tokens: a latent is dead after this many tokens without firing.
    unit_norm_decoder: None = on for TopK family and unweighted L1 (keep decoder rows unit-norm, with the
        gradient's parallel component removed).
    init: "tied" (random unit decoder rows, W_enc = W_decᵀ) or "data" (a data_init_fraction
        of decoder rows from activation samples, then tied). b_dec_init: "geometric_median",
        "mean" or "zeros", from init_sample_rows rows of the data.
    nonfinite: "raise" (stop with an error naming the batch) or "skip" (drop the batch and
        count it in the log's skipped_batches) for a batch holding NaN/inf.
    checkpoint_every: steps between checkpoints (0: only at the end); keep_checkpoints: how
        many to keep.
    """

    sae: SAEConfig | dict
    steps: int = 1000
    batch_size: int = 4096
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    optimizer: str = "adam"
    sparse_backward: bool | None = None
    row_sparse_catch_up: bool = True
    warmup_steps: int = 0
    decay: str = "linear"
    decay_start: float = 0.8
    final_lr_fraction: float = 0.0
    sparsity_warmup_steps: int = 0
    l1_decoder_norm: bool = True
    auxk_coefficient: float = 1 / 32
    k_aux: int | None = None
    dead_tokens: int = 10_000_000
    dense_threshold: float = 0.1
    unit_norm_decoder: bool | None = None
    init: str = "tied"
    data_init_fraction: float = 1.0
    b_dec_init: str = "geometric_median"
    init_sample_rows: int = 4096
    nonfinite: str = "raise"
    log_every: int = 100
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    out_dir: str = "runs/sae"
    seed: int = 0
    progress: bool = True
    console: bool = True
    plot: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.sae, dict):
            self.sae = SAEConfig.from_dict(self.sae)
        self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> None:
        arch = self.sae.architecture
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.optimizer in ("adam", "row_sparse_adam"),
             f"optimizer {self.optimizer!r} is unknown: use 'adam' or 'row_sparse_adam'"),
            (self.decay in DECAY_SHAPES, f"decay {self.decay!r} is unknown: use one of {', '.join(DECAY_SHAPES)}"),
            (self.init in ("tied", "data"), f"init {self.init!r} is unknown: use 'tied' or 'data'"),
            (self.b_dec_init in ("geometric_median", "mean", "zeros"),
             f"b_dec_init {self.b_dec_init!r} is unknown: use 'geometric_median', 'mean' or 'zeros'"),
            (self.nonfinite in ("raise", "skip"), f"nonfinite {self.nonfinite!r} is unknown: use 'raise' or 'skip'"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if self.optimizer == "row_sparse_adam":
            if arch not in TOPK_FAMILY:
                raise ConfigError(
                    f"row_sparse_adam needs row-sparse gradients, which only the TopK family has; "
                    f"architecture {arch!r} trains with optimizer='adam'"
                )
            if self.sparse_backward is False:
                raise ConfigError("row_sparse_adam needs sparse_backward=True (or None)")
        if self.sparse_backward and arch not in TOPK_FAMILY:
            raise ConfigError(f"sparse_backward is for topk/batchtopk, not {arch!r}")

    @property
    def use_sparse_backward(self) -> bool:
        return self.sae.architecture in TOPK_FAMILY and self.sparse_backward is not False

    @property
    def use_unit_norm_decoder(self) -> bool:
        if self.unit_norm_decoder is None:
            return self.sae.architecture in TOPK_FAMILY or not self.l1_decoder_norm
        return self.unit_norm_decoder

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sae"] = self.sae.to_dict()
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}: known ones are {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class TrainResult:
    out_dir: Path
    final_dir: Path | None
    log_path: Path
    plot_path: Path | None
    last_checkpoint: Path | None
    steps: int
    tokens: int
    skipped_batches: int
    last_metrics: dict | None
    final_sharded_dir: Path | None = None


def _step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _is_complete(ckpt: Path) -> bool:
    """Weights (single-process or sharded) and at least one trainer state."""
    weights = all((ckpt / n).is_file() for n in ("cfg.json", "sae_weights.safetensors")) or \
        is_sharded_checkpoint(ckpt)
    return weights and any(ckpt.glob("trainer_state*.pt"))


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    d = Path(out_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith("step_") and _is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint LATEST names, or (if that is missing or incomplete) the newest complete one."""
    d = Path(out_dir) / "checkpoints"
    latest = d / LATEST_NAME
    if latest.is_file():
        cand = d / latest.read_text(encoding="utf-8").strip()
        if cand.is_dir() and _is_complete(cand):
            return cand
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


class Trainer:
    """Train an SAE on an activation source: `Trainer(cfg, data).fit()` or
    `Trainer.resume(out_dir, data).fit()`.

    On one process the SAE is an ordinary module (cfg.sae.architecture's class). Under
    torchrun, pass the layout (`fastsae.distributed.init_distributed(shards=...)`) and call the
    same code on every rank: with shards > 1 the SAE is this rank's ShardedSAE slice, with
    replicas > 1 each replica reads different batches and the gradients are averaged. The
    recipe (schedules, AuxK, constraints, optimizers, tracking) is the same in every layout;
    only rank 0 logs, shows progress and writes the shared files.
    """

    consolidate_max_bytes = CONSOLIDATE_MAX_BYTES

    def __init__(self, cfg: TrainConfig, data, sae: BaseSAE | ShardedSAE | None = None,
                 layout: ParallelLayout | None = None):
        self.cfg = cfg
        if layout is None:
            layout = sae.layout if isinstance(sae, ShardedSAE) else single_process_layout()
        self.layout = layout
        self.is_main = layout.is_main
        self.source: ActivationSource = as_source(data, cfg.batch_size, seed=cfg.seed)
        d_in = cfg.sae.d_in
        if self.source.d_in is not None and self.source.d_in != d_in:
            raise InputError(
                f"the activations have dimension {self.source.d_in}, but the SAE config has d_in={d_in}: "
                f"set d_in={self.source.d_in} or point at the right activations"
            )
        self.out_dir = Path(cfg.out_dir)
        self.step = 0
        self.tokens = 0
        self._resumed = False  # set by resume(): keep the log and config already in out_dir
        if sae is None:
            sae = self._build_sae()
            self._init_from_data(sae)
        elif layout.shards > 1 and not isinstance(sae, ShardedSAE):
            sae = ShardedSAE.from_full(sae, layout)  # every rank passed the same whole SAE
        broadcast_parameters(sae, layout)  # replicas start identical, whatever each one read
        sae.l1_decoder_norm = cfg.l1_decoder_norm
        self.sae = sae
        self.sharded = isinstance(sae, ShardedSAE)
        self.k_aux = cfg.k_aux if cfg.k_aux is not None else max(1, d_in // 2)
        if cfg.optimizer == "row_sparse_adam":
            self.opt = RowSparseAdam(_latents_view(sae), cfg.lr, cfg.betas, cfg.eps,
                                     unit_norm_decoder=cfg.use_unit_norm_decoder, catch_up=cfg.row_sparse_catch_up)
        else:
            self.opt = DenseAdam(dict(sae.named_parameters()), cfg.lr, cfg.betas, cfg.eps,
                                 unit_norm_rows=("W_dec",) if cfg.use_unit_norm_decoder else ())
        self.log_path = self.out_dir / "log.jsonl"
        self.tracker = Tracker(cfg.sae.d_sae, sae.device, self.log_path if self.is_main else None, cfg.log_every,
                               cfg.dead_tokens, cfg.dense_threshold,
                               console=tqdm.write if (cfg.console and self.is_main) else None)
        self.last_checkpoint: Path | None = None

    # ------------------------------------------------------------------ init
    def _build_sae(self) -> BaseSAE | ShardedSAE:
        if self.layout.shards > 1:  # each rank draws only its own slice
            return ShardedSAE(self.cfg.sae, self.layout, seed=self.cfg.seed)
        torch.manual_seed(self.cfg.seed)
        return build_sae(self.cfg.sae)

    def _init_from_data(self, sae: BaseSAE | ShardedSAE) -> None:
        cfg = self.cfg
        if cfg.b_dec_init == "zeros" and cfg.init == "tied":
            return
        sample = self.source.sample(cfg.init_sample_rows).to(sae.device)
        if not self._check_batch(sample, "the initialisation sample", sae.device):
            sample = sample[torch.isfinite(sample).all(1)]  # nonfinite="skip": use the clean rows
            if sample.shape[0] == 0:
                raise InputError("every row of the initialisation sample holds NaN/inf: clean the activations")
        sample = sae._normalize_input(sample.float())[0]  # init in the space the SAE encodes
        init_b_dec_(sae, sample, cfg.b_dec_init)
        if cfg.init == "data":  # each shard draws its own latents' atoms
            gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * self.layout.shard)
            init_from_data_(_latents_view(sae), sample, cfg.data_init_fraction, generator=gen)
        # the unit-norm constraint holds from step 0
        if cfg.use_unit_norm_decoder:
            normalize_rows_(sae.W_dec)

    # ------------------------------------------------------------------ checks
    def _agree(self, *flags: bool, device=None) -> list[bool]:
        """Each flag AND-ed over every rank: all ranks take the same branch."""
        return all_ranks_agree(list(flags), self.layout, device if device is not None else self.sae.device)

    def _check_batch(self, x: torch.Tensor, where: str, device=None) -> bool:
        """True if x is usable (on every rank); raises on a wrong dimension; on NaN/inf raises
        or returns False."""
        if x.shape[-1] != self.cfg.sae.d_in:
            raise InputError(
                f"{where} has activation dimension {x.shape[-1]} (shape {tuple(x.shape)}), but the SAE has "
                f"d_in={self.cfg.sae.d_in}: train on the hook point the SAE was built for"
            )
        bad = int((~torch.isfinite(x)).sum())
        if self._agree(bad == 0, device=device)[0]:
            return True
        if self.cfg.nonfinite == "raise":
            what = f"contains {bad} NaN/inf value(s) out of {x.numel()}" if bad else \
                "holds NaN/inf on another replica"
            raise InputError(
                f"{where} {what}: clean the activations, or set nonfinite='skip' to drop such batches (they "
                "are counted in the log as skipped_batches)"
            )
        return False

    # ------------------------------------------------------------------ one step
    def _x_in(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.sae.b_dec.detach() if self.sae.cfg.apply_b_dec_to_input else x

    def _auxk(self, x: torch.Tensor, residual: torch.Tensor):
        """AuxK's forward: (loss, latent ids, their leaf parameter copies), or (0, None, None)."""
        if self.cfg.sae.architecture not in TOPK_FAMILY or self.cfg.auxk_coefficient <= 0:
            return torch.zeros(()), None, None
        dead = self.tracker.dead_latents()  # the same on every rank
        if dead.numel() == 0:
            return torch.zeros(()), None, None
        loss, u, leaves = self.sae.auxk_loss(self._x_in(x), residual, dead, self.k_aux,
                                             min(dead.numel() / self.k_aux, 1.0))
        return self.cfg.auxk_coefficient * loss, u, leaves

    def _auxk_grads(self, aux: torch.Tensor, u, leaves) -> RowSparseGrads | None:
        if u is None:
            return None
        if aux.requires_grad:  # False on a shard none of whose latents AuxK picked
            aux.backward()
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
        return RowSparseGrads(u, *grads, _latents_view(self.sae).d_sae)

    def _sparse_step(self, x: torch.Tensor, sf: float):
        sae = self.sae
        with torch.no_grad():
            x = sae._normalize_input(x)[0]  # losses in normalised space, as training_forward
            sel = sae.select(x, train=True)
            x_hat = sae._decode_selection(sel)
            err = x_hat.float() - x.float()
            mse = err.pow(2).sum(-1).mean()
            fvu = err.pow(2).sum() / total_variance(x)
        aux, u, leaves = self._auxk(x, -err)
        if not self._agree(bool(torch.isfinite(mse + aux.detach())))[0]:
            return None
        rows, db_dec = sae.sparse_backward(x, sel, (2.0 / x.shape[0]) * err)
        aux_rows = self._auxk_grads(aux, u, leaves)
        if aux_rows is not None:
            rows = merge_row_sparse(rows, aux_rows)
        rows, db_dec = reduce_row_sparse(rows, db_dec, self.layout)
        if isinstance(self.opt, RowSparseAdam):
            self.opt.step(rows, db_dec)
        else:
            self.opt.step_row_sparse(rows, db_dec)
        acts = sel.acts
        l0 = float((acts.values > 0).sum(-1).float().mean())
        scalars = {"mse": float(mse), "fvu": float(fvu), "l0": l0, "auxk": float(aux.detach()),
                   "sparsity": 0.0, "loss": float(mse) + float(aux.detach())}
        return scalars, x_hat, x, acts.indices[acts.values > 0]

    def _autograd_step(self, x: torch.Tensor, sf: float):
        sae = self.sae
        out = sae.training_forward(x)
        xn = sae._normalize_input(x)[0].detach()  # what training_forward reconstructs
        loss = out.mse + sf * out.sparsity
        aux, u, leaves = self._auxk(xn, (xn.float() - out.x_hat.float()).detach())
        if not self._agree(bool(torch.isfinite(loss.detach() + aux.detach())))[0]:
            return None
        self.opt.zero_grad()
        loss.backward()
        aux_rows = self._auxk_grads(aux, u, leaves)
        if aux_rows is not None:  # add the few AuxK latents' gradients into the dense ones
            sae.W_enc.grad.index_add_(1, u, aux_rows.W_enc)
            sae.b_enc.grad.index_add_(0, u, aux_rows.b_enc)
            sae.W_dec.grad.index_add_(0, u, aux_rows.W_dec)
        reduce_gradients(sae, self.layout)
        self.opt.step()
        self.opt.zero_grad()
        acts = out.acts
        if isinstance(acts, SparseActs):
            fired = acts.indices[acts.values > 0]
        else:
            fired = torch.nonzero(acts.detach())[:, 1]
        scalars = {"mse": float(out.mse.detach()), "fvu": float(out.fvu.detach()), "l0": float(out.l0),
                   "sparsity": float(sf * out.sparsity.detach()), "auxk": float(aux.detach()),
                   "loss": float(loss.detach()) + float(aux.detach())}
        return scalars, out.x_hat.detach(), xn, fired

    def train_step(self, x: torch.Tensor) -> dict | None:
        """One optimizer step on batch x [..., d_in] (this replica's batch; every rank calls
        it); None if the batch was skipped."""
        cfg = self.cfg
        x = x.reshape(-1, x.shape[-1])
        if not self._check_batch(x, f"batch {self.step + self.tracker.skipped_batches}"):
            self.tracker.skipped_batches += 1
            return None
        x = x.to(device=self.sae.device, dtype=self.sae.dtype)
        lr = cfg.lr * lr_factor(self.step, cfg.steps, cfg.warmup_steps, cfg.decay_start, cfg.decay,
                                cfg.final_lr_fraction)
        sf = sparsity_factor(self.step, cfg.sparsity_warmup_steps)
        self.opt.set_lr(lr)
        result = self._sparse_step(x, sf) if cfg.use_sparse_backward else self._autograd_step(x, sf)
        if result is None:  # finite input, non-finite loss: never let it reach the weights
            if cfg.nonfinite == "raise":
                raise InputError(
                    f"the loss of step {self.step} is NaN/inf although the batch is finite (the weights are "
                    "unchanged): lower lr, or check the activations' scale"
                )
            self.tracker.skipped_batches += 1
            return None
        scalars, x_hat, x_target, fired = result
        average_buffers(self.sae, self.layout)
        n_tokens = x.shape[0] * self.layout.replicas
        scalars = replica_mean(scalars, self.layout, self.sae.device)
        self.tracker.record(gather_fired(fired, self.layout), n_tokens, scalars, x_hat, x_target)
        self.step += 1
        self.tokens += n_tokens
        scalars.update(lr=lr, sparsity_factor=sf)
        return scalars

    # ------------------------------------------------------------------ loop
    def fit(self, max_steps: int | None = None) -> TrainResult:
        """Train until cfg.steps (or stop after max_steps total steps, leaving a checkpoint to
        resume from). Prints where the results went."""
        cfg, main = self.cfg, self.is_main
        stop = cfg.steps if max_steps is None else min(max_steps, cfg.steps)
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not self._resumed:
                self.log_path.unlink(missing_ok=True)
                saved = cfg.to_dict()
                if self.layout.world_size > 1:
                    saved["layout"] = self._layout_dict()
                atomic_write_text(self.out_dir / "train_config.json", json.dumps(saved, indent=2) + "\n")
        batches = replica_batches(self.source, self.layout, self.sae.device, self.sae.dtype)
        saved_at = -1
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training", unit="step",
                   disable=not (cfg.progress and main))
        try:
            while self.step < stop:
                x = next(batches, None)
                if x is None:
                    if main:
                        tqdm.write(f"the activation source ran out after {self.step} steps (asked for {cfg.steps})")
                    break
                scalars = self.train_step(x)
                if scalars is None:
                    continue
                bar.update(1)
                self.tracker.maybe_log(self.step, self.tokens, {"lr": scalars["lr"]})
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                    saved_at = self.step
        finally:
            bar.close()
        finished = self.step >= cfg.steps or max_steps is None
        if finished:
            self.tracker.flush(self.step, self.tokens)
            if isinstance(self.opt, RowSparseAdam):
                self.opt.flush()  # the final weights include every latent's pending momentum
        if saved_at != self.step:
            self.save_checkpoint()
        final_dir = sharded_dir = plot_path = None
        if finished:
            final_dir, sharded_dir = self._save_final()
            if main and cfg.plot:
                plot_path = plot_curves(self.log_path, self.out_dir / "curves.png")
        result = TrainResult(self.out_dir, final_dir, self.log_path, plot_path, self.last_checkpoint, self.step,
                             self.tokens, self.tracker.skipped_batches,
                             self.tracker.history[-1] if self.tracker.history else None, sharded_dir)
        if main and cfg.console:
            where = (f"final SAE in {final_dir or sharded_dir}" if finished
                     else f"checkpoint in {self.last_checkpoint}")
            on = (f" on {self.layout.replicas} replica(s) x {self.layout.shards} shard(s)"
                  if self.layout.world_size > 1 else "")
            print(f"fastsae: {self.step} steps, {self.tokens} tokens{on}; {where}; log {self.log_path}"
                  + (f"; curves {plot_path}" if plot_path else ""))
        return result

    def _save_final(self) -> tuple[Path | None, Path | None]:
        """(final/: the single-process format every loader and converter reads, final_sharded/
        for a sharded SAE). A sharded SAE is consolidated into final/ only while it is under
        consolidate_max_bytes; beyond that, load final_sharded/ with load_sharded / load_full."""
        final = self.out_dir / "final"
        if not self.sharded:
            if self.is_main:
                save_sae(self.sae, final)
            self._barrier("barrier after writing the final SAE")
            return final, None
        sharded = save_sharded(self.sae, self.out_dir / "final_sharded")
        size = self.cfg.sae.d_sae * (2 * self.cfg.sae.d_in + 1) * self.sae.W_enc.element_size()
        if size > self.consolidate_max_bytes:
            if self.is_main:
                print(f"fastsae: the SAE is {size / 2**30:.1f} GiB, so final/ was not consolidated into one "
                      f"file; load {sharded} with fastsae.load or fastsae.distributed.load_sharded")
            return None, sharded
        if self.is_main:
            consolidate(sharded, final)
        self._barrier("barrier after consolidating the final SAE")
        return final, sharded

    # ------------------------------------------------------------------ checkpoints
    def _layout_dict(self) -> dict:
        return {"replicas": self.layout.replicas, "shards": self.layout.shards}

    def _state(self) -> dict:
        return {
            "format": 1, "step": self.step, "tokens": self.tokens, "layout": self._layout_dict(),
            "optimizer": self.opt.state_dict(), "tracker": self.tracker.state_dict(),
            "source": self.source.state_dict(), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def _barrier(self, what: str) -> None:
        if self.layout.world_size > 1:
            checked(what, torch.distributed.barrier)

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step_N atomically (built in a temporary directory, then renamed by
        rank 0 once every rank has written its part), point LATEST at it and prune to
        keep_checkpoints. A failed write leaves the previous checkpoint and LATEST as they were.
        Every rank calls it."""
        root = self.out_dir / "checkpoints"
        name = _step_dir_name(self.step)
        final, tmp = root / name, root / f".tmp-{name}"
        try:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self._barrier("barrier before writing a checkpoint")
            if self.sharded:
                save_sharded(self.sae, tmp)
            elif self.is_main:  # replicas hold identical copies: one writes
                save_sae(self.sae, tmp)
            state = self._state()
            atomic_write(tmp / state_file_name(self.layout), lambda p: torch.save(state, p))
            self._barrier("barrier after writing the trainer states")
            if self.is_main:
                if final.exists():  # re-saving the same step: move the old one aside first
                    trash = root / f".old-{name}"
                    os.replace(final, trash)
                    shutil.rmtree(trash, ignore_errors=True)
                os.replace(tmp, final)
                fsync_dir(root)
                atomic_write_text(root / LATEST_NAME, name + "\n")
        except DistributedError:
            raise
        except Exception as e:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            prev = latest_checkpoint(self.out_dir)
            raise CheckpointError(
                f"writing checkpoint {final} failed ({type(e).__name__}: {e}); "
                + (f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists")
                + ": free disk space or fix permissions, then resume"
            ) from e
        self._barrier("barrier after publishing a checkpoint")
        self.last_checkpoint = final
        if self.is_main:
            for old in list_checkpoints(self.out_dir)[:-self.cfg.keep_checkpoints]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        return final

    @classmethod
    def resume(cls, out_dir: str | Path, data, checkpoint: str | Path | None = None,
               layout: ParallelLayout | None = None, **overrides) -> Trainer:
        """Continue the run in out_dir from its latest checkpoint (or `checkpoint`). `data`
        must be the same activations; overrides change TrainConfig fields (e.g. steps=...).
        A distributed run resumes with the replicas x shards layout it was saved with (the
        optimizer state is per shard); its weights alone load into any layout."""
        out_dir = Path(out_dir)
        layout = layout if layout is not None else single_process_layout()
        cfg_path = out_dir / "train_config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{out_dir} is not a training run: it has no train_config.json")
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
        raw.pop("layout", None)
        cfg = TrainConfig.from_dict(raw).replace(out_dir=str(out_dir), **overrides)
        ckpt = Path(checkpoint) if checkpoint is not None else latest_checkpoint(out_dir)
        if ckpt is None or not _is_complete(ckpt):
            raise CheckpointError(f"no complete checkpoint to resume from in {out_dir / 'checkpoints'}")
        state = _read_state(ckpt, layout)
        saved = state.get("layout", {"replicas": 1, "shards": 1})
        if saved != {"replicas": layout.replicas, "shards": layout.shards}:
            raise ConfigError(
                f"{ckpt} was saved by {saved['replicas']} replica(s) x {saved['shards']} shard(s), this job is "
                f"{layout.replicas} x {layout.shards}: resume with the same layout (the optimizer state is per "
                "shard); the weights alone load into any layout with fastsae.load / load_sharded")
        sae = load_sharded(ckpt, layout) if is_sharded_checkpoint(ckpt) else load_sae(ckpt)
        trainer = cls(cfg, data, sae=sae, layout=layout)
        trainer._resumed = True
        trainer._load_state(state)
        trainer.last_checkpoint = ckpt
        if trainer.is_main:  # drop log lines written after the checkpoint, so the log reads as one run
            kept = [r for r in read_log(trainer.log_path) if r["step"] <= trainer.step]
            atomic_write_text(trainer.log_path, "".join(json.dumps(r) + "\n" for r in kept))
            trainer.tracker.history = kept
        return trainer

    def _load_state(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        self.opt.load_state_dict(state["optimizer"])
        self.tracker.load_state_dict(state["tracker"])
        self.source.load_state_dict(state["source"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])


def _latents_view(sae: BaseSAE | ShardedSAE):
    """The SAE as the latent-indexed helpers (RowSparseAdam, init_from_data_) see it: a
    shard's own latents, numbered from 0."""
    return sae.local_view() if isinstance(sae, ShardedSAE) else sae


def state_file_name(layout: ParallelLayout) -> str:
    """trainer_state.pt on one process; one trainer_state.rankR.pt per rank otherwise."""
    return STATE_NAME if layout.world_size == 1 else STATE_PATTERN.format(rank=layout.rank)


def _read_state(ckpt: Path, layout: ParallelLayout) -> dict:
    path = ckpt / state_file_name(layout)
    if not path.is_file():
        written = sorted(ckpt.glob("trainer_state*.pt"))
        if not written:
            raise CheckpointError(f"{path} is missing: {ckpt} holds no trainer state; resume from an earlier one")
        path = written[0]  # another layout's state: read it to say which layout to resume with
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is unreadable ({e}); resume from an earlier checkpoint") from e


def train(cfg: TrainConfig, data) -> TrainResult:
    """Train from scratch: `fastsae.trainer.train(TrainConfig(sae=SAEConfig(...)), activations)`."""
    return Trainer(cfg, data).fit()
