"""Phases (a) environment, (c) encoder, (d) training step and (e) widest d_sae of
bench/gpu_check.sh; (b) is the pytest file test_gpu_kernels.py beside this one.

    python -m bench.gpu.phases env|encoder|step|widest --out OUT_DIR
    python -m bench.gpu.phases probe --d-in 4096 --d-sae 1048576   # one (e) probe, fresh process

Sizes are the full GPU grid; FASTSAE_GPU_CHECK_TINY=1 swaps in toy sizes that run on
CPU. Every phase records what it has measured before it moves to the next case.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

from bench.gpu import device, device_name, md_table, record, tiny


# ------------------------------------------------------------------ (a) environment
def phase_env(out: str) -> None:
    import triton

    from fastsae import _C, ops

    info = {"device": device_name(), "python": sys.version.split()[0], "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "triton": triton.__version__, "cuda_built": _C.cuda_built(),
            "load_errors": ops.load_errors(), "implementations": ops.implementation_table()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(sm=f"{p.major}{p.minor}", sms=p.multi_processor_count, memory_gib=p.total_memory / 2**30)
    record(out, "env", info, f"# fastsae GPU check: {info['device']}\n\n"
           f"python {info['python']}, torch {info['torch']} (CUDA {info['torch_cuda']}), triton {info['triton']}, "
           f"fastsae._C CUDA build: {info['cuda_built']}; backends not loaded: {info['load_errors'] or 'none'}\n\n"
           "## What runs where (ops.implementation_table)\n\n" + ops.format_implementation_table())


# ------------------------------------------------------------------ (c) encoder
def _encoder_grid():
    if tiny():
        return [(24, 128, 20, 4), (20, 70, 17, 3)]
    # small to large: a timeout leaves the cheap shapes measured
    return [(d, n, B, 32) for B in (4096, 16384) for n in (2**17, 2**20) for d in (768, 4096)]


def phase_encoder(out: str) -> None:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("encoder_gpu", Path(__file__).resolve().parent.parent /
                                                  "encoder_gpu.py")
    enc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(enc)
    dev = device()
    rows = []
    for d, n, B, k in _encoder_grid():
        r = enc.run_one(d, n, B, k, torch.bfloat16, dev, 256, enc._timer(dev))
        f = enc.derived(r)
        flat = {"d": d, "d_sae": n, "B": B, "k": k, "rule": r["rule"], "best": f["best"],
                "fused/mm": f["fused/mm"], "chunked/mm": f["chunked/mm"], "speedup_vs_mm+topk": f["speedup"],
                "agree_fused": r["agree"], "agree_chunked": r["agree_chunked"]}
        for m in ("mm", "mm+topk", "fused", "chunked"):
            v = r[m]
            flat[f"{m} ms"] = v[0] if isinstance(v, tuple) else v
            flat[f"{m} TF/s"] = v[1] if isinstance(v, tuple) else None
            flat[f"{m} MiB"] = v[2] if isinstance(v, tuple) else None
        rows.append(flat)
        cols = ["d", "d_sae", "B", "mm TF/s", "mm+topk TF/s", "fused TF/s", "chunked TF/s", "fused/mm",
                "chunked/mm", "speedup_vs_mm+topk", "best", "rule", "agree_fused", "agree_chunked"]
        record(out, "encoder", rows)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    with open(f"{out}/summary.md", "a") as fh:
        fh.write("## (c) TopK encoder, bf16, k=32 (targets: best >= 0.85 x GEMM, >= 1.3x mm+topk)\n\n"
                 + md_table(rows, cols) + "\n\n")


# ------------------------------------------------------------------ (d) training step
STEP_PEERS = ("fastsae", "sparsify", "SAELens", "torch dense")


def step_peers() -> list[str]:
    """FASTSAE_GPU_CHECK_PEERS (comma-separated) narrows the peers: the dry run's test keeps the
    two whose imports are quick (the peers' adapters are tested with the bench suites)."""
    env = os.environ.get("FASTSAE_GPU_CHECK_PEERS", "")
    return [p for p in env.split(",") if p] if env else list(STEP_PEERS)


def _step_shape():
    from bench.peers import Shape

    return Shape(d_in=16, d_sae=64, k=4, batch=32) if tiny() else Shape(d_in=768, d_sae=2**17, k=32, batch=16384)


def _impl_name(peer: str) -> str:
    """bench.peers' name of `peer` (fastsae: its default backend on this device)."""
    from fastsae import ops

    if peer == "fastsae":
        return f"fastsae[{ops.resolve_backend('auto', device())}]"
    return peer


def step_one(peer: str, steps: int = 3) -> dict:
    """One peer's training step at the step shape, in this process: tokens/s, peak memory and
    its ratio to parameters + optimizer state."""
    from bench import peers
    from bench.timing import measure

    dev, dtype, shape = device(), torch.bfloat16 if device().type == "cuda" else torch.float32, _step_shape()
    name = _impl_name(peer)
    why = peers.adapter_class(name).unavailable(dev)
    if why:
        return {"peer": peer, "impl": name, "unavailable": why}
    adapter = peers.build(name, shape, dev, dtype)
    x = peers.make_batch(shape, dev, dtype)
    step = adapter.ops(x)["step"]
    step()  # optimizer state allocated, kernels compiled and tuned
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = measure(step, dev, warmup=1, repeats=steps)
    res = {"peer": peer, "impl": name, "ms": t.median_ms, "spread_pct": t.spread_pct,
           "tokens_per_s": shape.batch / (t.median_ms * 1e-3)}
    if dev.type == "cuda":
        params = sum(p.numel() * p.element_size() for p in _params(adapter))
        peak = torch.cuda.max_memory_allocated()
        res.update(peak_gib=peak / 2**30, params_gib=params / 2**30,
                   peak_over_params_and_adam=peak / (3 * params) if params else None)
    adapter.close()
    return res


def _params(adapter):
    if hasattr(adapter, "sae"):
        return list(adapter.sae.parameters())
    return adapter._params()


def _in_fresh_process(args: list[str], timeout: float) -> dict:
    """Run `python -m bench.gpu.phases ARGS` and parse its last stdout line as JSON."""
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "bench.gpu.phases", *args], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode == 0 and lines:
        return {**json.loads(lines[-1]), "wall_s": time.time() - t0}
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return {"error": f"exit {p.returncode}: {tail}", "wall_s": time.time() - t0}


