"""ReLU SAE trained with an L1 penalty (Anthropic's April 2024 update: weighted by decoder norms)."""

from __future__ import annotations

import torch

from ..sae import BaseSAE, register


@register
class StandardSAE(BaseSAE):
    """ReLU activations; the penalty is Σ_j |f_j|·‖W_dec[j]‖ per row (Σ_j |f_j| with
    l1_decoder_norm off), averaged over rows and not divided by d_sae, so the coefficient means
    the same at every width."""

    architecture = "standard"

    def activate(self, x_in, train):
        acts = self.op("relu_encode")(x_in, self.W_enc, self.b_enc, None)
        if not train:
            return acts, None
        weighted = acts.abs() * self.W_dec.norm(dim=1) if self.l1_decoder_norm else acts.abs()
        return acts, self.cfg.l1_coefficient * weighted.sum(-1).mean().float()

    def _fused_forward(self, x2: torch.Tensor) -> torch.Tensor:
        b_in = self.b_dec if self.cfg.apply_b_dec_to_input else None
        return self.op("relu_forward")(x2, self.W_enc, self.b_enc, b_in, self.W_dec, self.b_dec)
