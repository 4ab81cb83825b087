"""Fused TopK encoder: per-row top-k of (x - b_dec) @ W_enc + b_enc without ever writing
the [B, d_sae] pre-activations.

Stage 1 (Triton): program (row block, latent split) walks its latent range tile by tile,
computes the tile's pre-activations with tensor-core dots, and merges them into a running
per-row top-k buffer held in registers. A tile costs one compare per element unless some
row has an entry above its current k-th value; only those entries are inserted, one per
row per step (max-of-tile replaces min-of-buffer), so the work is exact and proportional
to the number of real candidates.
Stage 2 (torch): the S splits' candidates [B, S*k] are reduced to the final top-k, sorted
descending like torch.topk, ReLU'd; fire counts come from the kept indices. Extra memory is
O(S * B * k).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .preact_tile import (
    batch_bucket,
    configs,
    dot_precision,
    fitting,
    interpreted,
    preact_tile,
    register_budget,
    row_offsets,
    upcast,
    vector,
)

# Larger k keeps too many registers per row; callers fall back to mm + topk beyond it.
MAX_K = 512

_GPU_CONFIGS = [
    triton.Config({"BLOCK_B": bb, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=s)
    for bb, bn, bd, w, s in [
        (64, 128, 64, 4, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3),
        # (128, 64, 64, 4, 4) removed: spills at every K_PAD once launch-specialised (88 B at K_PAD=8)
        (32, 128, 64, 4, 4), (64, 64, 128, 4, 3),
        # spill-free at k = 128 on sm_90 (bench/kernels_sm90_compile.py): more warps per buffer
        (32, 128, 64, 8, 3), (64, 64, 64, 8, 3), (32, 64, 64, 8, 4),
    ]
]
_CPU_CONFIG = triton.Config({"BLOCK_B": 16, "BLOCK_N": 32, "BLOCK_D": 16})


# B_BUCKET (the batch size's power-of-two bucket) is in the key: the best tile depends on
# how many row blocks fill the GPU. SPLITS is a runtime argument, not a constexpr: a new
# split count must not recompile every config.
# Live words per CTA: the [BLOCK_B, BLOCK_N] pre-activation tile and the [BLOCK_B, K_PAD]
# value + index buffers. Configs over the register budget for this K_PAD and dtype are pruned.
@triton.autotune(configs=configs(_GPU_CONFIGS, _CPU_CONFIG), key=["D", "N", "K_PAD", "B_BUCKET"],
                 reset_to_zero=[], prune_configs_by={"early_config_prune": register_budget(
                     lambda m: m["BLOCK_B"] * (m["BLOCK_N"] + 2 * m["K_PAD"]))})
@triton.jit
def _topk_partial_kernel(
    x_ptr, bdec_ptr, w_ptr, benc_ptr, cand_v_ptr, cand_i_ptr,
    B, D, N, K, SPLITS, B_BUCKET,
    stride_xb, stride_xd, stride_wd, stride_wn,
    HAS_BDEC: tl.constexpr, K_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    slots = tl.arange(0, K_PAD)
    # Slots >= K hold +inf so they are never the minimum, i.e. never replaced or read back.
    buf_v = tl.where(slots[None, :] < K, float("-inf"), float("inf")) + tl.zeros((BLOCK_B, K_PAD), tl.float32)
    buf_i = tl.zeros((BLOCK_B, K_PAD), dtype=tl.int32)
    kth = tl.min(buf_v, axis=1)

    per_split = tl.cdiv(tl.cdiv(N, SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, N)
    lanes = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + lanes
        pre = preact_tile(x_ptr, bdec_ptr, w_ptr, benc_ptr, rows, cols, B, D, N,
                          stride_xb, stride_xd, stride_wd, stride_wn,
                          HAS_BDEC, BLOCK_B, BLOCK_N, BLOCK_D, DOT_PRECISION, UPCAST)
        valid = row_ok[:, None] & (cols < end)[None, :]
        # Candidates: entries above their row's current k-th value; all others are -inf.
        cand = tl.where(valid & (pre > kth[:, None]), pre, float("-inf"))
        more = tl.max(tl.max(cand, axis=1), axis=0) > float("-inf")
        while more:
            best, at = tl.max(cand, axis=1, return_indices=True)
            take = best > float("-inf")
            slot = tl.argmin(buf_v, axis=1)
            hit = take[:, None] & (slots[None, :] == slot[:, None])
            buf_v = tl.where(hit, best[:, None], buf_v)
            buf_i = tl.where(hit, (n0 + at)[:, None], buf_i)
            kth = tl.min(buf_v, axis=1)
            cand = tl.where((lanes[None, :] == at[:, None]) | (cand <= kth[:, None]), float("-inf"), cand)
            more = tl.max(tl.max(cand, axis=1), axis=0) > float("-inf")

    # Candidates of split s for row r live at [r, s*K : (s+1)*K].
    out = row_offsets(rows, SPLITS * K)[:, None] + split * K + slots[None, :]
    keep = row_ok[:, None] & (slots[None, :] < K)
    tl.store(cand_v_ptr + out, buf_v, mask=keep)
    tl.store(cand_i_ptr + out, buf_i, mask=keep)


def _num_splits(B: int, N: int, K: int, device: torch.device) -> int:
    """Latent splits so that (row blocks x splits) fills the GPU about twice, each split
    still spanning many tiles (else the per-split top-k warm-up dominates)."""
    if interpreted() or device.type != "cuda":
        return 2 if N >= 64 else 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(B, 64)
    want = triton.cdiv(2 * sms, row_blocks)
    most = max(1, N // max(16 * K, 2048))
    return int(max(1, min(want, most, 64)))


def topk_encode(x, W_enc, b_enc, b_dec, k: int, splits: int | None = None, return_counts: bool = False,
                raw: bool = False):
    """(values [B,k] post-ReLU, indices [B,k] int64), sorted descending per row, plus the
    per-latent fire counts [d_sae] int64 (times selected with value > 0) if return_counts.
    raw=True returns the fp32 pre-activations instead (no ReLU, no rounding to x's dtype)."""
    if x.dim() != 2 or W_enc.dim() != 2 or x.shape[1] != W_enc.shape[0]:
        raise ValueError(f"topk_encode: x [B,d] and W_enc [d,n] needed, got {tuple(x.shape)} and {tuple(W_enc.shape)}")
    B, D = x.shape
    N = W_enc.shape[1]
    if not 1 <= k <= N:
        raise ValueError(f"topk_encode: k={k} must be in [1, d_sae={N}]")
    if k > MAX_K:
        raise ValueError(f"topk_encode: the fused kernel supports k <= {MAX_K}, got k={k}: use "
                         "topk_chunked.topk_encode_chunked (the triton backend switches to it by itself)")
    S = splits or _num_splits(B, N, k, x.device)
    b_enc, b_dec = vector(b_enc), vector(b_dec)
    cand_v = torch.empty((B, S * k), dtype=torch.float32, device=x.device)
    cand_i = torch.empty((B, S * k), dtype=torch.int32, device=x.device)
    if B > 0:
        grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), S)  # noqa: E731
        _topk_partial_kernel[grid](
            x, b_dec if b_dec is not None else b_enc, W_enc, b_enc, cand_v, cand_i,
            B, D, N, k, S, batch_bucket(B),
            x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1),
            HAS_BDEC=b_dec is not None, K_PAD=triton.next_power_of_2(k),
            DOT_PRECISION=dot_precision(W_enc.dtype), UPCAST=upcast(W_enc.dtype),
        )
    top_v, at = cand_v.topk(k, dim=1)
    indices = cand_i.gather(1, at).long()
    if raw:
        return top_v, indices
    values = top_v.relu().to(x.dtype)
    if not return_counts:
        return values, indices
    counts = torch.bincount(indices[values > 0], minlength=N)
    return values, indices, counts


