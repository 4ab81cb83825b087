"""Gated SAE (Rajamanoharan et al. 2024): a gate decides which latents fire, a magnitude path
with the same directions decides how strongly."""

from __future__ import annotations

import torch
from torch import nn

from ..sae import BaseSAE, register


@register
class GatedSAE(BaseSAE):
    """h = (x - b_dec) @ W_enc (one GEMM feeds both paths);
        gate:      π_gate = h + b_enc                 (b_enc is SAELens's b_gate)
        magnitude: π_mag  = h · exp(r_mag) + b_mag
        f = 1[π_gate > 0] · ReLU(π_mag)
    The Heaviside gate passes no gradient; the gate path learns from the penalty
    l1_coefficient · Σ_j ReLU(π_gate)_j (weighted by ‖W_dec[j]‖ with l1_decoder_norm, as SAELens)
    and from the auxiliary loss ‖x - (ReLU(π_gate) @ sg(W_dec) + sg(b_dec))‖², the gate path's
    reconstruction through a frozen (stop-gradient) decoder, as in the paper and
    dictionary_learning (SAELens's trainer does not freeze the decoder there).

    At inference a Gated SAE is a JumpReLU SAE (Rajamanoharan et al. 2024b): with e = exp(r_mag),
    f_j = ReLU(π_mag)·1[π_mag > b_mag - e·b_enc], so the fused JumpReLU kernel runs it on the
    folded encoder W_enc·e with bias b_mag and threshold max(b_mag - e·b_enc, 0)."""

    architecture = "gated"
    latent_dims = {**BaseSAE.latent_dims, "r_mag": 0, "b_mag": 0}

    def _init_architecture_state(self) -> None:
        f = dict(dtype=self.cfg.torch_dtype, device=self.cfg.device)
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae_local, **f))
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae_local, **f))

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        super().reset_parameters(seed)
        self.r_mag.zero_()
        self.b_mag.zero_()

    def activate(self, x_in, train):
        h = x_in @ self.W_enc
        pi_gate = h + self.b_enc
        acts = (pi_gate > 0).to(h.dtype) * (h * self.r_mag.exp() + self.b_mag).relu()
        if not train:
            return acts, None
        gate = pi_gate.relu()
        weighted = gate * self.W_dec.norm(dim=1) if self.l1_decoder_norm else gate
        penalty = self.cfg.l1_coefficient * weighted.sum(-1).mean().float()
        return acts, penalty, gate @ self.W_dec.detach()

    def jumprelu_equivalent(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_enc', b_enc', threshold) of the JumpReLU SAE that computes the same activations."""
        e = self.r_mag.exp()
        return self.W_enc * e, self.b_mag, (self.b_mag - e * self.b_enc).clamp_min(0)

    def _fused_forward(self, x2: torch.Tensor) -> torch.Tensor:
        W, b, threshold = self.jumprelu_equivalent()
        b_in = self.b_dec if self.cfg.apply_b_dec_to_input else None
        return self.op("jumprelu_forward")(x2, W, b, b_in, threshold, self.W_dec, self.b_dec)
