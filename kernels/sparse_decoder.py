"""Sparse decoder: x_hat[b] = Σ_s values[b,s] · W_dec[indices[b,s]] + b_dec, fp32
accumulation, any d_in; optionally fused with the residual against x and the per-row
squared error (so a training step never re-reads x_hat to score it).

Program (row block, d block) gathers the k decoder rows of each of its rows, one slot at
a time, restricted to its d block: each W_dec element read is used once per (row, slot),
which is the minimum for a gather.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .preact_tile import batch_bucket, configs, vector

_GPU_CONFIGS = [
    triton.Config({"BLOCK_B": bb, "BLOCK_D": bd}, num_warps=w)
    for bb, bd, w in [(16, 128, 4), (32, 128, 4), (16, 256, 4), (32, 256, 8), (64, 128, 8), (8, 512, 4)]
]
_CPU_CONFIG = triton.Config({"BLOCK_B": 16, "BLOCK_D": 16})


# The smallest BLOCK_D of the configs: the squared error is written per (row, d block), at
# most cdiv(D, _MIN_BLOCK_D) partial sums a row, and summed in a fixed order afterwards.
_MIN_BLOCK_D = min(c.kwargs["BLOCK_D"] for c in configs(_GPU_CONFIGS, _CPU_CONFIG))


@triton.autotune(configs=configs(_GPU_CONFIGS, _CPU_CONFIG), key=["D", "K", "B_BUCKET"])
@triton.jit
def _sparse_decode_kernel(
    val_ptr, idx_ptr, w_ptr, bdec_ptr, x_ptr, out_ptr, sq_ptr,
    B, D, K, B_BUCKET,
    stride_vb, stride_vk, stride_ib, stride_ik, stride_wn, stride_wd,
    stride_xb, stride_xd, stride_ob, stride_od, stride_sb,
    HAS_BDEC: tl.constexpr, HAS_X: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rows64 = rows.to(tl.int64)  # B * d_in may pass 2^31
    pid_d = tl.program_id(1)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < B
    d_ok = ds < D
    both = row_ok[:, None] & d_ok[None, :]
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for s in range(0, K):
        v = tl.load(val_ptr + rows64 * stride_vb + s * stride_vk, mask=row_ok, other=0.0).to(tl.float32)
        j = tl.load(idx_ptr + rows64 * stride_ib + s * stride_ik, mask=row_ok, other=0).to(tl.int64)
        w = tl.load(w_ptr + j[:, None] * stride_wn + ds[None, :] * stride_wd, mask=both, other=0.0)
        acc += v[:, None] * w.to(tl.float32)
    if HAS_BDEC:
        acc += tl.load(bdec_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows64[:, None] * stride_ob + ds[None, :] * stride_od, acc, mask=both)
    if HAS_X:
        x = tl.load(x_ptr + rows64[:, None] * stride_xb + ds[None, :] * stride_xd, mask=both, other=0.0)
        err = tl.where(both, acc - x.to(tl.float32), 0.0)
        # one partial sum per (row, d block), no float atomics: the total is deterministic
        tl.store(sq_ptr + rows64 * stride_sb + pid_d, tl.sum(err * err, axis=1), mask=row_ok)


def sparse_decode(values, indices, W_dec, b_dec=None, x=None, out_dtype=None):
    """x_hat [B, d] in `out_dtype` (default W_dec's). With x given, returns (x_hat, sq_err)
    where sq_err [B] fp32 = Σ_d (x_hat - x)², computed from the fp32 accumulator."""
    if values.shape != indices.shape or values.dim() != 2:
        raise ValueError(f"sparse_decode: values and indices must both be [B, k], got "
                         f"{tuple(values.shape)} and {tuple(indices.shape)}")
    B, K = values.shape
    D = W_dec.shape[1]
    out = torch.empty((B, D), dtype=out_dtype or W_dec.dtype, device=W_dec.device)
    parts = triton.cdiv(D, _MIN_BLOCK_D) if x is not None else 1
    sq = torch.zeros((B, parts) if x is not None else (1, 1), dtype=torch.float32, device=W_dec.device)
    b_dec = vector(b_dec)
    if B > 0 and D > 0:
        xx = x if x is not None else out
        grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(D, meta["BLOCK_D"]))  # noqa: E731
        _sparse_decode_kernel[grid](
            values, indices, W_dec, b_dec if b_dec is not None else W_dec, xx, out, sq,
            B, D, K, batch_bucket(B),
            values.stride(0), values.stride(1), indices.stride(0), indices.stride(1),
            W_dec.stride(0), W_dec.stride(1), xx.stride(0), xx.stride(1), out.stride(0), out.stride(1),
            sq.stride(0),
            HAS_BDEC=b_dec is not None, HAS_X=x is not None,
        )
    return (out, sq.sum(1)) if x is not None else out
