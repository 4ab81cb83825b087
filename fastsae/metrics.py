"""Metrics of dictionary quality and reconstruction.

Dictionary recovery (Sharkey et al. 2022): `max_cosine_similarities`, `mmcs`,
`fraction_recovered`, and `dictionary_mmcs` between two learned dictionaries (the signal of
recovery when there is no ground truth). Codes and reconstructions: `latent_fire_counts`,
`dead_latents`, `l0`, `fvu` and `shrinkage`, the relative reconstruction bias γ
(Rajamanoharan et al. 2024): γ < 1 means reconstructions are biased low, as an L1 penalty does.
"""

from __future__ import annotations

import math
from typing import Union

import torch

from .errors import InputError
from .sparse import SparseActs

Acts = Union[torch.Tensor, SparseActs]


def _check_dictionaries(truth: torch.Tensor, learned: torch.Tensor) -> None:
    for name, t in (("truth", truth), ("learned", learned)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] == 0:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"{name} must be a non-empty 2-D tensor [atoms, d], got {shape}")
    if truth.shape[1] != learned.shape[1]:
        raise InputError(
            f"dictionaries live in different spaces: truth has d={truth.shape[1]}, learned has "
            f"d={learned.shape[1]}; pass decoder rows (W_dec [d_sae, d_in]), not W_enc"
        )


def max_cosine_similarities(truth: torch.Tensor, learned: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """For every row of `truth` [G, d], its largest cosine similarity with a row of `learned` [n, d].

    Signed: an atom pointing opposite to a feature does not recover it. Computed in chunks of
    `truth` rows so that [G, n] is never held at once for wide dictionaries.
    """
    _check_dictionaries(truth, learned)
    w = torch.nn.functional.normalize(learned.detach().float(), dim=1)
    t = torch.nn.functional.normalize(truth.detach().float().to(w.device), dim=1)
    return torch.cat([(part @ w.t()).max(dim=1).values for part in t.split(chunk)])


def mmcs(truth: torch.Tensor, learned: torch.Tensor) -> float:
    """Mean max cosine similarity: how well `learned` atoms cover the `truth` features (1 = all)."""
    return float(max_cosine_similarities(truth, learned).mean())


def fraction_recovered(truth: torch.Tensor, learned: torch.Tensor, threshold: float = 0.99) -> float:
    """Fraction of `truth` features whose best learned atom has cosine similarity > threshold."""
    return float((max_cosine_similarities(truth, learned) > threshold).float().mean())


def dictionary_mmcs(a: torch.Tensor, b: torch.Tensor) -> float:
    """MMCS between two learned dictionaries, from the smaller one into the larger one.

    Without ground truth, dictionaries of different sizes (or seeds) that agree have found real
    features: every atom of the smaller one should reappear in the larger one.
    """
    small, large = (a, b) if a.shape[0] <= b.shape[0] else (b, a)
    return mmcs(small, large)


def fired_latents(acts: Acts) -> tuple[torch.Tensor, float]:
    """(the latent id of every activation that fired, repeats kept, in row order; the mean
    number per row, nan for no rows) of a batch's codes: > 0 for SparseActs, != 0 for dense
    [..., d_sae]. What a training step records."""
    if isinstance(acts, SparseActs):
        values, indices = acts.values, acts.indices
        positive = values > 0
        count = int(positive.sum())
        # a TopK step usually keeps every slot: its ids as they are, without a masked copy
        fired = indices.reshape(-1) if count == positive.numel() else indices[positive]
    else:
        values = acts
        fired = torch.nonzero(acts.detach().reshape(-1, acts.shape[-1]))[:, 1]
        count = fired.numel()
    rows = math.prod(values.shape[:-1])
    return fired, count / rows if rows else math.nan


def latent_fire_counts(acts: Acts, d_sae: int | None = None) -> torch.Tensor:
    """How many rows each latent fired (> 0) in: int64 [d_sae], from dense [..., d_sae] or SparseActs."""
    if isinstance(acts, SparseActs):
        return torch.bincount(fired_latents(acts)[0], minlength=acts.d_sae)
    if not isinstance(acts, torch.Tensor) or acts.dim() == 0:
        raise InputError(f"acts must be a SparseActs or a dense tensor [..., d_sae], got {type(acts).__name__}")
    if d_sae is not None and acts.shape[-1] != d_sae:
        raise InputError(f"acts have {acts.shape[-1]} latents, expected d_sae={d_sae}")
    return (acts.reshape(-1, acts.shape[-1]) > 0).sum(0)


def dead_latents(fire_counts: torch.Tensor) -> int:
    """Latents that never fired, from the counts of `latent_fire_counts` (summed over batches)."""
    return int((fire_counts == 0).sum())


def l0(acts: Acts) -> float:
    """Mean number of active latents per row."""
    if isinstance(acts, SparseActs):
        return fired_latents(acts)[1]
    return float((acts != 0).sum(-1).float().mean())


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − mean(x)‖² (0 = perfect)."""
    _check_same_shape(x, x_hat)
    x2, err = x.float().reshape(-1, x.shape[-1]), (x_hat.float() - x.float()).reshape(-1, x.shape[-1])
    var = (x2 - x2.mean(0)).pow(2).sum()
    return float(err.pow(2).sum() / var.clamp_min(torch.finfo(torch.float32).tiny))


def shrinkage(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Relative reconstruction bias γ = E‖x̂‖² / E⟨x̂, x⟩ (Rajamanoharan et al. 2024).

    γ is the scale that best maps x̂ back onto x (argmin_γ E‖x̂/γ − x‖²): γ < 1 means the SAE's
    reconstructions are systematically too small (shrinkage, as L1 causes), γ ≈ 1 unbiased.
    """
    _check_same_shape(x, x_hat)
    xf, hf = x.float(), x_hat.float()
    dot = (hf * xf).sum()
    if float(dot) <= 0:
        raise InputError("shrinkage is undefined: the reconstructions have no positive overlap with x")
    return float(hf.pow(2).sum() / dot)


def _check_same_shape(x: torch.Tensor, x_hat: torch.Tensor) -> None:
    if x.shape != x_hat.shape or x.dim() == 0:
        raise InputError(
            f"x and x_hat must have the same shape [..., d], got {tuple(x.shape)} and {tuple(x_hat.shape)}"
        )
