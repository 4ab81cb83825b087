"""The training loop for every architecture: schedules, AuxK, constraints, tracking, checkpoints.

Two step paths:
* sparse (the architectures with `takes_sparse_path`, TopK / BatchTopK, by default): select
  and decode without autograd, then the whole backward through ops "topk_sae_backward"
  (row_sparse=True), which returns gradients for the latents that fired only. Nothing
  [B, d_sae]-shaped is built here, so memory is set by the encode op (the native backends
  stream the top-k). The gradients feed RowSparseAdam, or dense Adam's step_row_sparse.
* autograd (the others, or sparse_backward=False): `sae.training_forward` + backward.

A transcoder (cfg.sae.transcoder) trains on paired activations: each batch row holds its
input and its target side by side (fastsae.data.PairedSource), split here.

The loop reaches the SAE only through its public protocol (see fastsae.sae) and the process
layout only through one parallel context (fastsae.parallel): the same code trains one process
or, given a fastsae.distributed layout, a torchrun job of replicas x shards. A single-process
run loads nothing of fastsae.distributed. The run's files are fastsae.run_dir's.

The recipe, the same for every architecture: dead latents are those that have not fired for
`cfg.dead_window()` tokens (relative to the run by default); AuxK revives them in the sparse
architectures and, where AuxK cannot (a dead ReLU has no gradient), they are resampled
(`cfg.use_resampling`); the lr decays linearly over the last 10 % of the steps; an optional
fine-tuning stage (`cfg.finetune_steps`) refits the decoder without the penalty to undo
shrinkage.

`Trainer.resume(out_dir, source)` continues a run: same data position, optimizer state,
tracker state and RNG, so on CPU the loss curve after a resume equals the uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import RESUMABLE, TrainConfig
from .constraints import normalize_rows_
from .data import ActivationSource, as_source, fingerprint_changes
from .errors import ConfigError, InputError
from .init import geometric_median, init_b_dec_, init_from_data_, resample_latents_
from .malloc import keep_freed_memory
from .metrics import fired_latents
from .optim import DenseAdam, RowSparseAdam, build_optimizer, merge_row_sparse
from .parallel import LOCAL, ParallelContext
from .run_dir import CONSOLIDATE_MAX_BYTES, RunDir, latest_checkpoint, list_checkpoints
from .sae import BaseSAE, build_sae, reconstruction_terms
from .schedules import lr_factor, sparsity_factor
from .sparse import RowSparseGrads
from .tracking import Tracker, plot_curves


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


class Trainer:
    """Train an SAE on an activation source: `Trainer(cfg, data).fit()` or
    `Trainer.resume(out_dir, data).fit()`.

    On one process the SAE is an ordinary module (cfg.sae.architecture's class). Under
    torchrun, pass the layout (`fastsae.distributed.init_distributed(shards=...)`) and call the
    same code on every rank: with shards > 1 the SAE is this rank's slice, with replicas > 1
    each replica reads different batches and the gradients are averaged. The recipe
    (schedules, AuxK, constraints, optimizers, tracking) is the same in every layout; only
    rank 0 logs, shows progress and writes the shared files.
    """

    consolidate_max_bytes = CONSOLIDATE_MAX_BYTES

    def __init__(self, cfg: TrainConfig, data, sae: BaseSAE | None = None, layout: ParallelContext | None = None,
                 initialise: bool | None = None):
        """initialise: apply cfg's data-dependent init (b_dec_init, init) to the SAE; None = only
        to an SAE built here (a given SAE is trained as it is, e.g. one being resumed)."""
        self.cfg = cfg
        keep_freed_memory()  # a step's buffers stay in the process (fastsae.malloc)
        if layout is None:
            layout = sae.context if sae is not None else LOCAL
        self.layout = layout
        self.is_main = layout.is_main
        self.run = RunDir(cfg.out_dir, layout)
        self.source: ActivationSource = as_source(data, cfg.batch_size, seed=cfg.seed)
        d_in = cfg.sae.d_in
        # a transcoder's rows are [input | target]
        self.row_width = d_in + cfg.sae.output_dim if cfg.sae.transcoder else d_in
        paired = getattr(self.source, "widths", None)
        if cfg.sae.transcoder and paired != (d_in, cfg.sae.output_dim):
            raise InputError(
                f"a transcoder trains on paired activations: pass fastsae.data.PairedSource(inputs [.., {d_in}], "
                f"targets [.., {cfg.sae.output_dim}], batch_size) as the data"
                + (f" (this source pairs widths {paired})" if paired else "")
            )
        if not cfg.sae.transcoder and paired is not None:
            raise InputError("paired activations train a transcoder: build the SAE with transcoder=True "
                             "(and apply_b_dec_to_input=False)")
        if self.source.d_in is not None and self.source.d_in != self.row_width:
            raise InputError(
                f"the activations have dimension {self.source.d_in}, but the SAE config has d_in={d_in}: "
                f"set d_in={self.source.d_in} or point at the right activations"
            )
        self.step = 0
        self.tokens = 0
        self._resumed = False  # set by resume(): keep the log and config already in out_dir
        if initialise is None:
            initialise = sae is None
        if sae is None:
            sae = self._build_sae()
        elif layout.shards > 1 and not sae.sharded:
            from .distributed.sharded_sae import shard_of

            sae = shard_of(sae, layout)  # every rank passed the same whole SAE
        if initialise:
            self._init_from_data(sae)
        layout.broadcast_parameters(sae, sae.latent_dims)  # replicas start identical, whatever each read
        sae.l1_decoder_norm = cfg.l1_decoder_norm
        self.sae = sae
        self.k_aux = cfg.k_aux if cfg.k_aux is not None else max(1, sae.d_out // 2)
        # the skip connection is dense on every path: its own Adam (Adam is per parameter, so two
        # instances step as one), fed by sparse_backward's .grad on the sparse path
        dense = sae.dense_parameters()
        self.dense_params = nn.ParameterDict(dense) if dense else None
        self.dense_opt = DenseAdam(dense, cfg.lr, cfg.betas, cfg.eps) if dense else None
        self.opt = build_optimizer(sae.local_view(), name=cfg.optimizer, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                   state=cfg.optimizer_state, master=cfg.master_weights,
                                   unit_norm_decoder=cfg.use_unit_norm_decoder, catch_up=cfg.row_sparse_catch_up,
                                   seed=cfg.seed)
        self.finetune_opt: DenseAdam | None = None  # the fine-tuning stage's, from its first step
        self.finetune_gain: torch.nn.Parameter | None = None  # finetune="scale": log of each decoder row's norm
        self.resampled = 0  # latents resampled so far
        self.tracker = Tracker(cfg.sae.d_sae, sae.device, self.run.log_path if self.is_main else None,
                               cfg.log_every, cfg.dead_window(layout.replicas), cfg.dense_threshold,
                               console=tqdm.write if (cfg.console and self.is_main) else None)
        self.last_checkpoint: Path | None = None
        self._saved_at = -1  # the step of this process's last checkpoint

    @property
    def out_dir(self) -> Path:
        return self.run.path

    @property
    def log_path(self) -> Path:
        return self.run.log_path

    # ------------------------------------------------------------------ init
    def _build_sae(self) -> BaseSAE:
        if self.layout.shards > 1:  # each rank draws only its own slice
            return build_sae(self.cfg.sae, self.layout, seed=self.cfg.seed)
        torch.manual_seed(self.cfg.seed)
        return build_sae(self.cfg.sae)

    def _init_from_data(self, sae: BaseSAE) -> None:
        cfg = self.cfg
        if cfg.b_dec_init == "zeros" and cfg.init == "tied":
            return
        sample = self.source.sample(cfg.init_sample_rows).to(sae.device)
        if not self._check_batch(sample, "the initialisation sample", sae.device):
            sample = sample[torch.isfinite(sample).all(1)]  # nonfinite="skip": use the clean rows
            if sample.shape[0] == 0:
                raise InputError("every row of the initialisation sample holds NaN/inf: clean the activations")
        inputs, targets = self._split(sample)
        if targets is not None:  # a transcoder's b_dec is the target's centre
            init_b_dec_(sae, targets.float(), cfg.b_dec_init)
            return
        sample = sae.normalize_input(inputs.float())[0]  # init in the space the SAE encodes
        init_b_dec_(sae, sample, cfg.b_dec_init)
        if cfg.init in ("data", "data_decoder"):  # each shard draws its own latents' atoms
            gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * self.layout.shard)
            encoder = sae.W_enc.detach().clone() if cfg.init == "data_decoder" else None
            # atoms are samples centred at their geometric median, whatever b_dec starts at
            # (docs/init_study.md: uncentred samples start worse)
            init_from_data_(sae.local_view(), sample, cfg.data_init_fraction, generator=gen,
                            centre=geometric_median(sample))
            if encoder is not None:  # untied: the encoder keeps its random init
                with torch.no_grad():
                    sae.W_enc.copy_(encoder)
        # the unit-norm constraint holds from step 0
        if cfg.use_unit_norm_decoder:
            normalize_rows_(sae.W_dec)

    # ------------------------------------------------------------------ checks
    def _agree(self, *flags: bool, device=None) -> list[bool]:
        """Each flag AND-ed over every rank: all ranks take the same branch."""
        return self.layout.agree(list(flags), device if device is not None else self.sae.device)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input, target) of a batch's rows: a transcoder's rows are [input | target], an SAE's
        target is its input (None)."""
        if not self.cfg.sae.transcoder:
            return x, None
        return x[:, :self.cfg.sae.d_in], x[:, self.cfg.sae.d_in:]

    def _check_batch(self, x: torch.Tensor, where: str, device=None) -> bool:
        """True if x is usable (on every rank); raises on a wrong dimension; on NaN/inf raises
        or returns False."""
        if x.shape[-1] != self.row_width:
            what = (f"d_in + d_out = {self.row_width} (input and target side by side)" if self.cfg.sae.transcoder
                    else f"d_in={self.cfg.sae.d_in}")
            raise InputError(
                f"{where} has activation dimension {x.shape[-1]} (shape {tuple(x.shape)}), but the SAE has "
                f"{what}: train on the hook point the SAE was built for"
            )
        # A sum holding NaN or inf is never finite: one cheap pass for the usual clean batch.
        bad = 0 if bool(torch.isfinite(x.sum())) else int((~torch.isfinite(x)).sum())
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
    def _auxk_dead(self) -> torch.Tensor | None:
        """The dead latents AuxK revives this step (global ids, the same on every rank), or None."""
        if not self.sae.takes_sparse_path or self.cfg.auxk_coefficient <= 0:
            return None
        dead = self.tracker.dead_latents()
        return dead if dead.numel() else None

    def _auxk(self, x: torch.Tensor, err: torch.Tensor, dead: torch.Tensor | None, preacts=None):
        """AuxK on the residual -err (err = x_hat - target): (loss, its RowSparseGrads or None),
        or (0, None) when `dead` (_auxk_dead()) is None; preacts: the selection's AuxK part, if
        it has one."""
        if dead is None:
            return torch.zeros(()), None
        scale = self.cfg.auxk_coefficient * min(dead.numel() / self.k_aux, 1.0)
        return self.sae.auxk_grads(x, -err, dead, self.k_aux, scale, preacts)

    def _sparse_step(self, x: torch.Tensor, target: torch.Tensor | None, sf: float):
        sae = self.sae
        with torch.no_grad():
            x = sae.normalize_input(x)[0]  # losses in normalised space, as training_forward
            target = x if target is None else target
            dead = self._auxk_dead()
            sel, dead_preacts = sae.select_for_training(x, dead, self.k_aux)
            x_hat = sae.decode_selection(sel, x)
            err, mse, fvu = reconstruction_terms(x_hat, target)
            recon, grad_out = sae.sparse_loss(sel, x_hat, target)
        aux, aux_rows = self._auxk(x, err, dead, dead_preacts)
        if not self._agree(bool(torch.isfinite(recon + aux)))[0]:
            return None
        self.step_row_sparse(*sae.sparse_backward(x, sel, grad_out), aux_rows)
        fired, l0 = fired_latents(sel.acts)
        scalars = {"mse": float(mse), "fvu": float(fvu), "l0": l0, "auxk": float(aux),
                   "sparsity": 0.0, "loss": float(recon) + float(aux)}
        return scalars, x_hat, target, fired

    def step_row_sparse(self, rows: RowSparseGrads, db_dec: torch.Tensor, aux_rows: RowSparseGrads | None) -> None:
        """The sparse path's update: the loss's row-sparse gradients plus AuxK's (from _auxk),
        reduced over the layout, then the optimizers' steps."""
        if aux_rows is not None:
            rows = merge_row_sparse(rows, aux_rows)
        rows, db_dec = self.layout.reduce_row_sparse(rows, db_dec)
        if isinstance(self.opt, RowSparseAdam):
            self.opt.step(rows, db_dec)
        else:
            self.opt.step_row_sparse(rows, db_dec)
        self._step_dense()

    def _step_dense(self) -> None:
        """Step the dense parameters (the skip connection) from their .grad."""
        if self.dense_opt is not None:
            self.layout.reduce_gradients(self.dense_params)
            self.dense_opt.step()
            self.dense_opt.zero_grad()

    def _autograd_step(self, x: torch.Tensor, target: torch.Tensor | None, sf: float):
        sae = self.sae
        out = sae.training_forward(x, target)
        xn = sae.normalize_input(x)[0].detach()
        yn = xn if target is None else target  # what training_forward reconstructs
        loss = out.mse + out.aux + sf * out.sparsity
        aux, aux_rows = self._auxk(xn, (out.x_hat.float() - yn.float()).detach(), self._auxk_dead())
        if not self._agree(bool(torch.isfinite(loss.detach() + aux)))[0]:
            return None
        self.opt.zero_grad()
        loss.backward()
        if aux_rows is not None:  # add the few AuxK latents' gradients into the dense ones
            u = aux_rows.latents
            sae.W_enc.grad.index_add_(1, u, aux_rows.W_enc.to(sae.W_enc.grad.dtype))
            sae.b_enc.grad.index_add_(0, u, aux_rows.b_enc.to(sae.b_enc.grad.dtype))
            sae.W_dec.grad.index_add_(0, u, aux_rows.W_dec.to(sae.W_dec.grad.dtype))
        self.layout.reduce_gradients(sae)
        self.opt.step()
        self.opt.zero_grad()
        if self.dense_opt is not None:
            self.dense_opt.step()
            self.dense_opt.zero_grad()
        fired = fired_latents(out.acts)[0]
        scalars = {"mse": float(out.mse.detach()), "fvu": float(out.fvu.detach()), "l0": float(out.l0),
                   "sparsity": float(sf * out.sparsity.detach()), "auxk": float(aux.detach()),
                   "loss": float(loss.detach()) + float(aux.detach())}
        return scalars, out.x_hat.detach(), yn, fired

    def _finetune_step(self, x: torch.Tensor, lr: float):
        """The shrinkage fix (Wright & Sharkey 2024): the encoder, b_dec included, is frozen, so
        which latents fire and how strongly is fixed; the decoder is refit by MSE alone (no
        penalty, no unit-norm constraint): each row's norm only (cfg.finetune="scale", the
        directions kept) or the whole row ("decoder")."""
        sae = self.sae
        if self.finetune_opt is None:
            self._start_finetune()
        with torch.no_grad():
            x = sae.normalize_input(x)[0]
            acts = sae.encode_prepared(x)
        x_hat = sae.decode(acts)
        _, mse, fvu = reconstruction_terms(x_hat, x)
        if not self._agree(bool(torch.isfinite(mse.detach())))[0]:
            return None
        self.finetune_opt.set_lr(lr)
        self.finetune_opt.zero_grad()
        sae.zero_grad(set_to_none=True)
        mse.backward()
        self.layout.reduce_gradients(sae)
        if self.finetune_gain is not None:  # W_dec[j] = exp(s_j) · direction_j: dL/ds_j
            self.finetune_gain.grad = (sae.W_dec.grad.float() * self._finetune_dirs).sum(1) * self.finetune_gain.exp()
        self.finetune_opt.step()
        if self.finetune_gain is not None:
            with torch.no_grad():
                norms = self.finetune_gain.exp().unsqueeze(1)
                sae.W_dec.copy_((norms * self._finetune_dirs).to(sae.W_dec.dtype))
            self.finetune_gain.grad = None
        sae.zero_grad(set_to_none=True)
        fired, l0 = fired_latents(acts)
        scalars = {"mse": float(mse.detach()), "fvu": float(fvu.detach()), "l0": l0, "auxk": 0.0, "sparsity": 0.0,
                   "loss": float(mse.detach())}
        return scalars, x_hat.detach(), x, fired

    def _start_finetune(self, resumed: bool = False, gain: torch.Tensor | None = None) -> None:
        if not resumed:
            self.opt.flush()  # the main run's pending momentum lands before the decoder is refit
        lr = self.cfg.finetune_lr or self.cfg.lr
        if self.cfg.finetune == "scale":  # the log of each row's norm, so lr is a relative step
            W = self.sae.W_dec.detach().float()
            log_norm = W.norm(dim=1).clamp_min(1e-12).log() if gain is None else gain.to(W.device).float()
            self.finetune_gain = torch.nn.Parameter(log_norm.clone())
            self._finetune_dirs = W / log_norm.exp().unsqueeze(1)
            self.finetune_opt = DenseAdam({"gain": self.finetune_gain}, lr, self.cfg.betas, self.cfg.eps)
        else:
            self.finetune_opt = DenseAdam({"W_dec": self.sae.W_dec}, lr, self.cfg.betas, self.cfg.eps)

    @torch.no_grad()
    def resample_dead_latents(self) -> int:
        """Resample the dead latents (cfg.resample_dead): each gets, as decoder row, the
        normalised residual x - x̂ of an input drawn with probability ∝ its squared error, as
        encoder column the same direction at the mean norm of the live columns, a zero bias and
        fresh optimizer state (Bricken et al. 2023, with the residual in place of the input).
        The inputs are the next init_sample_rows rows of the source (its position is kept).
        Returns how many latents were resampled (over every shard)."""
        sae, cfg = self.sae, self.cfg
        dead = self.tracker.dead_latents()  # global ids, the same on every rank
        if dead.numel() == 0:
            return 0
        sample = self.source.sample(cfg.init_sample_rows).to(sae.device, sae.dtype)
        sample = sample[torch.isfinite(sample).all(1)]
        x = sae.normalize_input(sample)[0]
        residual = (x - sae.decode(sae.encode_prepared(x))).float()
        err = residual.pow(2).sum(1)
        local = dead[(dead >= sae.shard_start) & (dead < sae.shard_end)] - sae.shard_start
        if local.numel() and float(err.sum()) > 0:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step * 7919 + self.layout.shard)
            pick = torch.multinomial(err.cpu(), local.numel(), replacement=True, generator=gen).to(sae.device)
            resample_latents_(sae.local_view(), local, residual[pick])
            self.opt.reset_latents(local, sae.latent_dims)
        self.layout.broadcast_parameters(sae, sae.latent_dims)
        self.tracker.revive(dead)  # a fresh window to fire in
        self.resampled += int(dead.numel())
        return int(dead.numel())

    def train_step(self, x: torch.Tensor) -> dict | None:
        """One optimizer step on batch x [..., d_in] (this replica's batch; every rank calls
        it); None if the batch was skipped (NaN/inf with nonfinite="skip", or no rows). Past
        cfg.steps, a step of the fine-tuning stage."""
        cfg = self.cfg
        x = x.reshape(-1, x.shape[-1])
        if not self._agree(x.shape[0] > 0)[0]:  # an empty batch has nothing to learn from
            return None
        if not self._check_batch(x, f"batch {self.step + self.tracker.skipped_batches}"):
            self.tracker.skipped_batches += 1
            return None
        x, target = self._split(x.to(device=self.sae.device, dtype=self.sae.dtype))
        finetune = self.step >= cfg.steps
        if finetune:
            lr = (cfg.finetune_lr or cfg.lr) * lr_factor(self.step - cfg.steps, cfg.finetune_steps, 0, cfg.decay_start,
                                                         cfg.decay, cfg.final_lr_fraction)
            sf = 0.0
            result = self._finetune_step(x, lr)
        else:
            lr = cfg.lr * lr_factor(self.step, cfg.steps, cfg.warmup_steps, cfg.decay_start, cfg.decay,
                                    cfg.final_lr_fraction, cfg.lr_anchor)
            sf = sparsity_factor(self.step, cfg.sparsity_warmup_steps)
            self.opt.set_lr(lr)
            if self.dense_opt is not None:
                self.dense_opt.set_lr(lr)
            step = self._sparse_step if cfg.use_sparse_backward else self._autograd_step
            result = step(x, target, sf)
        if result is None:  # finite input, non-finite loss: never let it reach the weights
            if cfg.nonfinite == "raise":
                raise InputError(
                    f"the loss of step {self.step} is NaN/inf although the batch is finite (the weights are "
                    "unchanged): lower lr, or check the activations' scale"
                )
            self.tracker.skipped_batches += 1
            return None
        scalars, x_hat, x_target, fired = result
        self.layout.average_buffers(self.sae)
        n_tokens = x.shape[0] * self.layout.replicas
        scalars = self.layout.replica_mean(scalars, self.sae.device)
        self.tracker.record(self.layout.gather_fired(fired), n_tokens, scalars, x_hat, x_target)
        self.step += 1
        self.tokens += n_tokens
        if not finetune and self._resample_due():
            scalars["resampled"] = self.resample_dead_latents()
        scalars.update(lr=lr, sparsity_factor=sf)
        return scalars

    def _resample_due(self) -> bool:
        cfg = self.cfg
        if not cfg.use_resampling or self.step % cfg.resample_interval(self.layout.replicas):
            return False
        decay_from = max(int(cfg.decay_start * cfg.steps), cfg.warmup_steps) if cfg.decay != "constant" else cfg.steps
        return self.step < decay_from  # the last latents settle while the lr decays

    # ------------------------------------------------------------------ loop
    def fit(self, max_steps: int | None = None, callback=None) -> TrainResult:
        """Train until cfg.steps (+ cfg.finetune_steps), or stop after max_steps total steps,
        leaving a checkpoint to resume from. callback(trainer, scalars), if given, runs after
        every step; returning True ends the run there (as finished). Prints where the results
        went."""
        cfg = self.cfg
        stop = cfg.total_steps if max_steps is None else min(max_steps, cfg.total_steps)
        self.run.lock()
        try:
            self.begin()
            return self._fit(stop, max_steps, callback)
        finally:
            self.run.unlock()

    # The loop's parts, for drivers that step trainers themselves (fastsae.group steps several
    # in lockstep on one model pass; fastsae.e2e reads token batches): begin, batch_stream,
    # train_step, after_step, finish. fit() is exactly these in order.
    def begin(self) -> None:
        """Write the run's config into a fresh out_dir (a resumed run keeps its own); call with
        the run's lock held."""
        if not self._resumed:
            self.run.start(self._saved_config(), overwrite=self.cfg.overwrite)
            self._resumed = True  # a second fit() continues this run

    def batch_stream(self):
        """This rank's training batches."""
        return self.layout.batches(self.source, self.sae.device, self.sae.dtype)

    def _saved_config(self) -> dict:
        saved = self.cfg.to_dict()
        if self.layout.world_size > 1:
            saved["layout"] = self.layout.as_dict()
        return saved

    def _fit(self, stop: int, max_steps: int | None, callback) -> TrainResult:
        cfg, main = self.cfg, self.is_main
        batches = self.batch_stream()
        bar = tqdm(total=cfg.total_steps, initial=self.step, desc="training", unit="step",
                   disable=not (cfg.progress and main))
        try:
            while self.step < stop:
                x = next(batches, None)
                if x is None:
                    if main:
                        tqdm.write(f"the activation source ran out after {self.step} steps "
                                   f"(asked for {cfg.total_steps})")
                    break
                scalars = self.train_step(x)
                if scalars is None:
                    continue
                bar.update(1)
                self.after_step(scalars)
                if callback is not None and callback(self, scalars):
                    break
        finally:
            bar.close()
        return self.finish(max_steps)

    def after_step(self, scalars: dict) -> None:
        """After a step that counted: the log line (every log_every steps) and the checkpoint
        (every checkpoint_every steps)."""
        cfg = self.cfg
        self.tracker.maybe_log(self.step, self.tokens, {"lr": scalars["lr"]})
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            self.save_checkpoint()
            self._saved_at = self.step

    def finish(self, max_steps: int | None = None) -> TrainResult:
        """End fit(): the last log line, a checkpoint, and, when the run is done (cfg.steps +
        cfg.finetune_steps, or no max_steps), the final SAE and the curves."""
        cfg, main = self.cfg, self.is_main
        finished = self.step >= cfg.total_steps or max_steps is None
        if finished:
            self.tracker.flush(self.step, self.tokens)
            if self.finetune_opt is None:
                self.opt.flush()  # the final weights include every latent's pending momentum (row-sparse Adam)
        if self._saved_at != self.step:
            self.save_checkpoint()
            self._saved_at = self.step
        final_dir = sharded_dir = plot_path = None
        if finished:
            final_dir, sharded_dir = self.run.save_final(self.sae, self.consolidate_max_bytes)
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

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything but the SAE's weights that a resumed run needs."""
        return {
            "format": 1, "step": self.step, "tokens": self.tokens, "layout": self.layout.as_dict(),
            "optimizer": self.opt.state_dict(), "tracker": self.tracker.state_dict(), "resampled": self.resampled,
            "dense_optimizer": self.dense_opt.state_dict() if self.dense_opt is not None else None,
            "finetune_optimizer": self.finetune_opt.state_dict() if self.finetune_opt is not None else None,
            "finetune_gain": self.finetune_gain.detach().cpu() if self.finetune_gain is not None else None,
            "source": self.source.state_dict(), "data": self.source.fingerprint(), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        self.opt.load_state_dict(state["optimizer"])
        if self.dense_opt is not None:
            self.dense_opt.load_state_dict(state["dense_optimizer"])
        self.resampled = state.get("resampled", 0)
        if state.get("finetune_optimizer") is not None:
            self._start_finetune(resumed=True, gain=state.get("finetune_gain"))
            self.finetune_opt.load_state_dict(state["finetune_optimizer"])
        self.tracker.load_state_dict(state["tracker"])
        self.source.load_state_dict(state["source"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step_N atomically (see fastsae.run_dir); every rank calls it."""
        self.last_checkpoint = self.run.save_checkpoint(self.step, self.sae, self.state_dict(),
                                                        self.cfg.keep_checkpoints)
        return self.last_checkpoint

    @classmethod
    def resume(cls, out_dir: str | Path, data, checkpoint: str | Path | None = None,
               layout: ParallelContext | None = None, allow_new_data: bool = False, **overrides) -> Trainer:
        """Continue the run in out_dir from its latest checkpoint that reads back (or
        `checkpoint`). The saved config holds; `overrides` may change only the fields in
        fastsae.config.RESUMABLE (e.g. steps=...; changing others is refused), and the change is
        recorded in train_config.json. Extending steps after the lr decay began continues the
        decay from where it was. `data` must be the same activations (their fingerprint is checked;
        allow_new_data=True continues on other data anyway, and records it). A distributed run resumes
        with the replicas x shards layout it was saved with (the optimizer state is per shard);
        its weights alone load into any layout."""
        layout = layout if layout is not None else LOCAL
        run = RunDir(out_dir, layout)
        run.lock()
        try:
            return cls._resume(run, data, checkpoint, layout, allow_new_data, overrides)
        except BaseException:
            run.unlock()
            raise

    @classmethod
    def _resume(cls, run: RunDir, data, checkpoint, layout: ParallelContext, allow_new_data: bool,
                overrides: dict) -> Trainer:
        raw = run.read_config()
        raw.pop("layout", None)
        raw.pop("resumes", None)
        saved = TrainConfig.from_dict(raw)
        overrides = {**overrides, "out_dir": str(run.path)}
        refused = {k: v for k, v in overrides.items() if k not in RESUMABLE and _differs(getattr(saved, k, None), v)}
        if refused:
            was = ", ".join(f"{k}={getattr(saved, k, None)!r}" for k in sorted(refused))
            raise ConfigError(
                f"{run.path} was trained with {was}; a resumed run keeps them (it may change only "
                f"{', '.join(sorted(RESUMABLE))}): drop those options, or start a new run in another out_dir")
        changed = {k: v for k, v in overrides.items() if k in RESUMABLE and k != "out_dir"
                   and _differs(getattr(saved, k), v)}
        ckpt, state, sae = run.newest_readable(checkpoint)
        prev = state.get("layout", {"replicas": 1, "shards": 1})
        if prev != layout.as_dict():
            raise ConfigError(
                f"{ckpt} was saved by {prev['replicas']} replica(s) x {prev['shards']} shard(s), this job is "
                f"{layout.replicas} x {layout.shards}: resume with the same layout (the optimizer state is per "
                "shard); the weights alone load into any layout with fastsae.load / load_sharded")
        cfg = saved.replace(**{k: v for k, v in overrides.items() if k in RESUMABLE})
        step = int(state["step"])
        if cfg.total_steps < step:
            raise ConfigError(f"{ckpt} is at step {step}, past steps={cfg.steps}: ask for at least {step} steps")
        if step > saved.steps and cfg.steps != saved.steps:
            raise ConfigError(f"{ckpt} is in its fine-tuning stage (step {step}, after steps={saved.steps}): resume "
                              f"with steps={saved.steps}")
        if cfg.steps != saved.steps:  # keep the lr decay where it was, if it had begun
            f = lr_factor(step, saved.steps, saved.warmup_steps, saved.decay_start, saved.decay,
                          saved.final_lr_fraction, saved.lr_anchor)
            began = saved.lr_anchor is not None or step >= max(int(saved.decay_start * saved.steps),
                                                                saved.warmup_steps)
            if began and saved.decay != "constant":
                cfg = cfg.replace(lr_anchor=(step, f))
                changed["lr_anchor"] = [step, f]
        trainer = cls(cfg, data, sae=sae, layout=layout)
        if "data" in state:
            differences = fingerprint_changes(state["data"], trainer.source.fingerprint())
            if differences and not allow_new_data:
                raise ConfigError(f"the data differ from what {ckpt} was trained on ({'; '.join(differences)}): "
                                  "resume on the same activations, or pass allow_new_data=True (--allow-new-data) "
                                  "to continue on these")
            if differences:
                changed["data"] = differences
        trainer._resumed = True
        trainer.load_state_dict(state)
        trainer.last_checkpoint = ckpt
        trainer.tracker.history = run.trim_log(trainer.step)
        run.record_resume(trainer._saved_config(), trainer.step, changed)
        return trainer


def _differs(a, b) -> bool:
    if isinstance(a, tuple):
        a = list(a)
    if isinstance(b, tuple):
        b = list(b)
    return a != b


def train(cfg: TrainConfig, data) -> TrainResult:
    """Train from scratch: `fastsae.train(TrainConfig(sae=SAEConfig(...)), activations)`."""
    return Trainer(cfg, data).fit()


__all__ = ["Trainer", "TrainConfig", "TrainResult", "train", "latest_checkpoint", "list_checkpoints"]
