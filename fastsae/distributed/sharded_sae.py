"""A sharded SAE is the architecture's own module built with a distributed context: each rank
holds a contiguous latent slice [start, end) (W_enc[:, start:end], b_enc[start:end],
W_dec[start:end] and the architecture's latent-indexed tensors); b_dec and other replicated
tensors are whole on every rank. The architecture code (fastsae/architectures/) is the same
as on one process; the context (ParallelLayout) merges what the slices compute:

    x_in = x - b_dec                   replicated; its gradient is summed over the shards
    TopK:      local top-k over the slice, candidates all-gathered, the global top-k picked
               from them: exact, since every global winner is among its own shard's top-k
    BatchTopK: local top-(N·k) over the slice, the candidates' values all-gathered, the
               global (N·k)-th largest is the threshold every shard keeps at or above
    ReLU/JumpReLU: no selection, each shard activates its own latents
    x_hat = Σ_shards (own acts @ own W_dec rows) + b_dec      (one all_reduce of [N, d])

The backward is local: a latent's gradients are computed only by the rank that owns it, from
the reconstruction error every rank holds; only b_dec's encoder-side gradient crosses ranks.

This module holds the helpers between whole and sharded SAEs, and `ShardedSAE`, the name
these modules had when they were a class of their own.
"""

from __future__ import annotations

import torch

from ..config import SAEConfig
from ..parallel import ParallelContext
from ..sae import BaseSAE, build_sae, latent_slice
from .collectives import all_gather


@torch.no_grad()
def shard_of(sae: BaseSAE, layout: ParallelContext | None = None) -> BaseSAE:
    """This rank's slice of a whole (single-process) SAE; every rank passes the same SAE."""
    shard = build_sae(sae.cfg, layout, init=False)
    lo, hi, arch = shard.shard_start, shard.shard_end, sae.cfg.architecture
    shard.load_state_dict({k: latent_slice(k, t, lo, hi, arch).clone() for k, t in sae.state_dict().items()})
    shard.l1_decoder_norm = sae.l1_decoder_norm
    return shard


@torch.no_grad()
def gather_full(sae: BaseSAE) -> BaseSAE:
    """The whole SAE from its shards (every rank of the replica group calls this; each gets a
    copy). For small SAEs, tests and export; wide ones are exported with save_sharded."""
    ctx = sae.context
    sizes = [ctx.shard_range(sae.d_sae, s) for s in range(ctx.shards)]
    width = max(e - s for s, e in sizes)
    state = {}
    for name, t in sae.state_dict().items():
        dim = sae.latent_dims.get(name)
        if dim is None:
            state[name] = t.clone()
            continue
        rows = t.movedim(dim, 0)  # latent-major
        padded = torch.cat([rows, rows.new_zeros((width - rows.shape[0], *rows.shape[1:]))])
        parts = all_gather(padded, getattr(ctx, "replica_group", None), f"gathering {name} from the shards")
        full = torch.cat([p[: e - s] for p, (s, e) in zip(parts, sizes)])
        state[name] = full.movedim(0, dim).contiguous()
    whole = build_sae(sae.cfg, init=False)
    whole.load_state_dict(state)
    whole.l1_decoder_norm = sae.l1_decoder_norm
    return whole


class _ShardedSAEType(type):
    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, BaseSAE) and obj.sharded

    def __call__(cls, cfg: SAEConfig, layout: ParallelContext | None = None, seed: int | None = 0,
                 init: bool = True) -> BaseSAE:
        return build_sae(cfg, layout, seed=seed, init=init)


class ShardedSAE(metaclass=_ShardedSAEType):
    """`ShardedSAE(cfg, layout, seed)` builds this rank's slice of the SAE `cfg` describes (the
    architecture's own class with the layout as its context: fastsae.build_sae(cfg, layout));
    `ShardedSAE.from_full(sae, layout)` slices a whole one; isinstance(m, ShardedSAE) says
    whether m is one shard of several."""

    from_full = staticmethod(shard_of)


__all__ = ["ShardedSAE", "shard_of", "gather_full"]
