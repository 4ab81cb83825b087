"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): nested prefixes of the
dictionary each reconstruct the input, and their losses are summed."""

from __future__ import annotations

import math

import torch

from ..config import SAEConfig
from ..errors import ConfigError
from ..sae import BaseSAE, mse_loss, register
from ..sparse import RowSparseGrads, Selection
from .batchtopk import BatchTopKSAE


@register
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK's selection and inference; the training loss scores G nested levels:

        x̂_g = b_dec + Σ_{latents j < w_g} f_j · W_dec[j]       (w_1 < ... < w_G = d_sae)
        L   = Σ_g λ_g · ‖x̂_g - x‖² / N                         (matryoshka_widths, matryoshka_weights)

    so the first w_1 latents must reconstruct on their own, the next ones refine them, and a
    general (parent) feature cannot be absorbed into its specific (child) latents.

    The sparse backward: with P_g the part of the reconstruction that level g's latents add,
    x̂_g = b_dec + P_1 + ... + P_g, so ∂L/∂P_g = Σ_{g' >= g} λ_g' · 2/N (x̂_g' - x) =: C_g. A
    latent's every slot in level g sees the error C_g where a plain SAE's sees 2/N (x̂ - x): the
    op "topk_sae_backward" runs once per level on that level's slots (k slots in all, never
    [N, d_sae]) with grad_out = C_g, and db_dec's decoder part is Σ_b C_1 (b_dec is in every
    level). C_g comes from autograd through the [G, N, d] level reconstructions alone."""

    architecture = "matryoshka_batchtopk"

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        super().validate_config(cfg)
        widths = cfg.matryoshka_widths
        example = f"e.g. matryoshka_widths=[{max(1, cfg.d_sae // 8)}, {max(1, cfg.d_sae // 2)}, {cfg.d_sae}]"
        if not widths or not isinstance(widths, (list, tuple)):
            raise ConfigError(f"matryoshka_batchtopk needs matryoshka_widths, the nested dictionary sizes: {example}")
        if not all(isinstance(w, int) and not isinstance(w, bool) for w in widths):
            raise ConfigError(f"matryoshka_widths must be integers, got {widths}")
        if any(b <= a for a, b in zip(widths, widths[1:])) or widths[0] < 1:
            raise ConfigError(f"matryoshka_widths must be positive and strictly increasing, got {widths}")
        if widths[-1] != cfg.d_sae:
            raise ConfigError(
                f"matryoshka_widths must end with the whole dictionary, d_sae={cfg.d_sae}; got {widths}: "
                f"append {cfg.d_sae}" if widths[-1] < cfg.d_sae else
                f"matryoshka_widths {widths} go past d_sae={cfg.d_sae}: {example}")
        weights = cfg.matryoshka_weights
        if weights is not None:
            if len(weights) != len(widths):
                raise ConfigError(f"matryoshka_weights has {len(weights)} entries for {len(widths)} "
                                  f"matryoshka_widths: give one weight per level (or None: all 1)")
            if not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights) \
                    or not any(w > 0 for w in weights):
                raise ConfigError(f"matryoshka_weights must be finite, >= 0 and not all 0, got {weights}")
        if cfg.skip_connection:
            raise ConfigError("a skip connection has no level of its own in a Matryoshka SAE: "
                              "set skip_connection=False")

    @property
    def widths(self) -> list[int]:
        return list(self.cfg.matryoshka_widths)

    @property
    def level_weights(self) -> list[float]:
        return [float(w) for w in (self.cfg.matryoshka_weights or [1.0] * len(self.widths))]

    def level_slots(self, sel: Selection):
        """(level g, values [N, m_g], local ids [N, m_g]) of each level with kept slots on this
        module, compacted to the widest row's count (padding: value 0)."""
        bounds = torch.tensor(self.widths, device=sel.indices.device)
        level = torch.bucketize(sel.indices + self.shard_start, bounds, right=True)
        starts = [0] + self.widths[:-1]
        out = []
        for g, (lo, hi) in enumerate(zip(starts, self.widths)):
            if hi <= self.shard_start or lo >= self.shard_end:
                continue
            mask = (level == g) & (sel.values != 0)
            m = int(mask.sum(1).max()) if mask.numel() else 0
            if m == 0:
                continue
            order = torch.argsort(mask.to(torch.int8), dim=1, descending=True, stable=True)[:, :m]
            values = sel.values.gather(1, order) * mask.gather(1, order).to(sel.values.dtype)
            out.append((g, values, sel.indices.gather(1, order)))
        return out

    def level_partials(self, sel: Selection) -> torch.Tensor:
        """P [G, N, d_out]: what each level's latents add to the reconstruction, summed over the
        shards (differentiable through the selection's values and W_dec)."""
        n = sel.values.shape[0]
        parts = [self.W_dec.new_zeros(n, self.d_out) for _ in self.widths]
        for g, values, idx in self.level_slots(sel):
            parts[g] = self.op("sparse_decode")(values.to(self.dtype), idx, self.W_dec, None)
        return self.context.sum_shards(torch.stack(parts), "the Matryoshka levels' partial reconstructions")

    def level_losses(self, partials: torch.Tensor, target: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
        """[G] per-level MSEs of the nested reconstructions b_dec + P_1 + ... + P_g."""
        recon = partials.cumsum(0) + b_dec
        losses = [mse_loss(recon[g], target) for g in range(recon.shape[0])]
        return torch.stack(losses) if losses else target.new_zeros(0, dtype=torch.promote_types(
            target.dtype, torch.float32))

    def selection_loss(self, sel, x_hat, target):
        """The inner levels' weighted losses (and the outer level's weight beyond 1): with the
        MSE of x_hat, Σ_g λ_g·MSE_g."""
        losses = self.level_losses(self.level_partials(sel)[:-1], target, self.b_dec)
        w = self.level_weights
        inner = sum((w[g] * losses[g] for g in range(len(w) - 1)), losses.new_zeros(()))
        return inner + (w[-1] - 1.0) * mse_loss(x_hat, target)

    @torch.no_grad()
    def sparse_loss(self, sel, x_hat, target):
        partials = self.level_partials(sel)
        dt = torch.promote_types(partials.dtype, torch.float32)
        with torch.enable_grad():
            leaf = partials.to(dt).requires_grad_()
            w = torch.tensor(self.level_weights, dtype=dt, device=leaf.device)
            loss = (w * self.level_losses(leaf, target.to(dt), self.b_dec.detach().to(dt))).sum()
            (grad,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), grad

    @torch.no_grad()
    def sparse_backward(self, x2, sel, grad_out):
        """grad_out [G, N, d_out]: ∂L/∂P_g per level (sparse_loss's); a [N, d_out] gradient of the
        whole reconstruction alone is a plain BatchTopK backward."""
        if grad_out.dim() == 2:
            return super().sparse_backward(x2, sel, grad_out)
        parts = []
        decoder_part = grad_out[0].sum(0).to(self.dtype)
        encoder_part = torch.zeros_like(decoder_part)
        for g, values, idx in self.level_slots(sel):
            rows, db = self._latent_backward(x2, values, idx, grad_out[g])
            parts.append(rows)
            encoder_part += grad_out[g].sum(0).to(db.dtype) - db
        if self.sharded:
            encoder_part = self.context.sum_shards_(encoder_part.contiguous())
        return concat_rows(parts, self), decoder_part - encoder_part


def concat_rows(parts: list[RowSparseGrads], sae: BaseSAE) -> RowSparseGrads:
    """Row-sparse gradients over disjoint, increasing latent ranges, as one."""
    if not parts:
        empty = sae.W_enc.new_zeros(sae.d_in, 0)
        return RowSparseGrads(torch.zeros(0, dtype=torch.long, device=sae.device), empty,
                              sae.b_enc.new_zeros(0), sae.W_dec.new_zeros(0, sae.d_out), sae.d_sae_local)
    return RowSparseGrads(torch.cat([p.latents for p in parts]), torch.cat([p.W_enc for p in parts], 1),
                          torch.cat([p.b_enc for p in parts]), torch.cat([p.W_dec for p in parts]),
                          sae.d_sae_local)
