"""TopK SAE (Gao et al. 2024): each row keeps its k largest pre-activations."""

from __future__ import annotations

from .. import ops
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
        x_in, b_dec = self.encoder_args(x2)
        k = self.cfg.k
        vals, idx = self.op("topk_encode")(x_in, self.W_enc, self.b_enc, b_dec, min(k, self.d_sae_local))
        return self._merge(vals, idx)

    def select_for_training(self, x2, dead, k_aux: int):
        """One pass over the pre-activations for both selections (op topk_encode_dead) where the
        backend that runs topk_encode has it; otherwise BaseSAE's two passes."""
        fused = "topk_encode_dead"
        if dead is None or ops.provider(fused, self.backend, self.device) != \
                ops.provider("topk_encode", self.backend, self.device):
            return super().select_for_training(x2, dead, k_aux)
        mine = self.local_dead(dead)
        x_in, b_dec = self.encoder_args(x2)
        vals, idx, dead_vals, dead_ids = self.op(fused)(x_in, self.W_enc, self.b_enc, b_dec,
                                                        min(self.cfg.k, self.d_sae_local), mine, k_aux)
        return self._merge(vals, idx), (dead_vals, dead_ids)

    def _merge(self, vals, idx) -> Selection:
        k = self.cfg.k
        width = min(k, self.context.widest_shard(self.d_sae))
        return self.context.merge_topk(vals, idx, k, self.shard_start, width, self.d_sae)
