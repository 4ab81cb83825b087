"""Memory model: bytes per GPU of a sharded SAE in training, and the widest d_sae that fits.

Per rank, with n_s = ceil(d_sae / shards) latents and d = d_in (replicas do not reduce it):

    parameters   (2·d + 1)·n_s (+ n_s JumpReLU thresholds) + d          × bytes(dtype)
    gradients    as the parameters, × bytes(dtype)     dense Adam (autograd, or the sparse
                                                       backward densified for it), + 4 bytes
                                                       per parameter (fp32 copies for the
                                                       masters) when dtype is not float32;
                                                       ~0 for row-sparse Adam (touched rows)
    optimizer    2 fp32 moments per parameter (8 bytes), + 8 bytes per latent (row step
                 count) for row-sparse Adam
    fp32 masters 4 bytes per parameter when dtype is not float32 (fastsae.optim keeps them)
    activations  fused TopK encode (Triton): O(B·(d + k)), nothing of size B·n_s;
                 otherwise (reference/C++ encode, ReLU/JumpReLU autograd) ~3 tensors
                 [B, n_s] in dtype (pre-activations, activations, their gradient)

The static part (parameters, gradients, optimizer, masters) is exact for fastsae's modules
and optimizers: tests/test_distributed_memory.py counts the bytes of real tensors. The
activation term is an estimate, and the whole model is unchecked against GPU measurements
(no GPU was available when it was written); `reserve_gib` covers the CUDA context, the
allocator's fragmentation and NCCL buffers.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from ..config import dtype_from_str
from ..errors import ConfigError

OPTIMIZERS = ("adam", "row_sparse_adam", "none")
GIB = 1 << 30


@dataclass
class MemoryEstimate:
    """Bytes per rank, by kind."""

    parameters: int
    gradients: int
    optimizer: int
    masters: int
    activations: int

    @property
    def static(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.masters

    @property
    def total(self) -> int:
        return self.static + self.activations


def _bytes(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype_from_str(dtype)).element_size()


def estimate(d_in: int, d_sae: int, dtype: str = "float32", optimizer: str = "adam", shards: int = 1,
             batch_size: int = 4096, k: int = 32, architecture: str = "topk", fused_encode: bool = True
             ) -> MemoryEstimate:
    """Bytes per rank of training (optimizer="none": inference) a d_in × d_sae SAE split
    over `shards` ranks."""
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer {optimizer!r} is unknown: use one of {', '.join(OPTIMIZERS)}")
    b = _bytes(dtype)
    n_s = math.ceil(d_sae / shards)
    latent_elems = (2 * d_in + 1 + (1 if architecture == "jumprelu" else 0)) * n_s
    elems = latent_elems + d_in
    params = elems * b
    if optimizer == "adam":
        grads = elems * b + (4 * elems if b != 4 else 0)
    else:
        grads = d_in * (b + (4 if b != 4 else 0)) if optimizer == "row_sparse_adam" else 0
    opt = 8 * elems + (8 * n_s if optimizer == "row_sparse_adam" else 0) if optimizer != "none" else 0
    masters = 4 * elems if optimizer != "none" and b != 4 else 0
    if fused_encode and architecture in ("topk", "batchtopk"):
        acts = batch_size * (4 * d_in + k * (b + 8) * 3)
    else:
        acts = 3 * batch_size * n_s * b + batch_size * 4 * d_in
    return MemoryEstimate(params, grads, opt, masters, acts)


def widest_d_sae(d_in: int, gpu_gib: float, gpus: int = 1, dtype: str = "float32", optimizer: str = "adam",
                 batch_size: int = 4096, k: int = 32, architecture: str = "topk", fused_encode: bool = True,
                 reserve_gib: float = 4.0, multiple: int = 1024) -> int:
    """The widest d_sae (a multiple of `multiple`·gpus) whose per-GPU estimate fits in
    gpu_gib - reserve_gib, with every GPU one latent shard."""
    budget = (gpu_gib - reserve_gib) * GIB

    def fits(n: int) -> bool:
        return estimate(d_in, n, dtype, optimizer, gpus, batch_size, k, architecture, fused_encode).total <= budget

    step = multiple * gpus
    if not fits(step):
        return 0
    lo, hi = 1, 2
    while fits(hi * step):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # largest m with fits(m·step)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid)
    return lo * step


def table(d_ins=(768, 2048, 4096, 8192), gpu_gib: float = 80.0, gpus=(1, 8, 64),
          configs=(("float32", "adam"), ("bfloat16", "adam"), ("bfloat16", "row_sparse_adam"))) -> str:
    """Markdown table of widest_d_sae (TopK, fused encode, B=4096, k=32)."""
    head = "| d_in | dtype | optimizer | " + " | ".join(f"{g} GPU{'s' if g > 1 else ''}" for g in gpus) + " |"
    lines = [head, "|" + "---|" * (3 + len(gpus))]
    for d in d_ins:
        for dtype, opt in configs:
            cells = [_human(widest_d_sae(d, gpu_gib, g, dtype, opt)) for g in gpus]
            lines.append(f"| {d} | {dtype} | {opt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0" + unit, unit)
    return str(n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastsae.distributed.memory",
                                description="Widest d_sae that fits per the memory model (unchecked on GPUs)")
    p.add_argument("--d-in", type=int, required=True)
    p.add_argument("--gpu-gib", type=float, default=80.0)
    p.add_argument("--gpus", type=int, default=1, help="latent shards (one per GPU)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--architecture", default="topk")
    p.add_argument("--unfused", action="store_true", help="encode materialises [B, n_s] (CPU, ReLU/JumpReLU)")
    p.add_argument("--reserve-gib", type=float, default=4.0)
    a = p.parse_args(argv)
    n = widest_d_sae(a.d_in, a.gpu_gib, a.gpus, a.dtype, a.optimizer, a.batch_size, a.k, a.architecture,
                     not a.unfused, a.reserve_gib)
    est = estimate(a.d_in, n, a.dtype, a.optimizer, a.gpus, a.batch_size, a.k, a.architecture, not a.unfused)
    print(f"widest d_sae: {n} ({_human(n)}) over {a.gpus} GPU(s) of {a.gpu_gib:g} GiB; per GPU: "
          + ", ".join(f"{name} {getattr(est, name) / GIB:.2f} GiB"
                      for name in ("parameters", "gradients", "optimizer", "masters", "activations")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
