"""Toy-data recovery runs: `fastsae.Trainer` on a ToyData stream, scored against the ground truth
(a transcoder on paired toy data against the output features).

`train_toy` is a thin wrapper: it builds a TrainConfig (the Trainer's defaults, with the few
settings a toy run names), trains the given SAE with the Trainer (the same loop, recipe and
dead-latent handling as `fastsae train`), tracks MMCS against the true features on the way
and evaluates the result on a fixed set of fresh samples. The sweep and the demo use it.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import metrics
from ..config import TrainConfig
from ..errors import InputError
from ..init import init_from_data_, resample_latents_
from ..sae import BaseSAE, sae_class
from ..trainer import Trainer
from .data import ToyData

INITS = ("random", "data")
# the architectures a toy run builds, and what its sparsity coefficient means for each
COEFFICIENTS = {"standard": "l1_coefficient", "topk": "k", "batchtopk": "k", "jumprelu": "l0_coefficient"}


def make_toy_sae(architecture: str, data: ToyData, ratio: float, coefficient: float, seed: int = 0) -> BaseSAE:
    """An SAE for `data` with d_sae = ratio·G: `coefficient` is the L1 coefficient ("standard"),
    k ("topk", "batchtopk": an integer) or the L0 coefficient ("jumprelu")."""
    if architecture not in COEFFICIENTS:
        raise InputError(f"toy runs support architectures {', '.join(COEFFICIENTS)}, got {architecture!r}")
    d_sae = max(1, int(round(ratio * data.n_features)))
    field_name = COEFFICIENTS[architecture]
    value: float | int = float(coefficient)
    if field_name == "k":
        value = int(round(coefficient))
        if value != coefficient:
            raise InputError(f"{architecture}'s sparsity coefficient is k, an integer: got {coefficient}")
    torch.manual_seed(seed)  # the modules draw their random init from the global generator
    return sae_class(architecture)(d_in=data.d, d_sae=d_sae, device=data.device, **{field_name: value})


def init_from_data(sae: BaseSAE, x: torch.Tensor) -> None:
    """Data-sample init (fastsae.init.init_from_data_): decoder atoms are normalised activation
    samples, W_enc = W_decᵀ. x: [>= d_sae, d_in]; all-zero rows (a sample with no active
    feature) have no direction and are skipped."""
    if x.dim() != 2 or x.shape[1] != sae.d_in:
        raise InputError(f"data init needs samples of shape [N, {sae.d_in}], got {tuple(x.shape)}")
    nonzero = x[x.norm(dim=1) > 0]
    if nonzero.shape[0] < sae.d_sae:
        raise InputError(
            f"data init needs at least d_sae={sae.d_sae} non-zero samples, got {nonzero.shape[0]}: "
            "pass a larger sample"
        )
    init_from_data_(sae, nonzero)


@torch.no_grad()
def resample_dead_latents(sae: BaseSAE, opt: torch.optim.Optimizer, dead: torch.Tensor,
                          x: torch.Tensor) -> int:
    """For a plain torch loop: resample the `dead` latents (bool [d_sae]) as the Trainer does
    (fastsae.init.resample_latents_ on residuals x − x̂ drawn ∝ their squared error) and clear
    their state in the torch optimizer `opt`. Returns how many."""
    idx = dead.nonzero().squeeze(1)
    if idx.numel() == 0:
        return 0
    residual = (x - sae(x)).float()
    err = residual.pow(2).sum(1)
    if float(err.sum()) <= 0:
        return 0
    pick = torch.multinomial(err, idx.numel(), replacement=True)
    resample_latents_(sae, idx, residual[pick])
    for param, rows in ((sae.W_dec, (idx,)), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))):
        for buf in ("exp_avg", "exp_avg_sq"):
            if buf in opt.state.get(param, {}):
                opt.state[param][buf][rows] = 0
    return int(idx.numel())


@torch.no_grad()
def evaluate(sae: BaseSAE, data: ToyData, n_samples: int = 16384, batch: int = 4096,
             threshold: float = 0.99, seed: int = 12345) -> dict[str, float]:
    """Recovery and reconstruction metrics on a fixed evaluation set (same `seed`, same set;
    the training stream is not advanced, and no statistic of the SAE is updated)."""
    gen = torch.Generator(device=data.device).manual_seed(seed)
    fired = torch.zeros(sae.d_sae, dtype=torch.long, device=sae.device)
    xs, x_hats, l0s = [], [], []
    for start in range(0, n_samples, batch):
        x = data.sample(min(batch, n_samples - start), generator=gen).to(sae.dtype)
        acts = sae.encode(x)
        x_hat = sae.decode(acts)
        fired += metrics.latent_fire_counts(acts, sae.d_sae)
        l0s.append(metrics.l0(acts) * x.shape[0])
        xs.append(x)
        x_hats.append(x_hat)
    x, x_hat = torch.cat(xs), torch.cat(x_hats)
    cos = metrics.max_cosine_similarities(data.features, sae.W_dec)
    return {
        "mmcs": float(cos.mean()),
        "recovered": float((cos > threshold).float().mean()),
        "recovery_threshold": threshold,
        "l0": sum(l0s) / n_samples,
        "fvu": metrics.fvu(x, x_hat),
        "shrinkage": metrics.shrinkage(x, x_hat),
        "dead_latents": metrics.dead_latents(fired),
        "dead_fraction": metrics.dead_latents(fired) / sae.d_sae,
        "eval_samples": n_samples,
    }


@torch.no_grad()
def evaluate_transcoder(sae: BaseSAE, data: ToyData, n_samples: int = 16384, batch: int = 4096,
                        threshold: float = 0.99, seed: int = 12345) -> dict[str, float]:
    """toy.train.evaluate's numbers for a transcoder: FVU and shrinkage of the target, MMCS of
    the decoder rows with the output features."""
    gen = torch.Generator(device=data.device).manual_seed(seed)
    fired = torch.zeros(sae.d_sae, dtype=torch.long, device=sae.device)
    ys, y_hats, l0 = [], [], 0.0
    for start in range(0, n_samples, batch):
        x, y = data.sample_pair(min(batch, n_samples - start), generator=gen)
        out = sae.training_forward(x.to(sae.dtype), y.to(sae.dtype))
        fired += metrics.latent_fire_counts(out.acts, sae.d_sae)
        l0 += metrics.l0(out.acts) * x.shape[0]
        ys.append(y)
        y_hats.append(out.x_hat)
    y, y_hat = torch.cat(ys), torch.cat(y_hats)
    cos = metrics.max_cosine_similarities(data.output_features, sae.W_dec)
    dead = metrics.dead_latents(fired)
    return {"mmcs": float(cos.mean()), "recovered": float((cos > threshold).float().mean()),
            "recovery_threshold": threshold, "l0": l0 / n_samples, "fvu": metrics.fvu(y, y_hat),
            "shrinkage": metrics.shrinkage(y, y_hat), "dead_latents": dead, "dead_fraction": dead / sae.d_sae,
            "eval_samples": n_samples, "skip_norm": float(sae.W_skip.norm()) if sae.W_skip is not None else 0.0}


@dataclass
class ToyRunResult:
    """What a toy run returns: final metrics, and MMCS against steps if it was tracked."""

    steps: int
    seconds: float
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": self.seconds, "metrics": self.metrics, "history": self.history}


def toy_config(sae: BaseSAE, steps: int, batch: int = 256, lr: float = 1e-3, init: str = "random",
               lr_decay_fraction: float | None = None, resample_every: int | None = None, seed: int = 0,
               out_dir: str = "toy_run", progress: bool = False, **options: Any) -> TrainConfig:
    """The TrainConfig of a toy run: the Trainer's defaults plus what the call names.

    lr_decay_fraction: decay the lr linearly to 0 over this last fraction of the steps (None:
        the Trainer's default; 0: no decay). resample_every: steps between resamplings of dead
        latents (None: the Trainer's default; 0: never). options: any other TrainConfig field."""
    if init not in INITS:
        raise InputError(f"init must be one of {INITS}, got {init!r}")
    if steps < 1 or batch < 1:
        raise InputError(f"steps and batch must be positive, got steps={steps}, batch={batch}")
    if lr_decay_fraction is not None:
        if not 0.0 <= lr_decay_fraction <= 1.0:
            raise InputError(f"lr_decay_fraction must be in [0, 1], got {lr_decay_fraction}")
        options.setdefault("decay", "linear" if lr_decay_fraction > 0 else "constant")
        options.setdefault("decay_start", 1.0 - lr_decay_fraction)
    if resample_every is not None:
        options.setdefault("resample_dead", resample_every > 0)
        if resample_every > 0:
            options.setdefault("resample_every", resample_every)
    options.setdefault("log_every", max(1, min(1000, steps // 20)))
    return TrainConfig(sae=sae.cfg, steps=steps, batch_size=batch, lr=lr, init="data" if init == "data" else "tied",
                       seed=seed, out_dir=out_dir, progress=progress, console=False, plot=False,
                       checkpoint_every=0, keep_checkpoints=1, **options)


def train_toy(sae: BaseSAE, data: ToyData, steps: int, batch: int = 256, lr: float = 1e-3,
              init: str = "random", seconds: float | None = None, track_every: int = 0,
              lr_decay_fraction: float | None = None, resample_every: int | None = None,
              eval_samples: int = 16384, progress: bool = True, desc: str = "training",
              on_track: Callable[[dict[str, float]], None] | None = None, out_dir: str | None = None,
              seed: int = 0, **options: Any) -> ToyRunResult:
    """Train `sae` on `data` with fastsae's Trainer for `steps` steps (or until `seconds`
    have passed), then evaluate it against the ground truth.

    init: "random" keeps the module's dictionary, "data" sets its atoms from data samples
        (TrainConfig.init="data"); either way the Trainer's data-dependent init (b_dec) applies.
    track_every: every that many steps, record MMCS and the fraction recovered (cos > 0.99)
        against the ground truth in `history`, and pass each record to `on_track` if given.
    lr_decay_fraction, resample_every, options: see `toy_config`.
    out_dir: keep the run's files (log, final SAE) there; default: a temporary folder.
    """
    cfg_kwargs = dict(batch=batch, lr=lr, init=init, lr_decay_fraction=lr_decay_fraction,
                      resample_every=resample_every, seed=seed, progress=progress, **options)
    history: list[dict[str, float]] = []
    start = time.perf_counter()

    truth = data.features if data.d_out is None else data.output_features  # what the decoder should learn

    def track(step: int) -> None:
        cos = metrics.max_cosine_similarities(truth, sae.W_dec)
        history.append({"step": step, "mmcs": float(cos.mean()), "recovered": float((cos > 0.99).float().mean()),
                        "seconds": time.perf_counter() - start})
        if on_track is not None:
            on_track(history[-1])

    def callback(trainer, scalars) -> bool:
        if track_every and trainer.step % track_every == 0:
            track(trainer.step)
        return seconds is not None and time.perf_counter() - start >= seconds

    with tempfile.TemporaryDirectory(prefix="fastsae-toy-") as tmp:
        cfg = toy_config(sae, steps, out_dir=out_dir or tmp, **cfg_kwargs)
        trainer = Trainer(cfg, data.source(batch, seed=data.seed + 1), sae=sae, initialise=True)
        if track_every:
            track(0)
        trainer.fit(callback=callback)
    elapsed = time.perf_counter() - start
    if track_every and history[-1]["step"] != trainer.step:
        track(trainer.step)
    score = evaluate if data.d_out is None else evaluate_transcoder
    result = score(sae, data, n_samples=eval_samples)
    result["resampled_latents"] = trainer.resampled
    return ToyRunResult(steps=trainer.step, seconds=elapsed, metrics=result, history=history)
