"""Loss terms beyond what the SAE modules compute: reconstruction scores and AuxK.

The modules' `training_forward` already returns MSE, FVU and the architecture's sparsity
penalty (L1 weighted by decoder row norms for ReLU SAEs, not divided by d_sae, so a
coefficient means the same at every width; the JumpReLU L0 with its straight-through
estimator). AuxK (Gao et al. 2024) is here because it needs the trainer's record of which
latents are dead.
"""

from __future__ import annotations

import torch


def mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared error summed over features, averaged over rows (the SAELens convention)."""
    return (x_hat.float() - x.float()).pow(2).sum(-1).mean()


def total_variance(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)


def fvu(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: squared error / variance of x about its batch mean."""
    return (x_hat.float() - x.float()).pow(2).sum() / total_variance(x)


def relative_reconstruction_bias(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """γ = E‖x̂‖² / E⟨x̂, x⟩, the scale that best maps x̂ onto x (Wright & Sharkey 2024):
    γ < 1 means the SAE shrinks its reconstructions."""
    x_hat, x = x_hat.float(), x.float()
    dot = float((x_hat * x).sum())
    return float(x_hat.pow(2).sum()) / dot if dot != 0 else float("nan")


@torch.no_grad()
def top_dead_latents(x_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                     dead: torch.Tensor, k_aux: int, chunk: int = 8192, topk_encode=None) -> torch.Tensor:
    """Indices [B, k'] (k' = min(k_aux, #dead)) of each row's largest pre-activations among
    the `dead` latent ids, found chunk by chunk so no [B, #dead] tensor is held.

    Few dead latents: their W_enc columns are gathered. Many (over a quarter of d_sae, as
    early in a wide run): contiguous column blocks are scanned with live latents masked
    out, which skips the gather copies; given a `topk_encode` op (fastsae.ops signature), that
    scan is one call of it with the live latents' biases set to -inf. The ops of the fast
    backends hold O(B·k) (any k: the triton op goes chunked past its fused kernel's limit);
    the reference's builds [B, d_sae], so with it the scan stays chunked here."""
    from .ops import reference

    n = W_enc.shape[1]
    k_aux = min(k_aux, dead.numel())
    best_v = x_in.new_empty(x_in.shape[0], 0)
    best_i = dead.new_empty(x_in.shape[0], 0)
    scan = dead.numel() * 4 > n
    if scan:
        is_dead = torch.zeros(n, dtype=torch.bool, device=dead.device)
        is_dead[dead] = True
        if topk_encode is not None and topk_encode is not reference.topk_encode:
            masked_bias = b_enc.masked_fill(~is_dead, float("-inf"))
            return topk_encode(x_in, W_enc, masked_bias, None, k_aux)[1]
    step = max(chunk, k_aux)  # a chunk holds at least k_aux latents, so each merge is of [B, 2·k_aux]
    for start in range(0, n if scan else dead.numel(), step):
        if scan:
            stop = min(start + step, n)
            pre = torch.addmm(b_enc[start:stop], x_in, W_enc[:, start:stop])
            pre.masked_fill_(~is_dead[start:stop], float("-inf"))
        else:
            ids = dead[start:start + step]
            pre = torch.addmm(b_enc[ids], x_in, W_enc[:, ids])
        v, pos = pre.topk(min(k_aux, pre.shape[1]), dim=1)
        i = pos + start if scan else ids[pos]
        best_v, keep = torch.cat([best_v, v], 1).topk(min(k_aux, best_v.shape[1] + v.shape[1]), dim=1)
        best_i = torch.cat([best_i, i], 1).gather(1, keep)
    return best_i


@torch.no_grad()
def top_dead_preacts(x_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, dead: torch.Tensor, k: int,
                     topk_encode, chunk_bytes: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) [B, k'] (k' = min(k, #dead)): each row's k' largest ReLU'd pre-activations
    among the `dead` latent ids, and which. The dead latents' encoder columns are gathered a
    chunk at a time (at most `chunk_bytes`) and scanned by the `topk_encode` op (fastsae.ops
    signature), so the work is the encoder GEMM over the dead columns only and no [B, #dead]
    tensor is held."""
    k = min(k, dead.numel())
    best_v = x_in.new_empty(x_in.shape[0], 0)
    best_i = dead.new_empty(x_in.shape[0], 0)
    if k == 0:
        return best_v, best_i
    step = max(k, chunk_bytes // max(1, W_enc.shape[0] * W_enc.element_size()))
    for start in range(0, dead.numel(), step):
        ids = dead[start:start + step]
        v, pos = topk_encode(x_in, W_enc[:, ids], b_enc[ids], None, min(k, ids.numel()))
        if start == 0 and ids.numel() == dead.numel():
            return v, ids[pos]
        best_v, keep = torch.cat([best_v, v], 1).topk(min(k, best_v.shape[1] + v.shape[1]), dim=1)
        best_i = torch.cat([best_i, ids[pos]], 1).gather(1, keep)
    return best_v, best_i


def auxk_loss(x_in: torch.Tensor, residual: torch.Tensor, idx: torch.Tensor, W_enc: torch.Tensor,
              b_enc: torch.Tensor, W_dec: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """AuxK: reconstruct the main model's (detached) residual from the chosen dead latents.

    idx [B, k'] indexes the latent dimension of W_enc [d, m], b_enc [m], W_dec [m, d] (the
    full parameters, or gathered copies of the touched latents); the gradient reaches both
    the encoder (through the pre-activations) and the decoder. Normalised by the residual's
    variance, so it reads like an FVU, and scaled by min(#dead / k_aux, 1) by the caller.
    """
    residual = residual.detach().float()
    pre = torch.einsum("bd,dbk->bk", x_in.to(W_enc.dtype), W_enc[:, idx]) + b_enc[idx]
    recon = torch.einsum("bk,bkd->bd", pre.relu(), W_dec[idx]).float()
    return scale * (recon - residual).pow(2).sum() / total_variance(residual)
