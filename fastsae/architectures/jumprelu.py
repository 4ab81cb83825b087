"""JumpReLU SAE (Rajamanoharan et al. 2024): pre·1[pre > θ_j] with a learned per-latent threshold."""

from __future__ import annotations

import torch
from torch import nn

from ..config import SAEConfig
from ..errors import ConfigError
from ..ops import reference
from ..sae import BaseSAE, register


@register
class JumpReLUSAE(BaseSAE):
    """pre·1[pre > θ_j], trained through the straight-through estimator of the threshold with
    an L0 penalty (l0_coefficient, jumprelu_bandwidth)."""

    architecture = "jumprelu"
    latent_dims = {**BaseSAE.latent_dims, "threshold": 0}

    def _init_architecture_state(self) -> None:
        self.threshold = nn.Parameter(torch.full((self.d_sae_local,), self.cfg.jumprelu_init_threshold,
                                                 dtype=self.cfg.torch_dtype, device=self.cfg.device))

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        if cfg.jumprelu_bandwidth <= 0:
            raise ConfigError(f"jumprelu_bandwidth must be > 0, got {cfg.jumprelu_bandwidth}")

    def activate(self, x_in, train):
        eps = self.cfg.jumprelu_bandwidth
        if not train:
            return self.op("jumprelu_encode")(x_in, self.W_enc, self.b_enc, None, self.threshold, eps), None
        # one GEMM feeds both the activation and the L0 penalty's straight-through estimator
        pre = reference.pre_activations(x_in, self.W_enc, self.b_enc, None)
        acts = reference.JumpReLU.apply(pre, self.threshold, eps)
        l0 = reference.Step.apply(pre, self.threshold, eps).sum(-1).mean()
        return acts, self.cfg.l0_coefficient * l0.float()

    def _fused_forward(self, x2: torch.Tensor) -> torch.Tensor:
        b_in = self.b_dec if self.cfg.apply_b_dec_to_input else None
        return self.op("jumprelu_forward")(x2, self.W_enc, self.b_enc, b_in, self.threshold, self.W_dec, self.b_dec)
