"""Initialisation from data: b_dec at the geometric median, dictionary atoms from samples.

`tied_init_` (unit-norm decoder rows, W_enc = W_decᵀ, zero biases) is every SAE's default init;
`tie_encoder_` re-applies the tie after the decoder was changed here.
"""

from __future__ import annotations

import torch

from .constraints import normalize_rows_
from .errors import InputError


@torch.no_grad()
def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """The point minimising the sum of Euclidean distances to `points` [N, d] (Weiszfeld's
    algorithm, started at the mean). Robust to outliers, unlike the mean."""
    if points.dim() != 2 or points.shape[0] == 0:
        raise InputError(f"geometric_median needs a non-empty [N, d] sample, got shape {tuple(points.shape)}")
    p = points.double()
    median = p.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (p - median).norm(dim=1).clamp_min(1e-12)
        new = (w.unsqueeze(1) * p).sum(0) / w.sum()
        moved = float((new - median).norm())
        median = new
        if moved <= tol * max(1.0, float(median.norm())):
            break
    return median.to(points.dtype)


@torch.no_grad()
def tied_init_(sae, directions: torch.Tensor) -> None:
    """W_dec = `directions` [d_sae, d_in] scaled to unit-norm rows, W_enc = W_decᵀ, zero biases."""
    w = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sae.W_dec.copy_(w)
    sae.W_enc.copy_(w.t())
    sae.b_enc.zero_()
    sae.b_dec.zero_()


# The TopK family's encoder starts at W_decᵀ/√3: the scale of an nn.Linear's default init rows
# (sparsify's), at which a plain user loop reached a lower held-out FVU than with W_enc = W_decᵀ
# on a sentence model's activations (docs/dropin_quality.md). TopK selects by the encoder's
# ranking, which a common scale leaves unchanged; only the starting magnitudes shrink.
TOPK_ENCODER_INIT_SCALE = 3 ** -0.5


@torch.no_grad()
def tie_encoder_(sae) -> None:
    """W_enc = W_decᵀ."""
    sae.W_enc.copy_(sae.W_dec.t())


@torch.no_grad()
def init_b_dec_(sae, sample: torch.Tensor, method: str = "geometric_median") -> None:
    """Set b_dec from a sample [N, d_in]: "geometric_median", "mean" or "zeros"."""
    if method == "zeros":
        sae.b_dec.zero_()
        return
    x = sample.reshape(-1, sample.shape[-1]).float()
    if method == "mean":
        sae.b_dec.copy_(x.mean(0))
    elif method == "geometric_median":
        sae.b_dec.copy_(geometric_median(x))
    else:
        raise InputError(f"b_dec init {method!r} is unknown: use 'geometric_median', 'mean' or 'zeros'")


@torch.no_grad()
def init_from_data_(sae, sample: torch.Tensor, fraction: float = 1.0,
                    generator: torch.Generator | None = None, centre: torch.Tensor | None = None) -> int:
    """Data-sample init: set a `fraction` of the decoder rows (chosen at random) to
    normalised, centred activation samples (minus `centre`, default b_dec), then tie the
    encoder. Returns how many rows were set. Rows past the sample size reuse samples (drawn
    with replacement)."""
    if not 0.0 <= fraction <= 1.0:
        raise InputError(f"data init fraction must be in [0, 1], got {fraction}")
    x = sample.reshape(-1, sample.shape[-1]).float().to(sae.device)
    if x.shape[0] == 0:
        raise InputError("data-sample init needs at least one activation row")
    n = sae.d_sae
    m = int(round(fraction * n))
    if m == 0:
        return 0
    rows = torch.randperm(n, generator=generator)[:m].to(sae.device)
    pick = torch.randint(x.shape[0], (m,), generator=generator).to(sae.device) if m > x.shape[0] \
        else torch.randperm(x.shape[0], generator=generator)[:m].to(sae.device)
    atoms = x[pick] - (sae.b_dec if centre is None else centre).float()
    sae.W_dec.index_copy_(0, rows, atoms.to(sae.W_dec.dtype))
    normalize_rows_(sae.W_dec, rows)
    tie_encoder_(sae)
    return m


@torch.no_grad()
def resample_latents_(sae, latents: torch.Tensor, directions: torch.Tensor,
                      encoder_norm: float | torch.Tensor | None = None) -> None:
    """Point latents `latents` (ids of sae's own latents) at `directions` [len(latents), d_in]:
    decoder rows = the normalised directions, encoder columns the same directions scaled to
    `encoder_norm` (default: the mean norm of the other latents' encoder columns, so a revived
    latent competes on equal terms), zero encoder bias (Bricken et al. 2023)."""
    if latents.numel() == 0:
        return
    unit = torch.nn.functional.normalize(directions.float(), dim=1)
    if encoder_norm is None:
        live = torch.ones(sae.W_enc.shape[1], dtype=torch.bool, device=latents.device)
        live[latents] = False
        norms = sae.W_enc.float().norm(dim=0)
        encoder_norm = norms[live].mean() if bool(live.any()) else norms.mean()
    sae.W_dec.index_copy_(0, latents, unit.to(sae.W_dec.dtype))
    sae.W_enc.index_copy_(1, latents, (unit.t() * encoder_norm).to(sae.W_enc.dtype))
    sae.b_enc.index_fill_(0, latents, 0)
