"""ReLU / JumpReLU SAEs, fused encode -> activate -> decode (FlashAttention-shaped: x plays
Q, W_enc^T K, W_dec V, the activation replaces the softmax).

Program (row block, output-column block) walks all latent tiles: computes the tile's
pre-activations, keeps pre where pre > threshold (threshold 0 = ReLU, a per-latent vector =
JumpReLU, a scalar = BatchTopK inference), multiplies the tile straight into its block of
the reconstruction, and (output block 0 only) appends the active latents to a
capacity-bounded per-row record and sums L0 and a weighted L1. The [B, d_sae] activations
are never written.

For d_in > FUSED_MAX_D the decode is not fused: the record is decoded by the sparse decoder
instead of re-running the encoder once per output block.

The record is exact or absent, never silently truncated: the kernel counts every active
latent even past the capacity; when a count exceeds it, the wrapper reruns the record with
capacity = the largest count (the reconstruction never depends on the record).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .preact_tile import (
    batch_bucket,
    configs,
    dot_precision,
    interpreted,
    preact_tile,
    register_budget,
    row_offsets,
    upcast,
    vector,
)
from .sparse_decoder import sparse_decode

_GPU_CONFIGS = [
    triton.Config({"BLOCK_B": bb, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=s)
    for bb, bn, bd, w, s in [
        (64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (32, 64, 64, 4, 4),
        # fewer registers per thread for the [BLOCK_B, BLOCK_DOUT] accumulator (see
        # bench/results/kernels_sm90_compile.txt: the configs above spill at BLOCK_DOUT=256)
        (32, 64, 64, 8, 3), (32, 32, 64, 8, 3), (64, 32, 64, 8, 3), (16, 64, 64, 4, 3),
    ]
]
_CPU_CONFIG = triton.Config({"BLOCK_B": 16, "BLOCK_N": 32, "BLOCK_D": 16})


# Live words per CTA: the [BLOCK_B, BLOCK_N] tile and its activated copy and, fused, the
# [BLOCK_B, BLOCK_DOUT] output and the decoder operand (x2: the compile check showed the
# single-count model keeping a config that spills 744 B at BLOCK_DOUT=128).
@triton.autotune(configs=configs(_GPU_CONFIGS, _CPU_CONFIG),
                 key=["D", "N", "B_BUCKET", "BLOCK_DOUT", "FUSE_DECODE"], reset_to_zero=[],
                 prune_configs_by={"early_config_prune": register_budget(
                     lambda m: m["BLOCK_B"] * 2 * (m["BLOCK_N"] + (m["BLOCK_DOUT"] if m["FUSE_DECODE"] else 0)))})
@triton.jit
def _fused_threshold_kernel(
    x_ptr, bdec_in_ptr, wenc_ptr, benc_ptr, th_ptr, l1w_ptr, wdec_ptr, bdec_out_ptr,
    out_ptr, rec_v_ptr, rec_i_ptr, count_ptr, l1_ptr,
    B, D, N, CAP, B_BUCKET,
    stride_xb, stride_xd, stride_ed, stride_en, stride_th, stride_dn, stride_dd, stride_ob, stride_od,
    HAS_BDEC_IN: tl.constexpr, HAS_L1W: tl.constexpr, FUSE_DECODE: tl.constexpr,
    HAS_BDEC_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_DOUT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    pid_d = tl.program_id(1)
    # One output block per row block writes the record and the sums (a vector: masks must be).
    records = (tl.zeros((BLOCK_B,), dtype=tl.int32) + pid_d) == 0
    douts = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    dout_ok = douts < D
    count = tl.zeros((BLOCK_B,), dtype=tl.int32)
    l1 = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_B, BLOCK_DOUT), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        pre = preact_tile(x_ptr, bdec_in_ptr, wenc_ptr, benc_ptr, rows, cols, B, D, N,
                          stride_xb, stride_xd, stride_ed, stride_en,
                          HAS_BDEC_IN, BLOCK_B, BLOCK_N, BLOCK_D, DOT_PRECISION, UPCAST)
        th = tl.load(th_ptr + cols * stride_th, mask=col_ok, other=0.0).to(tl.float32)
        active = row_ok[:, None] & col_ok[None, :] & (pre > th[None, :])
        act = tl.where(active, pre, 0.0)
        if FUSE_DECODE:
            wd = tl.load(wdec_ptr + cols.to(tl.int64)[:, None] * stride_dn + douts[None, :] * stride_dd,
                         mask=col_ok[:, None] & dout_ok[None, :], other=0.0)
            if UPCAST:
                wd = wd.to(tl.float32)
            acc = tl.dot(act.to(wd.dtype), wd, acc, input_precision=DOT_PRECISION)
        # Append the active latents of each row after those already recorded, in latent order.
        hits = active.to(tl.int32)
        pos = count[:, None] + tl.cumsum(hits, axis=1) - 1
        slot = row_offsets(rows, CAP)[:, None] + pos
        store = active & (pos < CAP) & records[:, None]
        tl.store(rec_v_ptr + slot, act, mask=store)
        tl.store(rec_i_ptr + slot, cols[None, :] + tl.zeros_like(pos), mask=store)
        count += tl.sum(hits, axis=1)
        if HAS_L1W:
            w1 = tl.load(l1w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            l1 += tl.sum(tl.abs(act) * w1[None, :], axis=1)
        else:
            l1 += tl.sum(tl.abs(act), axis=1)
    tl.store(count_ptr + rows, count, mask=row_ok & records)
    tl.store(l1_ptr + rows, l1, mask=row_ok & records)
    if FUSE_DECODE:
        if HAS_BDEC_OUT:
            acc += tl.load(bdec_out_ptr + douts, mask=dout_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_ob + douts[None, :] * stride_od, acc,
                 mask=row_ok[:, None] & dout_ok[None, :])


@dataclass
class FusedResult:
    """x_hat [B, d] (None without W_dec); values/indices [B, m]: each row's active latents in
    latent order, padded with value 0 (index 0) to m = the largest l0; l0 [B] int64;
    l1 [B] fp32 = Σ_j |act_j| · l1_weight_j; overflowed: the first capacity was too small and
    the record was recomputed (a hint to pass a larger capacity next time)."""

    x_hat: torch.Tensor | None
    values: torch.Tensor
    indices: torch.Tensor
    l0: torch.Tensor
    l1: torch.Tensor
    overflowed: bool


# Widest d_in decoded inside the encoder pass: the [BLOCK_B, d_in] accumulator must fit in
# registers. Wider SAEs record the active latents and decode them with the sparse decoder,
# which is also cheaper whenever l0 << d_sae (the usual case), and exact all the same.
FUSED_MAX_D = 256


def _out_block(D: int) -> int:
    """Output columns per program (under the interpreter 16, so tests cover several blocks)."""
    if interpreted():
        return 16
    return min(FUSED_MAX_D, max(16, triton.next_power_of_2(D)))


def _launch(x, W_enc, b_enc, b_dec_in, th, l1_weight, W_dec, b_dec_out, capacity: int, fuse: bool):
    B, D = x.shape
    N = W_enc.shape[1]
    dev = x.device
    rec_v = torch.zeros((B, capacity), dtype=x.dtype, device=dev)
    rec_i = torch.zeros((B, capacity), dtype=torch.int32, device=dev)
    count = torch.zeros((B,), dtype=torch.int32, device=dev)
    l1 = torch.zeros((B,), dtype=torch.float32, device=dev)
    out = torch.empty((B, D), dtype=x.dtype, device=dev) if fuse else rec_v
    b_enc, b_dec_in, l1_weight, b_dec_out = vector(b_enc), vector(b_dec_in), vector(l1_weight), vector(b_dec_out)
    dummy = b_enc
    bout = _out_block(D)
    if B > 0:
        grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(D, bout) if fuse else 1)  # noqa: E731
        wd = W_dec if fuse else W_enc
        _fused_threshold_kernel[grid](
            x, b_dec_in if b_dec_in is not None else dummy, W_enc, b_enc, th,
            l1_weight if l1_weight is not None else dummy, wd,
            b_dec_out if b_dec_out is not None else dummy,
            out, rec_v, rec_i, count, l1,
            B, D, N, capacity, batch_bucket(B),
            x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), th.stride(0),
            wd.stride(0), wd.stride(1), out.stride(0), out.stride(1),
            HAS_BDEC_IN=b_dec_in is not None, HAS_L1W=l1_weight is not None, FUSE_DECODE=fuse,
            HAS_BDEC_OUT=b_dec_out is not None, DOT_PRECISION=dot_precision(W_enc.dtype),
            UPCAST=upcast(W_enc.dtype), BLOCK_DOUT=bout,
        )
    return (out if fuse else None), rec_v, rec_i, count, l1


def fused_threshold(x, W_enc, b_enc, b_dec_in, threshold, W_dec=None, b_dec_out=None,
                    l1_weight=None, capacity: int | None = None) -> FusedResult:
    """Encode with act = pre·1[pre > threshold] (threshold: 0-dim or [d_sae]); with W_dec,
    also decode x_hat = act @ W_dec + b_dec_out in the same pass. See FusedResult."""
    B, N = x.shape[0], W_enc.shape[1]
    th = threshold.reshape(-1) if threshold.dim() else threshold.reshape(1)
    if th.numel() not in (1, N):
        raise ValueError(f"fused_threshold: threshold must be a scalar or [d_sae={N}], got {tuple(threshold.shape)}")
    th = th.expand(N)  # stride 0 for a scalar: one kernel for both cases
    cap = max(1, min(N, capacity if capacity is not None else 128))
    fuse = W_dec is not None and x.shape[1] <= FUSED_MAX_D
    x_hat, rec_v, rec_i, count, l1 = _launch(x, W_enc, b_enc, b_dec_in, th, l1_weight, W_dec, b_dec_out, cap, fuse)
    most = int(count.max()) if B > 0 else 0
    overflowed = most > cap
    if overflowed:  # the exact counts are known: rerun the record (only) at that capacity
        _, rec_v, rec_i, count, l1 = _launch(x, W_enc, b_enc, b_dec_in, th, l1_weight, None, None, most, False)
    values, indices = rec_v[:, :most], rec_i[:, :most]
    if W_dec is not None and not fuse:
        x_hat = sparse_decode(values, indices, W_dec, b_dec_out, out_dtype=x.dtype)
    return FusedResult(x_hat, values, indices.long(), count.long(), l1, overflowed)
