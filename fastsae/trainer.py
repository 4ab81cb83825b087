"""Training loop for every architecture: schedules, AuxK, constraints, tracking, checkpoints.

Two step paths:
* sparse (TopK / BatchTopK, the default for them): encode and decode without autograd, then
  the whole backward through ops "topk_sae_backward"(row_sparse=True), which returns
  gradients for the latents that fired only. Nothing [B, d_sae]-shaped is built here, so
  memory is set by the encode op (the native backends stream the top-k). The gradients
  feed RowSparseAdam directly, or are densified for dense Adam.
* autograd (ReLU / JumpReLU, or sparse_backward=False): `sae.training_forward` + backward.

A run lives in one directory: train_config.json, log.jsonl, curves.png, checkpoints/
(step_XXXXXXXX/ with the SAE and trainer_state.pt, plus LATEST) and final/ (the SAE).
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

from . import ops
from .atomic import atomic_write, atomic_write_text, fsync_dir
from .checkpoint import load_sae, save_sae
from .config import SAEConfig
from .constraints import normalize_rows_
from .data import ActivationSource, as_source
from .errors import CheckpointError, ConfigError, InputError
from .init import init_b_dec_, init_from_data_
from .losses import auxk_loss, top_dead_latents, total_variance
from .optim import DenseAdam, RowSparseAdam, merge_row_sparse
from .sae import BaseSAE, build_sae
from .schedules import DECAY_SHAPES, lr_factor, sparsity_factor
from .sparse import RowSparseGrads, SparseActs
from .tracking import Tracker, plot_curves, read_log

TOPK_FAMILY = ("topk", "batchtopk")
STATE_NAME = "trainer_state.pt"
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
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}: known ones are {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
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


def _step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _is_complete(ckpt: Path) -> bool:
    return all((ckpt / n).is_file() for n in (STATE_NAME, "cfg.json", "sae_weights.safetensors"))


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
    """Train an SAE on an activation source. `Trainer(cfg, data).fit()` or
    `Trainer.resume(out_dir, data).fit()`."""

    def __init__(self, cfg: TrainConfig, data, sae: BaseSAE | None = None):
        self.cfg = cfg
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
        self._resumed = sae is not None
        if sae is None:
            torch.manual_seed(cfg.seed)
            sae = build_sae(cfg.sae)
            self._init_from_data(sae)
        self.sae = sae
        self.k_aux = cfg.k_aux if cfg.k_aux is not None else max(1, d_in // 2)
        if cfg.optimizer == "row_sparse_adam":
            self.opt = RowSparseAdam(sae, cfg.lr, cfg.betas, cfg.eps, unit_norm_decoder=cfg.use_unit_norm_decoder,
                                     catch_up=cfg.row_sparse_catch_up)
        else:
            self.opt = DenseAdam(dict(sae.named_parameters()), cfg.lr, cfg.betas, cfg.eps,
                                 unit_norm_rows=("W_dec",) if cfg.use_unit_norm_decoder else ())
        self.log_path = self.out_dir / "log.jsonl"
        self.tracker = Tracker(cfg.sae.d_sae, sae.device, self.log_path, cfg.log_every, cfg.dead_tokens,
                               cfg.dense_threshold, console=tqdm.write if cfg.console else None)
        self.last_checkpoint: Path | None = None

    # ------------------------------------------------------------------ init
    def _init_from_data(self, sae: BaseSAE) -> None:
        cfg = self.cfg
        if cfg.b_dec_init == "zeros" and cfg.init == "tied":
            return
        sample = self.source.sample(cfg.init_sample_rows).to(sae.device)
        if not self._check_batch(sample, "the initialisation sample"):  # nonfinite="skip": use the clean rows
            sample = sample[torch.isfinite(sample).all(1)]
            if sample.shape[0] == 0:
                raise InputError("every row of the initialisation sample holds NaN/inf: clean the activations")
        sample = sae._normalize_input(sample.float())[0]  # init in the space the SAE encodes
        init_b_dec_(sae, sample, cfg.b_dec_init)
        if cfg.init == "data":
            init_from_data_(sae, sample, cfg.data_init_fraction, generator=torch.Generator().manual_seed(cfg.seed))
        # the unit-norm constraint holds from step 0
        if cfg.use_unit_norm_decoder:
            normalize_rows_(sae.W_dec)

    # ------------------------------------------------------------------ checks
    def _check_batch(self, x: torch.Tensor, where: str) -> bool:
        """True if x is usable; raises on a wrong dimension; on NaN/inf raises or returns False."""
        if x.shape[-1] != self.cfg.sae.d_in:
            raise InputError(
                f"{where} has activation dimension {x.shape[-1]} (shape {tuple(x.shape)}), but the SAE has "
                f"d_in={self.cfg.sae.d_in}: train on the hook point the SAE was built for"
            )
        if bool(torch.isfinite(x).all()):
            return True
        bad = int((~torch.isfinite(x)).sum())
        if self.cfg.nonfinite == "raise":
            raise InputError(
                f"{where} contains {bad} NaN/inf value(s) out of {x.numel()}: clean the activations, or set "
                "nonfinite='skip' to drop such batches (they are counted in the log as skipped_batches)"
            )
        return False

    # ------------------------------------------------------------------ one step
    def _aux_indices(self, x_in: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        if self.cfg.sae.architecture not in TOPK_FAMILY or self.cfg.auxk_coefficient <= 0:
            return None, 0.0
        dead = self.tracker.dead_latents()
        if dead.numel() == 0:
            return None, 0.0
        idx = top_dead_latents(x_in, self.sae.W_enc.detach(), self.sae.b_enc.detach(), dead, self.k_aux,
                               topk_encode=self.sae._op("topk_encode"))
        return idx, min(dead.numel() / self.k_aux, 1.0)

    def _x_in(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.sae.b_dec.detach() if self.sae.cfg.apply_b_dec_to_input else x

    def _sparse_step(self, x: torch.Tensor, sf: float):
        sae = self.sae
        with torch.no_grad():
            x = sae._normalize_input(x)[0]  # losses in normalised space, as training_forward
            acts: SparseActs = sae._encode_2d(x, train=True)
            x_hat = sae.decode(acts)
            err = x_hat.float() - x.float()
            mse = err.pow(2).sum(-1).mean()
            fvu = err.pow(2).sum() / total_variance(x)
            if not bool(torch.isfinite(mse)):
                return None
            grad_out = (2.0 / x.shape[0]) * err
            backward = ops.get("topk_sae_backward", sae.backend)
            g = backward(x, acts.values, acts.indices, grad_out.to(sae.dtype), sae.W_enc, sae.W_dec,
                         sae._input_b_dec(), row_sparse=True)
        rows: RowSparseGrads = g["rows"]
        aux = torch.zeros(())
        idx, scale = self._aux_indices(self._x_in(x))
        if idx is not None:
            u, local = torch.unique(idx, return_inverse=True)
            We = sae.W_enc.detach()[:, u].requires_grad_()
            be = sae.b_enc.detach()[u].requires_grad_()
            Wd = sae.W_dec.detach()[u].requires_grad_()
            aux = self.cfg.auxk_coefficient * auxk_loss(self._x_in(x), -err, local, We, be, Wd, scale)
            aux.backward()
            rows = merge_row_sparse(rows, RowSparseGrads(u, We.grad, be.grad, Wd.grad, sae.d_sae))
        if isinstance(self.opt, RowSparseAdam):
            self.opt.step(rows, g["db_dec"])
        else:
            dense = rows.to_dense()
            sae.W_enc.grad, sae.b_enc.grad, sae.W_dec.grad = dense["dW_enc"], dense["db_enc"], dense["dW_dec"]
            sae.b_dec.grad = g["db_dec"].to(sae.b_dec.dtype)
            self.opt.step()
            self.opt.zero_grad()
        fired = acts.indices[acts.values > 0]
        l0 = float((acts.values > 0).sum(-1).float().mean())
        scalars = {"mse": float(mse), "fvu": float(fvu), "l0": l0, "auxk": float(aux.detach()),
                   "sparsity": 0.0, "loss": float(mse) + float(aux.detach())}
        return scalars, x_hat, x, fired

    def _autograd_step(self, x: torch.Tensor, sf: float):
        sae = self.sae
        out = sae.training_forward(x)
        xn = sae._normalize_input(x)[0].detach()  # what training_forward reconstructs
        sparsity = out.sparsity
        if sae.cfg.architecture == "standard" and not self.cfg.l1_decoder_norm:
            sparsity = sae.cfg.l1_coefficient * out.acts.abs().sum(-1).mean().float()
        loss = out.mse + sf * sparsity
        aux = torch.zeros(())
        idx, scale = self._aux_indices(self._x_in(xn))
        if idx is not None:
            residual = (xn.float() - out.x_hat.float()).detach()
            aux = self.cfg.auxk_coefficient * auxk_loss(self._x_in(xn), residual, idx,
                                                        sae.W_enc, sae.b_enc, sae.W_dec, scale)
            loss = loss + aux
        if not bool(torch.isfinite(loss)):
            return None
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        acts = out.acts
        if isinstance(acts, SparseActs):
            fired = acts.indices[acts.values > 0]
        else:
            fired = torch.nonzero(acts.detach())[:, 1]
        scalars = {"mse": float(out.mse.detach()), "fvu": float(out.fvu.detach()), "l0": float(out.l0),
                   "sparsity": float(sf * sparsity.detach()), "auxk": float(aux.detach()),
                   "loss": float(loss.detach())}
        return scalars, out.x_hat.detach(), xn, fired

    def train_step(self, x: torch.Tensor) -> dict | None:
        """One optimizer step on batch x [..., d_in]; None if the batch was skipped."""
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
        self.tracker.record(fired, x.shape[0], scalars, x_hat, x_target)
        self.step += 1
        self.tokens += x.shape[0]
        scalars.update(lr=lr, sparsity_factor=sf)
        return scalars

    # ------------------------------------------------------------------ loop
    def fit(self, max_steps: int | None = None) -> TrainResult:
        """Train until cfg.steps (or stop after max_steps total steps, leaving a checkpoint to
        resume from). Prints where the results went."""
        cfg = self.cfg
        stop = cfg.steps if max_steps is None else min(max_steps, cfg.steps)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self._resumed:
            if self.log_path.exists():
                self.log_path.unlink()
            atomic_write_text(self.out_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        batches = iter(self.source)
        saved_at = -1
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training", unit="step", disable=not cfg.progress)
        try:
            while self.step < stop:
                try:
                    x = next(batches)
                except StopIteration:
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
        final_dir = plot_path = None
        if finished:
            final_dir = self.out_dir / "final"
            save_sae(self.sae, final_dir)
            if cfg.plot:
                plot_path = plot_curves(self.log_path, self.out_dir / "curves.png")
        result = TrainResult(self.out_dir, final_dir, self.log_path, plot_path, self.last_checkpoint, self.step,
                             self.tokens, self.tracker.skipped_batches,
                             self.tracker.history[-1] if self.tracker.history else None)
        if cfg.console:
            where = f"final SAE in {final_dir}" if final_dir else f"checkpoint in {self.last_checkpoint}"
            print(f"fastsae: {self.step} steps, {self.tokens} tokens; {where}; log {self.log_path}"
                  + (f"; curves {plot_path}" if plot_path else ""))
        return result

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {
            "format": 1, "step": self.step, "tokens": self.tokens,
            "optimizer": self.opt.state_dict(), "tracker": self.tracker.state_dict(),
            "source": self.source.state_dict(), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step_N atomically (built in a temporary directory, then renamed),
        point LATEST at it and prune to keep_checkpoints. A failed write leaves the previous
        checkpoint and LATEST as they were."""
        root = self.out_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        name = _step_dir_name(self.step)
        final = root / name
        tmp = root / f".tmp-{name}-{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            save_sae(self.sae, tmp)
            state = self._state()
            atomic_write(tmp / STATE_NAME, lambda p: torch.save(state, p))
            if final.exists():  # re-saving the same step: move the old one aside first
                trash = root / f".old-{name}-{os.getpid()}"
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(root)
            atomic_write_text(root / LATEST_NAME, name + "\n")
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            prev = latest_checkpoint(self.out_dir)
            raise CheckpointError(
                f"writing checkpoint {final} failed ({type(e).__name__}: {e}); "
                + (f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists")
                + ": free disk space or fix permissions, then resume"
            ) from e
        self.last_checkpoint = final
        for old in list_checkpoints(self.out_dir)[:-self.cfg.keep_checkpoints]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    @classmethod
    def resume(cls, out_dir: str | Path, data, checkpoint: str | Path | None = None, **overrides) -> "Trainer":
        """Continue the run in out_dir from its latest checkpoint (or `checkpoint`). `data`
        must be the same activations; overrides change TrainConfig fields (e.g. steps=...)."""
        out_dir = Path(out_dir)
        cfg_path = out_dir / "train_config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{out_dir} is not a training run: it has no train_config.json")
        cfg = TrainConfig.from_dict(json.loads(cfg_path.read_text(encoding="utf-8")))
        cfg = cfg.replace(out_dir=str(out_dir), **overrides)
        ckpt = Path(checkpoint) if checkpoint is not None else latest_checkpoint(out_dir)
        if ckpt is None or not _is_complete(ckpt):
            raise CheckpointError(f"no complete checkpoint to resume from in {out_dir / 'checkpoints'}")
        sae = load_sae(ckpt)
        trainer = cls(cfg, data, sae=sae)
        try:
            state = torch.load(ckpt / STATE_NAME, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{ckpt / STATE_NAME} is unreadable ({e}); resume from an earlier checkpoint") from e
        trainer._load_state(state)
        trainer.last_checkpoint = ckpt
        # drop log lines written after the checkpoint, so the log reads as one run
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


def train(cfg: TrainConfig, data) -> TrainResult:
    """Train from scratch: `fastsae.trainer.train(TrainConfig(sae=SAEConfig(...)), activations)`."""
    return Trainer(cfg, data).fit()
