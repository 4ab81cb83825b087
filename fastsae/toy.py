"""Synthetic activations built from known ground-truth features (Sharkey et al. 2022).

x = Σ_g c_g · f_g over the active features g, with unit-norm features f_g in R^d,
feature g active with a probability that decays with g, and coefficients c_g ~ U[0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ToyData:
    """A reproducible stream of toy activations with their ground truth.

    d: activation dimension; n_features: G ground-truth features; mean_active: m, the
    expected number of active features per sample; decay: feature g's probability is
    proportional to decay**g; seed: fixes the features and the stream.
    """

    d: int = 256
    n_features: int = 512
    mean_active: float = 5.0
    decay: float = 0.99
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        feats = torch.randn(self.n_features, self.d, generator=g)
        self.features = (feats / feats.norm(dim=1, keepdim=True)).to(self.device)
        p = self.decay ** torch.arange(self.n_features, dtype=torch.float64)
        p = p * (self.mean_active / p.sum())
        self.probabilities = p.clamp(max=1.0).float().to(self.device)
        self._gen = torch.Generator(device=self.device).manual_seed(self.seed + 1)

    def sample(self, batch: int) -> torch.Tensor:
        """A fresh batch [batch, d]."""
        shape = (batch, self.n_features)
        active = torch.rand(shape, generator=self._gen, device=self.device) < self.probabilities
        coef = torch.rand(shape, generator=self._gen, device=self.device) * active
        return coef @ self.features

    def __iter__(self):
        raise TypeError("ToyData streams by size: call data.sample(batch)")
