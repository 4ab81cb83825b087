"""Synthetic activations built from known ground-truth features (Sharkey, Braun & Millidge 2022).

    x = Σ_g c_g · f_g      over the features g active in that sample

- f_g: G unit-norm feature vectors in R^d, drawn at random (with G > d they are in superposition);
- feature g is active with probability p_g ∝ decay**g, rescaled so that Σ_g p_g = m, the mean
  number of active features per sample;
- which features fire together is correlated through a Gaussian copula: z ~ N(0, Σ) over a random
  correlation matrix Σ and feature g is active iff z_g < Φ⁻¹(p_g), which keeps every marginal
  probability exactly p_g while correlating the activity of features;
- c_g ~ U[0, 1) on the active features, 0 elsewhere.

Two options:
- a feature hierarchy (`parents`, `children`, `child_probability`): features 0..P-1 are parents,
  each with C children that fire only with it (when a parent fires, one of its children, chosen
  uniformly, fires too with probability child_probability). This is where SAEs absorb a parent
  into its children's latents (Chanin et al. 2024), which Matryoshka SAEs target.
- a paired mode (`d_out`): each feature also has an output direction h_g in R^d_out, and
  `sample_pair` returns (x, y) with y = Σ_g c_g · h_g (+ x @ Mᵀ, a dense linear part, with
  `target_linear` > 0): a transcoder's training data with known features.

Batches are drawn fresh on the generator's device, so the stream never ends and never repeats;
the same seed gives the same features and the same stream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import dtype_from_str
from ..data import ActivationSource
from ..errors import InputError


@dataclass
class ToyData:
    """A reproducible stream of toy activations with their ground truth.

    Parameters (all keyword, all with the defaults of the report):
        d: activation dimension (256).
        n_features: G, the number of ground-truth features (512).
        mean_active: m, the expected number of active features per sample (5). Probabilities are
            clamped at 1 after rescaling, so m must be below G.
        decay: feature g's probability is proportional to decay**g (0.99); 1.0 makes every feature
            equally likely.
        correlation: strength s in [0, 1) of the correlation between features' activity: the
            copula's correlation matrix is Σ = s·R + (1 - s)·I with R a random correlation matrix
            (0.5); 0 gives independent features.
        correlation_rank: rank r of the random part R = a aᵀ, where the rows of a ~ N(0, 1)^{G×r}
            are normalised to unit length (default 16): a small rank gives a few strong groups of
            co-occurring features.
        parents, children, child_probability: the feature hierarchy (0 parents: none). Features
            0..parents-1 are the parents (the most frequent ones), then each parent's `children`
            features in turn; the rest are independent of the hierarchy.
        d_out: the output dimension of the paired mode (None: off).
        target_linear: scale of the dense linear part M of the paired mode's target (0: none);
            M's entries are N(0, target_linear² / d).
        seed: fixes the features, the covariance and the stream.
        device: where the ground truth lives and batches are generated ("cpu", "cuda", ...).
        dtype: dtype of the features and of the samples (a torch dtype or its name).

    Ground truth (tensors on `device`):
        features [G, d], unit-norm rows; probabilities [G] (float32, each feature's marginal
        firing probability); covariance [G, G], the copula's correlation matrix Σ (float32);
        paired mode: output_features [G, d_out], unit-norm rows, and linear [d_out, d].
    """

    d: int = 256
    n_features: int = 512
    mean_active: float = 5.0
    decay: float = 0.99
    correlation: float = 0.5
    correlation_rank: int = 16
    parents: int = 0
    children: int = 0
    child_probability: float = 0.5
    d_out: int | None = None
    target_linear: float = 0.0
    seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype = field(default=torch.float32)

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str):  # config() writes dtypes as names; accept them back
            self.dtype = dtype_from_str(self.dtype)
        self._validate()
        self.device = str(self.device)
        g = torch.Generator().manual_seed(self.seed)
        feats = torch.randn(self.n_features, self.d, generator=g, dtype=torch.float64)
        self.features = (feats / feats.norm(dim=1, keepdim=True)).to(self.device, self.dtype)

        p = self.decay ** torch.arange(self.n_features, dtype=torch.float64)
        n_par, n_child = self.parents, self.parents * self.children
        weight = torch.ones_like(p)  # how many active features one firing of feature g brings
        weight[:n_par] += self.child_probability if self.children else 0.0
        weight[n_par:n_par + n_child] = 0.0  # children follow their parents
        p = _rescale_to_mean(p, self.mean_active, weight)
        marginal = p.clone()
        if n_child:
            parent_of = torch.arange(n_child) // self.children
            marginal[n_par:n_par + n_child] = p[parent_of] * self.child_probability / self.children
        self.probabilities = marginal.float().to(self.device)

        a = torch.randn(self.n_features, self.correlation_rank, generator=g, dtype=torch.float64)
        a = a / a.norm(dim=1, keepdim=True)  # R = a aᵀ then has a unit diagonal
        eye = torch.eye(self.n_features, dtype=torch.float64)
        cov = self.correlation * (a @ a.t()) + (1.0 - self.correlation) * eye
        self.covariance = cov.float().to(self.device)
        # z = √s·(ε_r aᵀ) + √(1−s)·ε has covariance s·a aᵀ + (1−s)·I = Σ exactly, at O(G·r) per
        # sample instead of the O(G²) of a Cholesky factor; feature g fires where z_g < Φ⁻¹(p_g).
        self._factor_t = (self.correlation ** 0.5 * a.t()).float().to(self.device)
        self._noise_scale = (1.0 - self.correlation) ** 0.5
        self._thresholds = torch.special.ndtri(p.clamp(max=1.0)).float().to(self.device)
        self._independent = self.correlation == 0.0
        if self.d_out is not None:
            out = torch.randn(self.n_features, self.d_out, generator=g, dtype=torch.float64)
            self.output_features = (out / out.norm(dim=1, keepdim=True)).to(self.device, self.dtype)
            lin = torch.randn(self.d_out, self.d, generator=g, dtype=torch.float64)
            self.linear = (lin * (self.target_linear / self.d ** 0.5)).to(self.device, self.dtype)
        self.reset()

    def _validate(self) -> None:
        def positive_int(name):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"ToyData {name} must be a positive integer, got {v!r}")

        for name in ("d", "n_features", "correlation_rank"):
            positive_int(name)
        for name in ("parents", "children"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InputError(f"ToyData {name} must be an integer >= 0, got {v!r}")
        if (self.parents == 0) != (self.children == 0):
            raise InputError(f"ToyData parents={self.parents}, children={self.children}: a hierarchy needs both "
                             "(or neither)")
        if self.parents * (1 + self.children) > self.n_features:
            raise InputError(
                f"ToyData: {self.parents} parents with {self.children} children each need "
                f"{self.parents * (1 + self.children)} features, but n_features={self.n_features}: raise n_features"
            )
        if not 0 <= self.child_probability <= 1:
            raise InputError(f"ToyData child_probability={self.child_probability} must be in [0, 1]")
        if self.d_out is not None:
            positive_int("d_out")
        if self.target_linear < 0 or (self.target_linear and self.d_out is None):
            raise InputError(f"ToyData target_linear={self.target_linear} must be >= 0, and needs the paired "
                             "mode (d_out)")
        if not 0 < self.mean_active < self.n_features:
            raise InputError(
                f"ToyData mean_active={self.mean_active} must be in (0, n_features={self.n_features}): "
                "it is the expected number of active features per sample"
            )
        if not 0 < self.decay <= 1:
            raise InputError(f"ToyData decay={self.decay} must be in (0, 1] (1 = uniform probabilities)")
        if not 0 <= self.correlation < 1:
            raise InputError(
                f"ToyData correlation={self.correlation} must be in [0, 1) (0 = independent features)"
            )
        if not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise InputError(f"ToyData dtype must be a floating torch dtype, got {self.dtype!r}")

    def reset(self) -> None:
        """Restart the stream from the beginning (same seed, same batches)."""
        self._gen = torch.Generator(device=self.device).manual_seed(self.seed + 1)

    def sample_codes(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The ground-truth coefficients of a fresh batch, [batch, G] (zero where inactive).

        generator: draw from this generator (on `device`) instead of the stream, e.g. for a
        fixed evaluation set that does not advance the training stream.
        """
        gen = self._gen if generator is None else generator
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise InputError(f"batch must be a positive integer, got {batch!r}")
        shape = (batch, self.n_features)
        z = torch.randn(shape, generator=gen, device=self.device)
        if not self._independent:
            shared = torch.randn(batch, self.correlation_rank, generator=gen, device=self.device)
            z = self._noise_scale * z + shared @ self._factor_t
        active = z < self._thresholds
        if self.parents:
            n_par, c = self.parents, self.children
            fire = active[:, :n_par] & (torch.rand(batch, n_par, generator=gen, device=self.device)
                                        < self.child_probability)
            which = torch.randint(c, (batch, n_par, 1), generator=gen, device=self.device)
            kids = torch.zeros(batch, n_par, c, dtype=torch.bool, device=self.device).scatter_(2, which, True)
            active[:, n_par:n_par * (1 + c)] = (kids & fire.unsqueeze(2)).reshape(batch, n_par * c)
        return torch.rand(shape, generator=gen, device=self.device) * active

    def sample(self, batch: int, return_codes: bool = False, generator: torch.Generator | None = None):
        """A fresh batch x [batch, d]; with return_codes=True, (x, codes [batch, G])."""
        codes = self.sample_codes(batch, generator)
        x = codes.to(self.dtype) @ self.features
        return (x, codes) if return_codes else x

    def sample_pair(self, batch: int, return_codes: bool = False, generator: torch.Generator | None = None):
        """Paired mode: (x [batch, d], y [batch, d_out]) from the same codes; with
        return_codes=True, (x, y, codes)."""
        if self.d_out is None:
            raise InputError("sample_pair needs the paired mode: build ToyData(d_out=...)")
        codes = self.sample_codes(batch, generator)
        x = codes.to(self.dtype) @ self.features
        y = codes.to(self.dtype) @ self.output_features + x @ self.linear.t()
        return (x, y, codes) if return_codes else (x, y)

    def hierarchy(self) -> list[tuple[int, list[int]]]:
        """[(parent feature, its children's features)] of the feature hierarchy ([] without one)."""
        n, c = self.parents, self.children
        return [(p, list(range(n + p * c, n + (p + 1) * c))) for p in range(n)]

    def config(self) -> dict[str, Any]:
        """Every generator parameter, JSON-serialisable (what a results file should record)."""
        cfg = asdict(self)
        cfg["dtype"] = str(self.dtype).removeprefix("torch.")
        return cfg

    def ground_truth(self) -> dict[str, torch.Tensor]:
        """The ground truth: features [G, d], probabilities [G], covariance [G, G] (and the
        paired mode's output_features [G, d_out] and linear [d_out, d])."""
        out = {"features": self.features, "probabilities": self.probabilities, "covariance": self.covariance}
        if self.d_out is not None:
            out.update(output_features=self.output_features, linear=self.linear)
        return out

    def __iter__(self):
        raise TypeError("ToyData streams by size: call data.sample(batch), or data.source(batch) for a Trainer")

    def source(self, batch_size: int, seed: int | None = None) -> ToySource:
        """An endless activation source of fresh batches for `fastsae.Trainer` (resumable)."""
        return ToySource(self, batch_size, seed)


