"""Sharded / data-parallel training under torchrun, with the trainer's recipe.

    torchrun --nproc-per-node 4 -m fastsae train-dist --shards 4 --data acts/ --expansion 256 --k 32

The same TrainConfig, optimizers (DenseAdam, RowSparseAdam), schedules, AuxK, unit-norm
decoder and tracking as fastsae.trainer.Trainer, on this rank's ShardedSAE. What changes:

* layout: replicas × shards ranks (--shards / --replicas); shards of a replica hold one SAE
  and see the same batch, replicas see different batches.
* data: each replica's shard-0 rank reads the run's batch stream and keeps every R-th batch
  (replica r the r-th), then broadcasts it to its replica's other shards. Replicas see
  disjoint batches; the global batch is R × batch_size rows.
* gradients are averaged over the replicas before each optimizer step (row-sparse ones over
  the union of the latents any replica touched); fired latents are gathered from every
  replica, so the dead-latent tracker (and with it AuxK) is the same on every rank.
* only rank 0 logs (console, log.jsonl, curves) and shows the progress bar.
* checkpoints: checkpoints/step_N/ holds a sharded SAE (fastsae.distributed.checkpoint) and
  one trainer_state.rankR.pt per rank; resuming needs the same replicas × shards layout
  (optimizer moments are per shard), the weights alone load into any layout.
* final_sharded/ is always written; final/ (the single-process format every loader and
  converter reads) too when the whole SAE is under `consolidate_max_bytes`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic import atomic_write, atomic_write_text, fsync_dir
from ..constraints import normalize_rows_
from ..data import as_source
from ..errors import CheckpointError, ConfigError, InputError
from ..init import init_b_dec_, init_from_data_
from ..losses import total_variance
from ..optim import DenseAdam, RowSparseAdam, merge_row_sparse
from ..schedules import lr_factor, sparsity_factor
from ..sparse import RowSparseGrads
from ..tracking import Tracker, plot_curves, read_log
from ..trainer import TOPK_FAMILY, TrainConfig
from .checkpoint import consolidate, load_sharded, save_sharded
from .collectives import all_gather_padded, all_reduce_, checked
from .data_parallel import broadcast_parameters, reduce_gradients, reduce_row_sparse
from .groups import ParallelLayout
from .sharded_sae import ShardedSAE

STATE_PATTERN = "trainer_state.rank{rank}.pt"
CONSOLIDATE_MAX_BYTES = 1 << 30


class LocalView:
    """This shard's latents seen as an SAE of width d_sae_local, for the single-process
    helpers that index latents from 0 (RowSparseAdam, init_from_data_)."""

    def __init__(self, sae: ShardedSAE):
        self.sae = sae
        self.d_sae, self.d_in = sae.d_sae_local, sae.d_in
        self.device, self.dtype = sae.device, sae.dtype
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec

    def named_parameters(self):
        return self.sae.named_parameters()


@dataclass
class ShardedTrainResult:
    out_dir: Path
    final_dir: Path | None
    final_sharded_dir: Path | None
    steps: int
    tokens: int
    last_metrics: dict | None


class ShardedTrainer:
    """Train this rank's shard: `ShardedTrainer(cfg, data, layout).fit()` on every rank."""

    def __init__(self, cfg: TrainConfig, data, layout: ParallelLayout, sae: ShardedSAE | None = None,
                 consolidate_max_bytes: int = CONSOLIDATE_MAX_BYTES):
        self.cfg, self.layout = cfg, layout
        self.consolidate_max_bytes = consolidate_max_bytes
        self.source = as_source(data, cfg.batch_size, seed=cfg.seed)
        self.out_dir = Path(cfg.out_dir)
        self.step = self.tokens = 0
        self._resumed = sae is not None
        if sae is None:
            sae = ShardedSAE(cfg.sae, layout, seed=cfg.seed)
            self._init_from_data(sae)
        broadcast_parameters(sae, layout)  # replicas start identical, whatever each one read
        self.sae = sae
        sae.l1_decoder_norm = cfg.l1_decoder_norm
        self.k_aux = cfg.k_aux if cfg.k_aux is not None else max(1, cfg.sae.d_in // 2)
        if cfg.optimizer == "row_sparse_adam":
            # the catch-up mode option exists in newer fastsae.trainer / optim versions
            mode = {"catch_up": cfg.row_sparse_catch_up} if hasattr(cfg, "row_sparse_catch_up") else {}
            self.opt = RowSparseAdam(LocalView(sae), cfg.lr, cfg.betas, cfg.eps,
                                     unit_norm_decoder=cfg.use_unit_norm_decoder, **mode)
        else:
            self.opt = DenseAdam(dict(sae.named_parameters()), cfg.lr, cfg.betas, cfg.eps,
                                 unit_norm_rows=("W_dec",) if cfg.use_unit_norm_decoder else ())
        main = layout.is_main
        self.log_path = self.out_dir / "log.jsonl"
        self.tracker = Tracker(cfg.sae.d_sae, sae.device, self.log_path if main else None, cfg.log_every,
                               cfg.dead_tokens, cfg.dense_threshold,
                               console=tqdm.write if (cfg.console and main) else None)
        self.last_checkpoint: Path | None = None
        self._batches = None

    # ------------------------------------------------------------------ init and data
    def _init_from_data(self, sae: ShardedSAE) -> None:
        cfg = self.cfg
        if cfg.b_dec_init == "zeros" and cfg.init == "tied":
            return
        sample = self.source.sample(cfg.init_sample_rows).to(sae.device, sae.dtype)
        init_b_dec_(sae, sample, cfg.b_dec_init)
        if cfg.init == "data":  # each shard draws its own rows' atoms
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.layout.shard)
            init_from_data_(LocalView(sae), sample, cfg.data_init_fraction, generator=gen)
        if cfg.use_unit_norm_decoder:
            normalize_rows_(sae.W_dec)

    def _flags_all(self, *flags: bool) -> list[bool]:
        """Each flag AND-ed over every rank (one all_reduce): all ranks take the same branch."""
        t = torch.tensor([int(f) for f in flags], dtype=torch.int64, device=self.sae.device)
        if torch.distributed.is_initialized():
            checked("all_reduce of the step flags", lambda: torch.distributed.all_reduce(
                t, op=torch.distributed.ReduceOp.MIN))
        return [bool(v) for v in t.tolist()]

    def _next_batch(self) -> torch.Tensor | None:
        """This replica's next batch on every shard of it, or None when the stream ran out (on
        any replica: all stop together)."""
        lay, d = self.layout, self.cfg.sae.d_in
        x = None
        if lay.shard == 0:
            if self._batches is None:
                self._batches = iter(self.source)
            try:
                for i in range(lay.replicas):  # replica r keeps the r-th of every R batches
                    b = next(self._batches)
                    if i == lay.replica:
                        x = b.reshape(-1, d)
            except StopIteration:
                x = None
        rows = torch.tensor([-1 if x is None else x.shape[0]], dtype=torch.int64, device=self.sae.device)
        if lay.replica_group is not None:
            src = lay.replica_ranks()[0]
            checked("broadcast of the batch size", lambda: torch.distributed.broadcast(rows, src, lay.replica_group))
        (have,) = self._flags_all(int(rows.item()) >= 0)
        if not have:
            return None
        if lay.shard != 0:
            x = torch.empty(int(rows.item()), d, dtype=self.sae.dtype, device=self.sae.device)
        else:
            x = x.to(self.sae.device, self.sae.dtype).contiguous()
        if lay.replica_group is not None:
            src = lay.replica_ranks()[0]
            checked("broadcast of the batch", lambda: torch.distributed.broadcast(x, src, lay.replica_group))
        return x

    # ------------------------------------------------------------------ one step
    def _auxk(self, x2: torch.Tensor, residual: torch.Tensor):
        """(aux loss, RowSparseGrads of the local latents it touched) or (0, None)."""
        if self.cfg.sae.architecture not in TOPK_FAMILY or self.cfg.auxk_coefficient <= 0:
            return torch.zeros(()), None
        dead = self.tracker.dead_latents()
        if dead.numel() == 0:
            return torch.zeros(()), None
        sae = self.sae
        x_in = x2 - sae.b_dec.detach() if sae.cfg.apply_b_dec_to_input else x2
        loss, u, (We, be, Wd) = sae.auxk_loss(x_in, residual, dead, self.k_aux, min(dead.numel() / self.k_aux, 1.0))
        loss = self.cfg.auxk_coefficient * loss
        if loss.requires_grad:  # False on a shard none of whose latents were picked (no collective in backward)
            loss.backward()
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (We, be, Wd)]
        return loss.detach(), RowSparseGrads(u, *grads, sae.d_sae_local)

    def _sparse_step(self, x2: torch.Tensor):
        sae = self.sae
        with torch.no_grad():
            sel = sae.select(x2, train=True)
            x_hat = sae._decode_selection(sel)
            err = x_hat.float() - x2.float()
            mse = err.pow(2).sum(-1).mean()
            fvu = err.pow(2).sum() / total_variance(x2)
            rows, db_dec = sae.sparse_backward(x2, sel, (2.0 / x2.shape[0]) * err)
        aux, aux_rows = self._auxk(x2, -err)
        if aux_rows is not None:
            rows = merge_row_sparse(rows, aux_rows)
        rows, db_dec = reduce_row_sparse(rows, db_dec, self.layout)
        if isinstance(self.opt, RowSparseAdam):
            self.opt.step(rows, db_dec)
        else:
            dense = rows.to_dense()
            sae.W_enc.grad, sae.b_enc.grad, sae.W_dec.grad = dense["dW_enc"], dense["db_enc"], dense["dW_dec"]
            sae.b_dec.grad = db_dec.to(sae.b_dec.dtype)
            self.opt.step()
            self.opt.zero_grad()
        acts = sel.acts
        scalars = {"mse": float(mse), "fvu": float(fvu), "l0": float((acts.values > 0).sum(-1).float().mean()),
                   "auxk": float(aux), "sparsity": 0.0, "loss": float(mse) + float(aux)}
        return scalars, x_hat, acts.indices[acts.values > 0]

    def _autograd_step(self, x2: torch.Tensor, sf: float):
        sae = self.sae
        self.opt.zero_grad()
        out = sae.training_forward(x2)
        loss = out.mse + sf * out.sparsity
        loss.backward()
        aux, aux_rows = self._auxk(x2, (x2.float() - out.x_hat.float()).detach())
        if aux_rows is not None:  # add the few aux-touched latents' gradients into the dense ones
            u = aux_rows.latents
            sae.W_enc.grad.index_add_(1, u, aux_rows.W_enc)
            sae.b_enc.grad.index_add_(0, u, aux_rows.b_enc)
            sae.W_dec.grad.index_add_(0, u, aux_rows.W_dec)
        reduce_gradients(sae, self.layout)
        self.opt.step()
        self.opt.zero_grad()
        scalars = {"mse": float(out.mse.detach()), "fvu": float(out.fvu.detach()), "l0": float(out.l0),
                   "sparsity": float(sf * out.sparsity.detach()), "auxk": float(aux),
                   "loss": float(loss.detach()) + float(aux)}
        return scalars, out.x_hat.detach(), out.acts.indices[out.acts.values > 0]

    def _replica_mean(self, scalars: dict) -> dict:
        """The logged numbers are the means over the replicas (each saw a different batch)."""
        if self.layout.shard_group is None:
            return scalars
        keys = sorted(scalars)
        t = torch.tensor([scalars[k] for k in keys], dtype=torch.float64, device=self.sae.device)
        all_reduce_(t, self.layout.shard_group, what="all_reduce of the step's metrics")
        return {k: v / self.layout.replicas for k, v in zip(keys, t.tolist())}

    def train_step(self, x: torch.Tensor) -> dict | None:
        cfg, sae = self.cfg, self.sae
        (finite,) = self._flags_all(bool(torch.isfinite(x).all()))
        if not finite:
            if cfg.nonfinite == "raise":
                raise InputError(
                    f"a batch of step {self.step} (on some replica) contains NaN/inf: clean the activations, "
                    "or set nonfinite='skip' to drop such steps")
            self.tracker.skipped_batches += 1
            return None
        lr = cfg.lr * lr_factor(self.step, cfg.steps, cfg.warmup_steps, cfg.decay_start, cfg.decay,
                                cfg.final_lr_fraction)
        sf = sparsity_factor(self.step, cfg.sparsity_warmup_steps)
        self.opt.set_lr(lr)
        x2 = sae._normalize_input(sae._check_input(x))[0].detach()
        if cfg.use_sparse_backward:
            scalars, x_hat, fired = self._sparse_step(x2)
        else:
            scalars, x_hat, fired = self._autograd_step(x2, sf)
        fired = all_gather_padded(fired.unsqueeze(0), self.layout.shard_group, -1,
                                  "all_gather of the fired latents")[0]
        n_tokens = x.shape[0] * self.layout.replicas
        scalars = self._replica_mean(scalars)
        self.tracker.record(fired[fired >= 0], n_tokens, scalars, x_hat, x2)
        self.step += 1
        self.tokens += n_tokens
        scalars.update(lr=lr, sparsity_factor=sf)
        return scalars

    # ------------------------------------------------------------------ loop
    def fit(self, max_steps: int | None = None) -> ShardedTrainResult:
        cfg, main = self.cfg, self.layout.is_main
        stop = cfg.steps if max_steps is None else min(max_steps, cfg.steps)
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not self._resumed:
                self.log_path.unlink(missing_ok=True)
                atomic_write_text(self.out_dir / "train_config.json",
                                  json.dumps({**cfg.to_dict(), "layout": self._layout_dict()}, indent=2) + "\n")
        saved_at = -1
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training", unit="step",
                   disable=not (cfg.progress and main))
        try:
            while self.step < stop:
                x = self._next_batch()
                if x is None:
                    if main:
                        tqdm.write(f"the activation source ran out after {self.step} steps (asked for {cfg.steps})")
                    break
                if self.train_step(x) is None:
                    continue
                bar.update(1)
                self.tracker.maybe_log(self.step, self.tokens)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                    saved_at = self.step
        finally:
            bar.close()
        finished = self.step >= cfg.steps or max_steps is None
        if finished:
            self.tracker.flush(self.step, self.tokens)
            if hasattr(self.opt, "flush"):  # row-sparse Adam: apply every latent's pending momentum
                self.opt.flush()
        if saved_at != self.step:
            self.save_checkpoint()
        final = final_sharded = None
        if finished:
            final_sharded = save_sharded(self.sae, self.out_dir / "final_sharded")
            size = self.cfg.sae.d_sae * (2 * self.cfg.sae.d_in + 1) * self.sae.W_enc.element_size()
            if size <= self.consolidate_max_bytes:
                if main:
                    final = consolidate(final_sharded, self.out_dir / "final")
            elif main:
                print(f"fastsae: the SAE is {size / 2**30:.1f} GiB, so final/ was not consolidated into one "
                      f"file; load {final_sharded} with fastsae.distributed.load_sharded / load_full")
            if main and cfg.plot:
                plot_curves(self.log_path, self.out_dir / "curves.png")
        if main and cfg.console:
            print(f"fastsae: {self.step} steps, {self.tokens} tokens on {self.layout.replicas} replica(s) x "
                  f"{self.layout.shards} shard(s); final SAE in {final or final_sharded or self.last_checkpoint}")
        return ShardedTrainResult(self.out_dir, final, final_sharded, self.step, self.tokens,
                                  self.tracker.history[-1] if self.tracker.history else None)

    # ------------------------------------------------------------------ checkpoints
    def _layout_dict(self) -> dict:
        return {"replicas": self.layout.replicas, "shards": self.layout.shards}

    def _state(self) -> dict:
        return {"format": 1, "step": self.step, "tokens": self.tokens, "layout": self._layout_dict(),
                "optimizer": self.opt.state_dict(), "tracker": self.tracker.state_dict(),
                "source": self.source.state_dict(), "rng": torch.get_rng_state()}

    def save_checkpoint(self) -> Path:
        """checkpoints/step_N: built in a temporary directory by every rank, renamed by rank 0
        after all have written (a failed save leaves the previous checkpoint as it was)."""
        root = self.out_dir / "checkpoints"
        name = f"step_{self.step:08d}"
        final, tmp = root / name, root / f".tmp-{name}"
        if self.layout.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier("barrier before writing a checkpoint")
        save_sharded(self.sae, tmp)
        state = self._state()
        atomic_write(tmp / STATE_PATTERN.format(rank=self.layout.rank), lambda p: torch.save(state, p))
        self._barrier("barrier after writing the trainer states")
        if self.layout.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(root)
            atomic_write_text(root / "LATEST", name + "\n")
            done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
            for old in done[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier("barrier after publishing a checkpoint")
        self.last_checkpoint = final
        return final

    def _barrier(self, what: str) -> None:
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            checked(what, torch.distributed.barrier)

    @classmethod
    def resume(cls, out_dir: str | Path, data, layout: ParallelLayout, **overrides) -> "ShardedTrainer":
        """Continue a run from checkpoints/LATEST, with the layout it was saved with."""
        out_dir = Path(out_dir)
        cfg_path = out_dir / "train_config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{out_dir} is not a training run: it has no train_config.json")
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
        raw.pop("layout", None)
        cfg = TrainConfig.from_dict(raw).replace(out_dir=str(out_dir), **overrides)
        latest = out_dir / "checkpoints" / "LATEST"
        if not latest.is_file():
            raise CheckpointError(f"no checkpoint to resume from in {out_dir / 'checkpoints'}")
        ckpt = out_dir / "checkpoints" / latest.read_text(encoding="utf-8").strip()
        state_path = ckpt / STATE_PATTERN.format(rank=layout.rank)
        if not state_path.is_file():
            raise CheckpointError(f"{state_path} is missing: {ckpt} was not written by a run of this layout")
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        want = {"replicas": layout.replicas, "shards": layout.shards}
        if state["layout"] != want:
            raise ConfigError(
                f"{ckpt} was saved by {state['layout']['replicas']} replica(s) x {state['layout']['shards']} "
                f"shard(s), this job is {layout.replicas} x {layout.shards}: resume with the same layout (the "
                "optimizer state is per shard); the weights alone load into any layout with load_sharded")
        trainer = cls(cfg, data, layout, sae=load_sharded(ckpt, layout))
        trainer.step, trainer.tokens = state["step"], state["tokens"]
        trainer.opt.load_state_dict(state["optimizer"])
        trainer.tracker.load_state_dict(state["tracker"])
        trainer.source.load_state_dict(state["source"])
        torch.set_rng_state(state["rng"])
        trainer.last_checkpoint = ckpt
        if layout.is_main:
            kept = [r for r in read_log(trainer.log_path) if r["step"] <= trainer.step]
            atomic_write_text(trainer.log_path, "".join(json.dumps(r) + "\n" for r in kept))
            trainer.tracker.history = kept
        return trainer
