"""The shared inner loop of every encoder kernel: one [BLOCK_B, BLOCK_N] tile of
pre-activations (x - b_dec) @ W_enc + b_enc, accumulated in fp32 and kept in registers.

Also the small host-side helpers every launch wrapper needs (interpreter detection,
dot precision, autotune config lists)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreted() -> bool:
    """True when Triton runs on CPU tensors through its interpreter (tests, no GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreter_loop_bounds() -> None:
    """Under the interpreter, a runtime int used as a loop bound (`for s in range(K)`) is a
    1-element array; Triton 3.6 turns it into a Python int with int(array), which NumPy 2
    refuses ("only 0-dimensional arrays can be converted to Python scalars"). Later Triton
    squeezes the array first: do the same on older ones. No effect on compiled kernels."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "squeezes_loop_bounds", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_loop_bounds = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if interpreted():
    _interpreter_loop_bounds()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: plain tf32 only when torch itself allows it for matmuls; otherwise the
    3-pass tf32 split, which matches fp32 closely enough that top-k sets agree with torch."""
    if interpreted():
        return "ieee"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def upcast(dtype: torch.dtype) -> bool:
    """Whether kernels must upcast tiles to fp32 before arithmetic (bf16 under the interpreter)."""
    return interpreted() and dtype == torch.bfloat16


def configs(gpu: list[triton.Config], cpu: triton.Config) -> list[triton.Config]:
    """The autotune search space on a GPU; one small config under the interpreter (fast tests)."""
    return [cpu] if interpreted() else gpu


# Per-thread budget of the live fp32/int32 words a config keeps in registers (accumulator tile,
# top-k buffer, decode accumulator): above it ptxas spills (bench/kernels_sm90_compile.py measures
# that; its results set these numbers). Half-precision tiles go through tensor-core dots; fp32
# ones through tf32x3 (three dots and split operands), which holds more live registers.
REGISTER_WORDS = {"half": 100, "fp32": 64}


def fitting(configs, words, dtype: torch.dtype, **launch):
    """The configs whose words(config kwargs, launch kwargs) per thread fit REGISTER_WORDS for
    storage `dtype`, and the smallest-footprint config (the fallback when none fits)."""
    budget = REGISTER_WORDS["fp32" if dtype == torch.float32 else "half"]

    def per_thread(c):
        return words({**c.kwargs, **launch}) / (32 * c.num_warps)

    return [c for c in configs if per_thread(c) <= budget], min(configs, key=per_thread)


def register_budget(words):
    """An autotune `early_config_prune` keeping the configs that fit (see `fitting`) for the
    launch's storage dtype (the first pointer argument's); never empty: the smallest footprint
    stays if none fits (callers that can avoid that launch check `fitting` first)."""

    def prune(configs, named_args, **kwargs):
        first = next(iter(named_args.values()))
        kept, smallest = fitting(configs, words, getattr(first, "dtype", torch.bfloat16), **kwargs)
        return kept or [smallest]

    prune.words = words
    return prune


def batch_bucket(B: int) -> int:
    """The batch size as an autotune key: its power-of-two bucket (16 .. 65536), so the best
    config is re-chosen when the batch size changes scale, not for every new batch size."""
    return min(1 << 16, max(16, triton.next_power_of_2(max(B, 1))))


def vector(t: torch.Tensor | None) -> torch.Tensor | None:
    """A 1-D parameter as the kernels read it: unit stride (they index biases by position)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


@triton.jit
def row_offsets(rows, width):
    """rows * width in int64: B * width passes 2^31 at realistic sizes (16384 rows x 2^17)."""
    return rows.to(tl.int64) * width


@triton.jit
def preact_tile(
    x_ptr, bdec_ptr, w_ptr, benc_ptr,
    rows, cols, B, D, N,
    stride_xb, stride_xd, stride_wd, stride_wn,
    HAS_BDEC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """fp32 [BLOCK_B, BLOCK_N] pre-activations of `rows` x `cols`. Entries of rows >= B or
    cols >= N are meaningless: callers mask them to what their epilogue needs."""
    row_ok = rows < B
    col_ok = cols < N
    # int64 offsets: W_enc of d_in=4096 x d_sae=2^20 has 2^32 elements
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        ds64 = ds.to(tl.int64)
        xt = tl.load(x_ptr + rows64[:, None] * stride_xb + ds64[None, :] * stride_xd,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + ds64[:, None] * stride_wd + cols64[None, :] * stride_wn,
                     mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter has no bf16 arithmetic: fp32 math on bf16 storage
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        if HAS_BDEC:
            # subtract in fp32, round once to the storage dtype: what torch's x - b_dec does
            bd = tl.load(bdec_ptr + ds, mask=d_ok, other=0.0)
            xt = (xt.to(tl.float32) - bd.to(tl.float32)[None, :]).to(wt.dtype)
        acc = tl.dot(xt.to(wt.dtype), wt, acc, input_precision=DOT_PRECISION)
    be = tl.load(benc_ptr + cols, mask=col_ok, other=0.0)
    return acc + be.to(tl.float32)[None, :]
