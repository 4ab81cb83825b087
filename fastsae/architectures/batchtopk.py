"""BatchTopK SAE (Bussmann et al. 2024): a batch of N rows keeps its N·k largest activations."""

from __future__ import annotations

import torch

from ..config import SAEConfig
from ..errors import ConfigError
from ..init import TOPK_ENCODER_INIT_SCALE
from ..sae import BaseSAE, register
from ..sparse import Selection


@register
class BatchTopKSAE(BaseSAE):
    """Training: the N·k largest activations of a batch of N rows. Inference: a JumpReLU at the
    learned scalar `threshold`, an EMA of the smallest kept activation in training. Until a
    threshold has been learned (threshold < 0), inference also selects the batch top-k.

    A shard keeps its own batch top-(N·k) candidates; the global (N·k)-th largest of all the
    shards' candidates is the threshold every shard keeps at or above."""

    architecture = "batchtopk"
    takes_sparse_path = True
    needs_k = True
    encoder_init_scale = TOPK_ENCODER_INIT_SCALE

    def _init_architecture_state(self) -> None:
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32, device=self.cfg.device))

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        super().validate_config(cfg)
        if not 0.0 <= cfg.batchtopk_threshold_momentum < 1.0:
            raise ConfigError(f"batchtopk_threshold_momentum must be in [0, 1), got {cfg.batchtopk_threshold_momentum}")

    def select(self, x2, train: bool = False) -> Selection:
        x_in, b_dec = self.encoder_args(x2)
        args = (x_in, self.W_enc, self.b_enc, b_dec)
        if not (train or self.training or float(self.threshold) < 0):
            acts = self.op("threshold_encode")(*args, self.threshold.to(self.dtype))
            return self.context.gather_selection(acts.values, acts.indices, self.shard_start, self.d_sae)
        acts = self.op("batchtopk_encode")(*args, self.cfg.k)
        keep = min(self.cfg.k * x_in.shape[0], x_in.shape[0] * self.d_sae)
        flat = acts.values.detach().flatten()
        top = self.context.top_values(flat.topk(min(keep, flat.numel())).values if self.sharded else flat, keep)
        kept = top[top > 0]
        values = acts.values
        if self.sharded and kept.numel():  # keep this shard's entries at or above the global cut
            values = values * (values >= kept.min())
        if train:
            self.update_threshold(kept)
        return self.context.gather_selection(values, acts.indices, self.shard_start, self.d_sae)

    @torch.no_grad()
    def update_threshold(self, kept: torch.Tensor) -> None:
        """EMA of the smallest kept activation; `kept` holds the batch's kept values (the same
        on every shard)."""
        if kept.numel() == 0:
            return
        smallest = kept.min().float()
        m = self.cfg.batchtopk_threshold_momentum
        if float(self.threshold) < 0:
            self.threshold.copy_(smallest)
        else:
            self.threshold.mul_(m).add_((1 - m) * smallest)
