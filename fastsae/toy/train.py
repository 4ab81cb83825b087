"""A small training loop for toy-data recovery runs (the sweep and the demo use it).

Adam on `sae.training_forward(x).loss`, decoder rows renormalised to unit norm after every
step (so the scale lives in the codes and the L1 penalty cannot shrink the dictionary instead
of the codes), a tqdm bar, and an evaluation of dictionary recovery against the ground truth.
This is not the general trainer: no checkpoints, no schedules beyond a final linear decay.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import metrics
from ..architectures import StandardSAE, TopKSAE
from ..constraints import normalize_rows_
from ..errors import InputError
from ..init import init_from_data_
from ..sae import BaseSAE
from .data import ToyData

INITS = ("random", "data")


def make_toy_sae(architecture: str, data: ToyData, ratio: float, coefficient: float, seed: int = 0) -> BaseSAE:
    """An SAE for `data` with d_sae = ratio·G: "standard" takes coefficient as the L1
    coefficient, "topk" as k (rounded to an integer)."""
    d_sae = max(1, int(round(ratio * data.n_features)))
    torch.manual_seed(seed)  # the modules draw their random init from the global generator
    common = dict(d_in=data.d, d_sae=d_sae, device=data.device)
    if architecture == "standard":
        return StandardSAE(**common, l1_coefficient=float(coefficient))
    if architecture == "topk":
        k = int(round(coefficient))
        if k != coefficient:
            raise InputError(f"TopK's sparsity coefficient is k, an integer: got {coefficient}")
        return TopKSAE(**common, k=k)
    raise InputError(f"toy runs support architecture 'standard' (ReLU + L1) or 'topk', got {architecture!r}")


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
    """Point the `dead` latents (bool [d_sae]) at inputs the SAE reconstructs worst
    (Bricken et al. 2023, simplified): each gets a normalised residual x − x̂ of an input drawn
    with probability ∝ its squared error as decoder row, the same direction as encoder column
    (scaled to the mean alive encoder norm), a zero bias, and fresh Adam state. Returns how many."""
    idx = dead.nonzero().squeeze(1)
    if idx.numel() == 0:
        return 0
    residual = (x - sae.training_forward(x).x_hat).float()
    err = residual.pow(2).sum(1)
    if float(err.sum()) <= 0:
        return 0
    pick = torch.multinomial(err, idx.numel(), replacement=idx.numel() > err.numel())
    atoms = torch.nn.functional.normalize(residual[pick], dim=1).to(sae.dtype)
    alive = ~dead
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.tensor(1.0)
    sae.W_dec[idx] = atoms
    sae.W_enc[:, idx] = atoms.t() * enc_norm
    sae.b_enc[idx] = 0
    for param, rows in ((sae.W_dec, (idx,)), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))):
        for buf in ("exp_avg", "exp_avg_sq"):
            if buf in opt.state.get(param, {}):
                opt.state[param][buf][rows] = 0
    return int(idx.numel())


@torch.no_grad()
def evaluate(sae: BaseSAE, data: ToyData, n_samples: int = 16384, batch: int = 4096,
             threshold: float = 0.99, seed: int = 12345) -> dict[str, float]:
    """Recovery and reconstruction metrics on a fixed evaluation set (same `seed`, same set;
    the training stream is not advanced)."""
    gen = torch.Generator(device=data.device).manual_seed(seed)
    fired = torch.zeros(sae.d_sae, dtype=torch.long, device=sae.device)
    xs, x_hats, l0s = [], [], []
    for start in range(0, n_samples, batch):
        x = data.sample(min(batch, n_samples - start), generator=gen).to(sae.dtype)
        out = sae.training_forward(x)
        fired += metrics.latent_fire_counts(out.acts, sae.d_sae)
        l0s.append(metrics.l0(out.acts) * x.shape[0])
        xs.append(x)
        x_hats.append(out.x_hat)
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


@dataclass
class ToyRunResult:
    """What a toy run returns: final metrics, and MMCS against steps if it was tracked."""

    steps: int
    seconds: float
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": self.seconds, "metrics": self.metrics, "history": self.history}


def train_toy(sae: BaseSAE, data: ToyData, steps: int, batch: int = 256, lr: float = 1e-3,
              init: str = "random", seconds: float | None = None, track_every: int = 0,
              lr_decay_fraction: float = 0.0, resample_every: int = 0, eval_samples: int = 16384,
              progress: bool = True, desc: str = "training",
              on_track: Callable[[dict[str, float]], None] | None = None) -> ToyRunResult:
    """Train `sae` on `data` with Adam for `steps` steps (or until `seconds` have passed).

    init: "random" keeps the module's init, "data" uses `init_from_data` on fresh samples.
    track_every: every that many steps, record MMCS and the fraction recovered (cos > 0.99)
        against the ground truth in `history`, and pass each record to `on_track` if given
        (e.g. to save the progress of a long run).
    lr_decay_fraction: decay the learning rate linearly to 0 over this last fraction of steps.
    resample_every: every that many steps (until the lr decay starts), latents that did not fire
        since the last check are resampled (`resample_dead_latents`); 0 = never.
    """
    if init not in INITS:
        raise InputError(f"init must be one of {INITS}, got {init!r}")
    if steps < 1 or batch < 1:
        raise InputError(f"steps and batch must be positive, got steps={steps}, batch={batch}")
    if init == "data":
        init_from_data(sae, data.sample(2 * sae.d_sae).to(sae.dtype))  # room for empty samples
    normalize_rows_(sae.W_dec)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    decay_start = int(steps * (1.0 - lr_decay_fraction))
    history: list[dict[str, float]] = []
    fired = torch.zeros(sae.d_sae, dtype=torch.long, device=sae.device)
    resampled = 0
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=desc, unit="step", mininterval=1.0, disable=not progress, leave=False)
    step = 0
    def track() -> None:
        cos = metrics.max_cosine_similarities(data.features, sae.W_dec)
        history.append({"step": step, "mmcs": float(cos.mean()), "recovered": float((cos > 0.99).float().mean()),
                        "seconds": time.perf_counter() - start})
        if on_track is not None:
            on_track(history[-1])

    while step < steps and (seconds is None or time.perf_counter() - start < seconds):
        if track_every and step % track_every == 0:
            track()
        if step >= decay_start:
            for group in opt.param_groups:
                group["lr"] = lr * (steps - step) / max(steps - decay_start, 1)
        out = sae.training_forward(data.sample(batch).to(sae.dtype))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        normalize_rows_(sae.W_dec)
        step += 1
        if resample_every:
            fired += metrics.latent_fire_counts(out.acts, sae.d_sae)
            if step % resample_every == 0 and step < decay_start:
                resampled += resample_dead_latents(sae, opt, fired == 0, data.sample(4 * batch).to(sae.dtype))
                fired.zero_()
        bar.update(1)
        if step % 100 == 0:
            bar.set_postfix(fvu=f"{float(out.fvu.detach()):.4f}", l0=f"{float(out.l0):.1f}")
    bar.close()
    elapsed = time.perf_counter() - start
    if track_every:
        track()
    result = evaluate(sae, data, n_samples=eval_samples)
    result["resampled_latents"] = resampled
    return ToyRunResult(steps=step, seconds=elapsed, metrics=result, history=history)