def phase_step(out: str, timeout: float) -> None:
    shape = _step_shape()
    rows = []
    for peer in step_peers():
        r = _in_fresh_process(["step-one", peer], timeout)
        rows.append({"peer": peer, **r})
        record(out, "step", {"shape": shape.to_dict(), "rows": rows})
    base = next((r.get("tokens_per_s") for r in rows if r["peer"] == "sparsify"), None)
    for r in rows:
        if base and r.get("tokens_per_s"):
            r["x sparsify"] = r["tokens_per_s"] / base
    record(out, "step", {"shape": shape.to_dict(), "rows": rows},
           f"## (d) training step, {shape.label()}, bf16 (targets: fastsae >= 2x sparsify tokens/s; "
           "peak <= 1.2 x (parameters + Adam state))\n\n"
           + md_table(rows, ["peer", "impl", "ms", "tokens_per_s", "x sparsify", "peak_gib",
                             "peak_over_params_and_adam", "unavailable", "error"]))


# ------------------------------------------------------------------ (e) widest d_sae
def probe(d_in: int, d_sae: int, steps: int = 2) -> dict:
    """A few fastsae training steps (row-sparse Adam, bf16) at (d_in, d_sae): fits or not."""
    import fastsae
    from fastsae.trainer import TrainConfig, Trainer

    dev = device()
    dtype = "bfloat16" if dev.type == "cuda" else "float32"
    B = 64 if tiny() else 4096
    cfg = fastsae.SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=32 if d_sae >= 64 else 4,
                            dtype=dtype, device=str(dev))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tc = TrainConfig(sae=cfg, steps=10**9, batch_size=B, lr=1e-4, optimizer="row_sparse_adam",
                         b_dec_init="zeros", log_every=10**9, checkpoint_every=0, out_dir=tmp, progress=False,
                         console=False, plot=False)
        data = torch.zeros(B, d_in, dtype=torch.float32)
        tr = Trainer(tc, data)
        x = torch.randn(B, d_in, device=dev, dtype=tr.sae.dtype)
        t0 = time.time()
        for _ in range(steps):
            tr.train_step(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        res = {"d_in": d_in, "d_sae": d_sae, "ok": True, "step_s": (time.time() - t0) / steps}
        if dev.type == "cuda":
            res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del tr
    gc.collect()
    return res


def phase_widest(out: str, timeout: float) -> None:
    d_in = 16 if tiny() else 4096
    sizes = [2**e for e in (range(6, 7) if tiny() else range(20, 26))]
    rows = []
    for n in sizes:
        r = _in_fresh_process(["probe", "--d-in", str(d_in), "--d-sae", str(n)], timeout)
        rows.append({"d_sae": n, **r})
        record(out, "widest", {"d_in": d_in, "rows": rows})
        if not r.get("ok"):
            break
    widest = max((r["d_sae"] for r in rows if r.get("ok")), default=None)
    record(out, "widest", {"d_in": d_in, "rows": rows, "widest_d_sae": widest},
           f"## (e) widest d_sae that trains at d_in={d_in} (row-sparse Adam, bf16, fresh process each)\n\n"
           f"widest: {widest}\n\n" + md_table(rows, ["d_sae", "ok", "step_s", "peak_gib", "error"]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("phase", choices=["env", "encoder", "step", "widest", "step-one", "probe"])
    p.add_argument("peer", nargs="?")
    p.add_argument("--out")
    p.add_argument("--timeout", type=float, default=60.0, help="per fresh process (step, widest)")
    p.add_argument("--d-in", type=int)
    p.add_argument("--d-sae", type=int)
    a = p.parse_args(argv)
    if a.phase == "step-one":
        print(json.dumps(step_one(a.peer)))
    elif a.phase == "probe":
        print(json.dumps(probe(a.d_in, a.d_sae)))
    elif a.phase == "env":
        phase_env(a.out)
    elif a.phase == "encoder":
        phase_encoder(a.out)
    elif a.phase == "step":
        phase_step(a.out, a.timeout)
    else:
        phase_widest(a.out, a.timeout)


if __name__ == "__main__":
    main()
