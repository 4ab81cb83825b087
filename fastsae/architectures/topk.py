"""TopK SAE (Gao et al. 2024): each row keeps its k largest pre-activations."""

from __future__ import annotations

from ..init import TOPK_ENCODER_INIT_SCALE
from ..sae import BaseSAE, register
from ..sparse import Selection


@register
class TopKSAE(BaseSAE):
    """Keeps the k largest pre-activations of every row, then ReLU. A shard selects its own
    top-k; the shards' candidates are merged into the exact global top-k."""

    architecture = "topk"
    takes_sparse_path = True
    needs_k = True
    encoder_init_scale = TOPK_ENCODER_INIT_SCALE

    def select(self, x2, train: bool = False) -> Selection:
        x_in = self.encoder_input(x2)
        k = self.cfg.k
        vals, idx = self.op("topk_encode")(x_in, self.W_enc, self.b_enc, None, min(k, self.d_sae_local))
        width = min(k, self.context.widest_shard(self.d_sae))
        return self.context.merge_topk(vals, idx, k, self.shard_start, width, self.d_sae)
