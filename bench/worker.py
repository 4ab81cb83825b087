"""One implementation on one shape, inside its own fresh process (bench.memory.run_isolated).

Phases, in this order, so each is measured on an untouched module:
  1. check:  reconstruct a probe batch from the shared seeded weights (compared across
             implementations by the parent: they must compute the same SAE);
  2. memory: peak bytes of a forward (no autograd) and of two training steps (the first
             allocates optimizer state), relative to the process before the module existed;
  3. time:   every requested op (bench.timing.measure).
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

from . import peers
from .memory import PeakMemory
from .timing import measure

PROBE_ROWS = 64


def peak_mm_tflops(device: torch.device, dtype: torch.dtype, n: int, warmup: int, repeats: int) -> dict[str, Any]:
    """Throughput of a square torch.mm: the practical peak the other numbers are a fraction of."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = measure(lambda: torch.mm(a, b), device, warmup=warmup, repeats=repeats)
    return {"n": n, "timing": t.to_dict(), "tflops": 2.0 * n**3 / (t.median_ms * 1e-3) / 1e12}


def _warm_up(impl: str, shape: peers.Shape, device: torch.device, dtype: torch.dtype) -> None:
    """Run every op once on a tiny shape, so lazy imports, backend registration, thread pools
    and kernel compilation happen before the memory baseline, not inside a measured phase."""
    tiny = peers.Shape(shape.d_in, max(64, 2 * shape.k), shape.k, 8)
    adapter = peers.build(impl, tiny, device, dtype)
    try:
        x = peers.make_batch(tiny, device, dtype)
        for case in adapter.ops(x).values():
            setup, fn = case if isinstance(case, tuple) else (None, case)
            fn(setup()) if setup else fn()
    finally:
        adapter.close()
    del adapter
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """spec: impl, shape (dict), device, dtype, ops (list or None = all the adapter has),
    warmup, repeats, seed, peak_mm_n (the floor only; 0 = skip)."""
    t_start = time.perf_counter()
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    shape = peers.Shape(**spec["shape"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if device.type == "cuda":
        torch.cuda.init()
        # fastsae's Triton GEMMs follow this flag too (plain tf32 when set, 3-pass tf32 when not)
        torch.backends.cuda.matmul.allow_tf32 = bool(spec.get("tf32", False))
    _warm_up(spec["impl"], shape, device, dtype)
    x = peers.make_batch(shape, device, dtype, seed=spec.get("seed", 0) + 1)
    mem = PeakMemory(device)
    adapter = peers.build(spec["impl"], shape, device, dtype, seed=spec.get("seed", 0))
    n_params = 2 * shape.d_in * shape.d_sae + shape.d_sae + shape.d_in
    result: dict[str, Any] = {"impl": spec["impl"], "shape": shape.to_dict(), "memory_kind": mem.kind,
                              "params_bytes": n_params * torch.finfo(dtype).bits // 8}
    try:
        # 1. check
        probe = x[:PROBE_ROWS]
        x_hat = adapter.reconstruct(probe)
        result["probe_x_hat"] = None if x_hat is None else x_hat.detach().float().cpu().tolist()

        # 2. memory (before ops(): it keeps encode's output for decode, which must not count)
        if adapter.trains:
            mem.start()
            adapter.reconstruct(x)
            result["peak_forward_bytes"] = mem.stop()
            mem.start()
            for _ in range(2):
                adapter.step(x)
            result["peak_step_bytes"] = mem.stop()
            result["peak_exact"] = mem.exact
        ops = adapter.ops(x)
        if not adapter.trains:
            mem.start()
            ops["gemm"]()
            result["peak_gemm_bytes"] = mem.stop()

        # 3. time
        wanted = spec.get("ops") or list(ops)
        timings = {}
        for op in wanted:
            if op not in ops:
                continue
            case = ops[op]
            setup, fn = case if isinstance(case, tuple) else (None, case)
            timings[op] = measure(fn, device, warmup=spec["warmup"], repeats=spec["repeats"], setup=setup).to_dict()
        result["timings"] = timings
        if spec.get("peak_mm_n"):
            result["peak_mm"] = peak_mm_tflops(device, dtype, spec["peak_mm_n"], spec["warmup"], spec["repeats"])
    finally:
        adapter.close()
    result["threads"] = torch.get_num_threads()
    result["worker_s"] = time.perf_counter() - t_start
    return result