class ToySource(ActivationSource):
    """Fresh batches of a ToyData generator as a Trainer's activation source. It draws from
    its own generator (seeded by `seed`, default the data's stream seed), whose state is the
    source's position: a resumed run sees the batches the uninterrupted one would have. In
    the paired mode (d_out) each row is an input beside its target, as fastsae.data.PairedSource
    yields them: a transcoder's training data."""

    def __init__(self, data: ToyData, batch_size: int, seed: int | None = None):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.data, self.batch_size = data, batch_size
        if data.d_out is not None:
            self.widths = (data.d, data.d_out)
        self.d_in = data.d if data.d_out is None else data.d + data.d_out
        self.gen = torch.Generator(device=data.device).manual_seed(data.seed + 1 if seed is None else seed)

    def __iter__(self):
        while True:
            if self.data.d_out is None:
                yield self.data.sample(self.batch_size, generator=self.gen)
            else:
                yield torch.cat(self.data.sample_pair(self.batch_size, generator=self.gen), dim=1)

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "toy": self.data.config(), "batch_size": self.batch_size}


def _rescale_to_mean(p: torch.Tensor, mean_active: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Scale p so that Σ w·min(c·p, 1) = mean_active (w: active features per firing, 1 unless a
    hierarchy says otherwise): the clamp at 1 is compensated, not ignored."""
    w = torch.ones_like(p) if weight is None else weight
    if float(w.sum()) < mean_active:
        raise InputError(f"ToyData cannot reach mean_active={mean_active}: at most {float(w.sum()):g} features "
                         "can fire together (lower mean_active)")
    lo, hi = 0.0, mean_active / float(p.min())
    for _ in range(200):  # bisection on c; Σ w·min(c·p, 1) is monotone in c
        c = 0.5 * (lo + hi)
        if float((w * (c * p).clamp(max=1.0)).sum()) < mean_active:
            lo = c
        else:
            hi = c
    return (0.5 * (lo + hi) * p).clamp(max=1.0)
