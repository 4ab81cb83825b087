"""Compact number formats for optimizer state and low-precision weights.

8-bit blockwise dynamic quantisation (the scheme of 8-bit optimizers, Dettmers et al. 2022,
"8-bit Optimizers via Block-wise Quantization"). A tensor seen as rows [R, C] is cut into
blocks along each row: a block never straddles two rows, so an optimizer that touches only
some rows (the latents that fired) re-quantises only their blocks. A block keeps its absolute
maximum (fp32) and one byte per value: the index of the nearest level of a fixed 255/256-entry
code over [-1, 1] (signed, for first moments) or [0, 1] (unsigned, for second moments). The
code is "dynamic": linear levels within each decade, most of them in the top decade, fewer in
each decade below, down to 1e-6 (signed) or 1e-7 (unsigned) of the block maximum, so a value
far below its block's maximum keeps a significant digit instead of rounding to zero. A
positive value never rounds to zero in the unsigned code (a second moment of zero would turn
a tiny first moment into an update of m/eps).

Stochastic rounding of fp32 to bf16/fp16 rounds to one of the two neighbours with
probabilities that make the result unbiased (E[round(x)] = x), so many small updates to a
low-precision tensor add up instead of being rounded away.

`quantize_rows`/`dequantize_rows` and `round_stochastic` are the fast paths (vectorised
torch, on any device); `quantize_rows_reference` and `round_stochastic_reference` are the
element-by-element definitions the tests compare them with.
"""

from __future__ import annotations

import math
from functools import cache

import torch

BLOCK = 256  # values per quantisation block (at most; a row of C values gets ceil(C / BLOCK) blocks)


def _levels(decades: int, top: int) -> list[float]:
    """Positive levels of a dynamic code: `top` linear levels in (0.1, 1], half as many in
    each decade below, `decades` decades in all; each decade's levels are 10^-i·(0.1 + 0.9·j/n)."""
    out = []
    for i in range(decades):
        n = top >> i
        out += [10.0 ** -i * (0.1 + 0.9 * j / n) for j in range(1, n + 1)]
    return out


@cache
def _code_cpu(signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(code levels ascending, the midpoints between neighbours) as fp32 CPU tensors."""
    pos = _levels(7, 64) if signed else _levels(8, 128)  # 127 or 255 positive levels
    levels = sorted(set(pos + [0.0] + ([-v for v in pos] if signed else [])))
    code = torch.tensor(levels, dtype=torch.float64)
    mids = (code[1:] + code[:-1]) / 2
    return code.float(), mids.float()


_DEVICE_CODES: dict[tuple[bool, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def dynamic_code(signed: bool, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The signed (255 levels) or unsigned (256 levels) code and its midpoints on `device`."""
    key = (signed, torch.device(device))
    if key not in _DEVICE_CODES:
        _DEVICE_CODES[key] = tuple(t.to(key[1]) for t in _code_cpu(signed))
    return _DEVICE_CODES[key]


def block_layout(cols: int, block: int = BLOCK) -> tuple[int, int]:
    """(blocks per row, values per block) for rows of `cols` values: ceil(cols/block) blocks
    of equal size, the last padded when they do not divide the row."""
    nb = max(1, math.ceil(cols / block))
    return nb, max(1, math.ceil(cols / nb))


def _blocks(x: torch.Tensor, nb: int, bs: int) -> torch.Tensor:
    """x [r, C] as [r, nb, bs], zero-padded at the end of each row."""
    pad = nb * bs - x.shape[1]
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(x.shape[0], nb, bs)


def quantize_rows(x: torch.Tensor, signed: bool, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [r, C] (any float dtype) -> (codes [r, C] uint8, scales [r, nb] fp32)."""
    r, C = x.shape
    nb, bs = block_layout(C, block)
    code, mids = dynamic_code(signed, x.device)
    xb = _blocks(x.float(), nb, bs)
    scales = xb.abs().amax(-1)
    normed = xb / torch.where(scales > 0, scales, torch.ones((), device=x.device)).unsqueeze(-1)
    idx = torch.bucketize(normed, mids, out_int32=True)
    if not signed:  # a positive value never becomes 0 (level 0 is the code's only zero)
        idx.masked_fill_((idx == 0) & (normed > 0), 1)
    return idx.to(torch.uint8).reshape(r, nb * bs)[:, :C].contiguous(), scales


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, signed: bool) -> torch.Tensor:
    """The fp32 values [r, C] of quantize_rows' output."""
    r, C = codes.shape
    nb = scales.shape[1]
    bs = math.ceil(C / nb)
    code, _ = dynamic_code(signed, codes.device)
    vals = _blocks(code[codes.long()], nb, bs) * scales.unsqueeze(-1)
    return vals.reshape(r, nb * bs)[:, :C]


def quantize_rows_reference(x: torch.Tensor, signed: bool, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows by its definition, one block and one value at a time (tests only)."""
    r, C = x.shape
    nb, bs = block_layout(C, block)
    code = _code_cpu(signed)[0].double()
    codes = torch.zeros(r, C, dtype=torch.uint8)
    scales = torch.zeros(r, nb)
    xf = x.float().cpu()
    for i in range(r):
        for b in range(nb):
            vals = xf[i, b * bs:(b + 1) * bs]
            s = float(vals.abs().max()) if vals.numel() else 0.0
            scales[i, b] = s
            for j, v in enumerate(vals.tolist()):
                y = float(torch.tensor(v) / torch.tensor(s)) if s > 0 else 0.0  # the fp32 quotient, as the fast path
                k = int((code - y).abs().argmin())
                if not signed and k == 0 and y > 0:
                    k = 1
                codes[i, b * bs + j] = k
    return codes, scales


def round_stochastic(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """x (fp32) rounded to `dtype` up or down at random, unbiased. bf16 adds 16 random bits
    below its mantissa and truncates; fp16 goes through round_stochastic_reference; fp32 and
    wider are exact."""
    if dtype == torch.bfloat16:
        bits = x.float().contiguous().view(torch.int32)
        noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
        return noise.add_(bits).bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)
    if dtype == torch.float16:
        return round_stochastic_reference(x, dtype, generator)
    return x.to(dtype)


def round_stochastic_reference(x: torch.Tensor, dtype: torch.dtype,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """The definition: the neighbours lo <= x <= hi in `dtype`, hi with probability
    (x - lo) / (hi - lo)."""
    x = x.float()
    near = x.to(dtype)
    above = near.float() >= x
    inf = torch.tensor(float("inf"), dtype=dtype, device=x.device)
    other = torch.nextafter(near, torch.where(above, -inf, inf))
    lo = torch.where(above, other, near).float()
    hi = torch.where(above, near, other).float()
    gap = hi - lo
    p_hi = torch.where(gap > 0, (x - lo) / torch.where(gap > 0, gap, torch.ones_like(gap)), torch.zeros_like(gap))
    u = torch.rand(x.shape, device=x.device, generator=generator)
    return torch.where(u < p_hi, hi, lo).to(dtype)
