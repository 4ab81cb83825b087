"""SparseActs: the compact result of a TopK-family encode.

values/indices have shape [..., m]: m = k for TopK; for BatchTopK and thresholded
encodes m is the largest number of active latents in any row, and shorter rows are
padded with value 0 (at an arbitrary index: a padded slot adds nothing when decoded
or densified).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseActs:
    values: torch.Tensor
    indices: torch.Tensor
    d_sae: int

    def __post_init__(self) -> None:
        if self.values.shape != self.indices.shape:
            raise ValueError(
                f"SparseActs: values {tuple(self.values.shape)} and indices "
                f"{tuple(self.indices.shape)} must have the same shape"
            )

    @property
    def shape(self) -> torch.Size:
        """Shape of the dense tensor this stands for: [..., d_sae]."""
        return torch.Size((*self.values.shape[:-1], self.d_sae))

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def to_dense(self) -> torch.Tensor:
        dense = self.values.new_zeros(self.shape)
        # scatter_add, not scatter: a padded slot (value 0) must not overwrite a real value.
        return dense.scatter_add(-1, self.indices, self.values)

    def l0(self) -> torch.Tensor:
        """Active latents per row, shape [...]."""
        return (self.values != 0).sum(-1)

    def flatten_rows(self) -> SparseActs:
        # rows counted, not inferred: reshape(-1, 0) is ambiguous for an empty batch
        rows, m = self.values.shape[:-1].numel(), self.values.shape[-1]
        return SparseActs(self.values.reshape(rows, m), self.indices.reshape(rows, m), self.d_sae)

    def reshape_rows(self, lead: tuple[int, ...]) -> SparseActs:
        m = self.values.shape[-1]
        return SparseActs(self.values.reshape(*lead, m), self.indices.reshape(*lead, m), self.d_sae)

    def to(self, *args, **kwargs) -> SparseActs:
        values = self.values.to(*args, **kwargs)
        return SparseActs(values, self.indices.to(values.device), self.d_sae)

    @staticmethod
    def from_dense(dense: torch.Tensor) -> SparseActs:
        """Compact a dense [..., n] tensor to its nonzeros (differentiable through values)."""
        nz = dense != 0
        m = int(nz.sum(-1).max().item()) if dense.numel() else 0
        # topk over the 0/1 mask puts every nonzero first; ties among them are irrelevant.
        idx = nz.to(torch.float32).topk(m, dim=-1).indices if m > 0 else nz.new_zeros(
            (*dense.shape[:-1], 0), dtype=torch.long)
        return SparseActs(dense.gather(-1, idx), idx, dense.shape[-1])


@dataclass
class Selection:
    """A TopK-family training encode, as the explicit sparse backward wants it.

    values / indices [N, m]: the kept activations with the ids of this module's own latents
    (for a ShardedSAE, local ids, value 0 in slots another shard owns), the tensors the
    decode and backward use. acts: the whole selection over global ids (values detached),
    what tracking and metrics read. For a single-process SAE both views are the same.
    """

    values: torch.Tensor
    indices: torch.Tensor
    acts: SparseActs


@dataclass
class RowSparseGrads:
    """Gradients of the latent-indexed parameters, restricted to the latents that fired.

    latents: sorted unique latent ids [u]; W_enc: the gradient's columns for them [d_in, u];
    b_enc: [u]; W_dec: the gradient's rows [u, d_in]. Every other latent's gradient is zero.
    """

    latents: torch.Tensor
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    d_sae: int

    def to_dense(self) -> dict[str, torch.Tensor]:
        d_in = self.W_dec.shape[1]
        dW_enc = self.W_enc.new_zeros(d_in, self.d_sae)
        dW_enc[:, self.latents] = self.W_enc
        db_enc = self.b_enc.new_zeros(self.d_sae)
        db_enc[self.latents] = self.b_enc
        dW_dec = self.W_dec.new_zeros(self.d_sae, d_in)
        dW_dec[self.latents] = self.W_dec
        return {"dW_enc": dW_enc, "db_enc": db_enc, "dW_dec": dW_dec}
