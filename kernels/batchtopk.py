"""BatchTopK selection: the B*k largest activations of a whole batch, exact, built on the
fused TopK encoder, without the [B, d_sae] activations.

Why per-row candidates suffice, and when they do not: let row r contribute its top k_r
pre-activations (k_r >= k, so there are >= B*k candidates) and let t be the (B*k)-th largest
candidate. A latent missing from the candidates of row r is below all k_r candidates of r.
If it belonged to the true global top B*k, every candidate of r would be in it too, i.e.
>= t. So if no row is *saturated* (all its candidates kept: its smallest >= t and > 0, with
k_r < d_sae), the candidates hold the whole true top B*k and t is the true threshold.
Saturated rows get a wider per-row top-k (x4) and the check repeats; rows that would need
k_r > MAX_K get their full pre-activation row from a plain GEMM (only those rows). Each
round only widens rows that can still gain, so it ends, usually after one round.
"""

from __future__ import annotations

import torch

from .topk_encoder import MAX_K, topk_encode


def _row_candidates(x, W_enc, b_enc, b_dec, k: int):
    """fp32 pre-activations of each row's top k, sorted descending, and their indices."""
    if k <= MAX_K:
        return topk_encode(x, W_enc, b_enc, b_dec, k, raw=True)
    xin = x - b_dec if b_dec is not None else x
    pre = (xin @ W_enc + b_enc).float()
    return pre.topk(k, dim=1)


def batchtopk_encode(x, W_enc, b_enc, b_dec, k: int, max_rounds: int = 16):
    """(values [B, m], indices [B, m]): per row the kept activations (> 0, among the batch's
    B*k largest), sorted descending, padded with value 0 (index 0) to the longest row m."""
    B, N = x.shape[0], W_enc.shape[1]
    keep = min(k * B, B * N)
    if B == 0 or keep == 0:
        empty = x.new_zeros((B, 0))
        return empty, empty.long()
    width = min(k, N)
    vals, idx = _row_candidates(x, W_enc, b_enc, b_dec, width)
    row_k = torch.full((B,), width, dtype=torch.long, device=x.device)
    for _ in range(max_rounds):
        # Unfilled slots of narrow rows hold -inf, below every real candidate.
        t = vals.flatten().topk(keep).values[-1]
        smallest = vals.gather(1, (row_k - 1).unsqueeze(1)).squeeze(1)
        saturated = (row_k < N) & (smallest > 0) & (smallest >= t)
        if not bool(saturated.any()):
            break
        rows = saturated.nonzero().squeeze(1)
        new_k = min(N, 4 * int(row_k[rows].max()))
        v_new, i_new = _row_candidates(x[rows], W_enc, b_enc, b_dec, new_k)
        if new_k > vals.shape[1]:
            pad = new_k - vals.shape[1]
            vals = torch.cat([vals, vals.new_full((B, pad), float("-inf"))], dim=1)
            idx = torch.cat([idx, idx.new_zeros((B, pad))], dim=1)
        vals[rows, :new_k] = v_new
        idx[rows, :new_k] = i_new
        row_k[rows] = new_k
    else:
        raise RuntimeError(f"batchtopk_encode: selection did not settle in {max_rounds} rounds")
    kept = (vals >= t) & (vals > 0)
    m = int(kept.sum(1).max())
    # Rows are sorted descending, so each row's kept entries are a prefix.
    values = torch.where(kept[:, :m], vals[:, :m], 0.0).to(x.dtype)
    indices = torch.where(kept[:, :m], idx[:, :m], 0)
    return values, indices