# ------------------------------------------------------------------ choosing a strategy
STRATEGIES = ("fused", "chunked")


def fused_fits(k: int, dtype: torch.dtype) -> bool:
    """Whether some GPU config of the fused kernel holds a top-k buffer of k in registers
    without spilling for storage `dtype` (fp32 at k > 256 does not: bench/kernels_sm90_compile.py)."""
    words = _topk_partial_kernel.early_config_prune.words
    return bool(fitting(_GPU_CONFIGS, words, dtype, K_PAD=triton.next_power_of_2(k))[0])


def choose_strategy(B: int, D: int, N: int, k: int, dtype: torch.dtype = torch.bfloat16) -> str:
    """"fused" (this file's kernel) or "chunked" (topk_chunked: cuBLAS GEMM per latent chunk +
    filter/merge). FASTSAE_TOPK_STRATEGY=fused|chunked overrides it (benchmarks, tests).

    Provisional, from arithmetic alone (no GPU has measured either yet): k > MAX_K can only be
    chunked; with many rows and a wide d_in the GEMM dominates and the chunked path pays
    ~4 bytes per pre-activation against 2·d_in FLOPs of cuBLAS GEMM per element (< 10 % of it
    at d_in >= 2048), while the fused kernel's register-resident top-k limits its tiles
    (estimated 35-60 % of cuBLAS). Small batches or a narrow d_in keep the fused kernel, which
    never writes the pre-activations, unless no config of it fits k for `dtype` in registers.
    bench/gpu_check.sh measures both to replace this rule."""
    forced = os.environ.get("FASTSAE_TOPK_STRATEGY", "")
    if forced:
        if forced not in STRATEGIES:
            raise ValueError(f"FASTSAE_TOPK_STRATEGY={forced!r}: use one of {', '.join(STRATEGIES)}")
        return "chunked" if k > MAX_K else forced
    if k > MAX_K or not (interpreted() or fused_fits(k, dtype)):
        return "chunked"
    return "chunked" if B >= 2048 and D >= 2048 else "fused"


def encode(x, W_enc, b_enc, b_dec, k: int, strategy: str | None = None, raw: bool = False):
    """topk_encode by the strategy `choose_strategy` picks (or `strategy`): same contract."""
    from .topk_chunked import topk_encode_chunked

    B, D = x.shape
    strategy = strategy or choose_strategy(B, D, W_enc.shape[1], k, W_enc.dtype)
    if strategy == "chunked":
        return topk_encode_chunked(x, W_enc, b_enc, b_dec, k, raw=raw)
    return topk_encode(x, W_enc, b_enc, b_dec, k, raw=raw)
