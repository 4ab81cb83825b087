"""TopK encoder, second strategy: a GEMM per latent chunk, then a filter and a merge against
per-row running thresholds (the GEMM + k-select shape of FAISS and cuVS).

For each chunk of C latents, cuBLAS (torch.addmm) writes the chunk's pre-activations
[B, C] into a buffer that stays small (its size is chosen, not [B, d_sae]); a Triton kernel
keeps, per row, only the entries above the row's running threshold (its current k-th best)
as a compact record [B, k] with a count; torch then merges the record into the running top-k
of the rows that have candidates. The first chunk seeds the running top-k with torch.topk.
A row with more than k candidates in a chunk (early chunks, adversarial data) is merged from
its whole chunk row instead: the result is exact either way.

Memory O(B·(C + k)); any k (the fused kernel holds its buffer in registers and stops at
MAX_K). The pre-activations are rounded to the storage dtype by the GEMM, as torch's
addmm + topk rounds them; the fused kernel keeps fp32, so half-precision near-ties may differ.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .preact_tile import interpreted, row_offsets, vector

_FILTER_BLOCK = {"BLOCK_B": 16, "BLOCK_N": 256}  # one pass over [16, 256] tiles of the chunk
_CPU_FILTER_BLOCK = {"BLOCK_B": 8, "BLOCK_N": 16}
# [B, C] buffer budget on a GPU: 2^25 elements (64 MiB in bf16, a third of an H200's L2 is 20 MiB;
# the buffer is written once and read once, so it may also stream through HBM).
_BUFFER_ELEMENTS = 1 << 25


@triton.jit
def _filter_kernel(
    pre_ptr, thr_ptr, rec_v_ptr, rec_i_ptr, count_ptr,
    B, C, CAP, col0, stride_pb,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per row: the chunk's entries above thr[row], in latent order, into rec[row, :CAP];
    count[row] = how many there were (may exceed CAP: the caller then merges the whole row)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    thr = tl.load(thr_ptr + rows, mask=row_ok, other=float("inf"))
    base = row_offsets(rows, stride_pb)
    rec = row_offsets(rows, CAP)
    count = tl.zeros((BLOCK_B,), dtype=tl.int32)
    for n0 in range(0, C, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        ok = row_ok[:, None] & (cols < C)[None, :]
        p = tl.load(pre_ptr + base[:, None] + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        hit = ok & (p > thr[:, None])
        h = hit.to(tl.int32)
        pos = count[:, None] + tl.cumsum(h, axis=1) - 1
        keep = hit & (pos < CAP)
        tl.store(rec_v_ptr + rec[:, None] + pos, p, mask=keep)
        tl.store(rec_i_ptr + rec[:, None] + pos, (col0 + cols)[None, :] + tl.zeros_like(pos), mask=keep)
        count += tl.sum(h, axis=1)
    tl.store(count_ptr + rows, count, mask=row_ok)


def chunk_size(B: int, N: int, k: int) -> int:
    """Latents per chunk: the [B, C] buffer within _BUFFER_ELEMENTS, at least max(k, 1024)
    (a chunk narrower than k cannot seed the top-k), a multiple of 256, at most N."""
    c = max(k, 1024, _BUFFER_ELEMENTS // max(B, 1))
    return min(N, triton.cdiv(c, 256) * 256)


def filter_above(pre: torch.Tensor, thr: torch.Tensor, cap: int, col0: int = 0):
    """(rec_v [B, cap] fp32, rec_i [B, cap] int32, count [B] int32): each row's entries of
    `pre` [B, C] (unit column stride) above thr [B], in column order, ids offset by col0."""
    B, C = pre.shape
    rec_v = torch.full((B, cap), float("-inf"), dtype=torch.float32, device=pre.device)
    rec_i = torch.zeros((B, cap), dtype=torch.int32, device=pre.device)
    count = torch.zeros((B,), dtype=torch.int32, device=pre.device)
    if B > 0 and C > 0:
        blocks = _CPU_FILTER_BLOCK if interpreted() else _FILTER_BLOCK
        grid = (triton.cdiv(B, blocks["BLOCK_B"]),)
        _filter_kernel[grid](pre, thr.contiguous(), rec_v, rec_i, count, B, C, cap, col0, pre.stride(0), **blocks)
    return rec_v, rec_i, count


def topk_encode_chunked(x, W_enc, b_enc, b_dec, k: int, chunk: int | None = None, raw: bool = False):
    """Same contract as topk_encoder.topk_encode (values [B,k] post-ReLU in x's dtype and
    indices [B,k] int64, sorted descending; raw=True: fp32 pre-activations, no ReLU), for any
    k in [1, d_sae]."""
    if x.dim() != 2 or W_enc.dim() != 2 or x.shape[1] != W_enc.shape[0]:
        raise ValueError(f"topk_encode: x [B,d] and W_enc [d,n] needed, got {tuple(x.shape)} and {tuple(W_enc.shape)}")
    B, N = x.shape[0], W_enc.shape[1]
    if not 1 <= k <= N:
        raise ValueError(f"topk_encode: k={k} must be in [1, d_sae={N}]")
    C = max(k, min(N, chunk)) if chunk else chunk_size(B, N, k)
    b_enc = vector(b_enc)
    xin = x - b_dec if b_dec is not None else x
    best_v = best_i = None
    for c0 in range(0, N, C):
        c1 = min(N, c0 + C)
        pre = torch.addmm(b_enc[c0:c1], xin, W_enc[:, c0:c1])
        if best_v is None:  # the first chunk holds >= k latents (C >= k): it seeds the top-k
            best_v, best_i = pre.float().topk(k, dim=1)
            continue
        rec_v, rec_i, count = filter_above(pre, best_v[:, -1], k, c0)
        rows = (count > 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        cand_v, cand_i = rec_v[rows], rec_i[rows].long()
        over = (count[rows] > k).nonzero().squeeze(1)
        if over.numel():  # more candidates than the record holds: the row's whole chunk
            v, i = pre[rows[over]].float().topk(min(k, c1 - c0), dim=1)
            cand_v[over, : v.shape[1]], cand_i[over, : v.shape[1]] = v, i + c0
        merged_v, at = torch.cat([best_v[rows], cand_v], 1).topk(k, dim=1)
        best_i[rows] = torch.cat([best_i[rows], cand_i], 1).gather(1, at)
        best_v[rows] = merged_v
    if raw:
        return best_v, best_i
    return best_v.relu().to(x.dtype), best_i
