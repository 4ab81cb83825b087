"""Compile every Triton kernel of fastsae.kernels for a GPU target without a GPU, the way a
real launch compiles it, and fail configs a GPU would reject or run badly.

A real launch specialises the kernel on its arguments: pointers 16-byte aligned, integers
divisible by 16 (or equal to 1: a unit stride becomes a constant) get attributes that change
the code (vectorised and cp.async loads, shared memory). So this script does not build
signatures by hand: it calls each kernel's own launch wrapper on CPU tensors of realistic
divisibility, captures the arguments the wrapper passes to the autotuner, and hands them to
Triton's own JIT (`warmup`, no launch) against a stand-in driver that reports the target GPU.
That is the JIT's specialisation, whatever the Triton version.

Every kernel x every constexpr variant a wrapper can produce x storage dtype x autotune config
x shape class ("aligned": every size divisible by 16, "odd": none) is compiled. A config fails
when it does not compile, needs more shared memory than the target has (232,448 bytes on
sm_90), or spills (stack frame above --max-stack bytes). Exit status = number of failures.

    python bench/kernels_sm90_compile.py --out bench/results/kernels_sm90_compile.txt
    python bench/kernels_sm90_compile.py --smoke      # CI: one config per kernel variant
    python bench/kernels_sm90_compile.py --jobs 16    # the GPU machine's cores

Needs TRITON_INTERPRET unset (the interpreter replaces compilation).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

SMEM_LIMIT = {90: 232448, 80: 166912, 89: 101376}  # max dynamic shared memory per block (bytes)
DTYPES = ("bfloat16", "float16", "float32")
SHAPES = {"aligned": dict(B=256, D=256, N=4096), "odd": dict(B=33, D=100, N=1000)}


@dataclass
class Job:
    kernel: str
    variant: str
    dtype: str
    shape: str
    config: int


class _TargetDriver:
    """Stands in for the CUDA driver during `warmup`: a device 0 of the requested arch."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def __getattr__(self, name):  # anything else a launch would need: not this script's business
        raise RuntimeError(f"compile check: the stand-in driver has no {name!r}")


def _cases(dtype_name: str, shape: str):
    """(kernel, variant, autotuner, call) for every constexpr variant the wrappers produce:
    call() runs the wrapper (its launch is captured, not run)."""
    import torch

    from fastsae.kernels import fused_relu, sparse_decoder, topk_encoder

    dt = getattr(torch, dtype_name)
    s = SHAPES[shape]
    B, D, N = s["B"], s["D"], s["N"]
    g = torch.Generator().manual_seed(0)

    def t(*size, dtype=dt):
        return torch.randn(*size, generator=g).to(dtype)

    x, W_enc, b_enc, b_dec, W_dec = t(B, D), t(D, N), t(N), t(D), t(N, D)
    for kp in (8, 16, 32, 64, 128, 256, 512):
        k = kp if shape == "aligned" else max(1, kp - 3)  # K itself specialises too
        for bdec in (True, False):
            yield ("topk", f"K_PAD={kp} HAS_BDEC={bdec}", topk_encoder._topk_partial_kernel,
                   lambda k=k, bdec=bdec: topk_encoder.topk_encode(x, W_enc, b_enc, b_dec if bdec else None, k,
                                                                   splits=4))
    vals, idx = t(B, 32), torch.randint(0, N, (B, 32))
    for bdec in (True, False):
        for with_x in (False, True):
            yield ("sparse_decode", f"HAS_BDEC={bdec} HAS_X={with_x}", sparse_decoder._sparse_decode_kernel,
                   lambda bdec=bdec, with_x=with_x: sparse_decoder.sparse_decode(
                       vals, idx, W_dec, b_dec if bdec else None, x=x if with_x else None))
    zero = torch.zeros((), dtype=dt)
    per_latent = t(N)
    l1w = W_dec.float().norm(dim=1)
    # (name, W_dec given, threshold, l1 weight, d_in): fused decode at d_in <= FUSED_MAX_D
    # (BLOCK_DOUT = next power of 2), the record-only pass otherwise
    for name, wd, th, l1, d in (
        ("relu_forward", True, zero, l1w, D), ("jumprelu_forward", True, per_latent, None, D),
        ("threshold_encode", False, zero, None, D), ("relu_forward_d64", True, zero, l1w, 64),
        ("relu_forward_wide", True, zero, l1w, 512),
    ):
        xd, We, Wd, bd = x[:, :d] if d <= D else t(B, d), W_enc[:d] if d <= D else t(d, N), t(N, d), t(d)
        for bdec in (True, False):
            yield ("fused_relu", f"{name} HAS_BDEC={bdec}", fused_relu._fused_threshold_kernel,
                   lambda xd=xd, We=We, Wd=Wd, bd=bd, th=th, l1=l1, wd=wd, bdec=bdec: fused_relu.fused_threshold(
                       xd, We, b_enc, bd if bdec else None, th, Wd if wd else None, bd if wd else None,
                       l1_weight=l1))


def _tuners():
    from fastsae.kernels import fused_relu, sparse_decoder, topk_encoder

    return [topk_encoder._topk_partial_kernel, sparse_decoder._sparse_decode_kernel,
            fused_relu._fused_threshold_kernel]


def _capture(tuner, call):
    """The (args, kwargs) of every launch `call` makes through `tuner`. No kernel runs: every
    autotuner's launch is replaced by a recorder while `call` runs (a wrapper may launch two)."""
    seen = {id(t): [] for t in _tuners()}

    def recorder(t):
        def record(*args, grid=None, warmup=False, **kwargs):
            seen[id(t)].append((args, kwargs))
        return record

    for t in _tuners():
        t.run = recorder(t)
    try:
        call()
    finally:
        for t in _tuners():
            del t.run  # back to the class's method
    return seen[id(tuner)]


def _usage(cubin: bytes) -> dict:
    from triton.backends.nvidia import compiler as nv

    cuobjdump = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"cuobjdump gave no resource usage: {out.strip()[:200]}")
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "static_smem": int(m.group(3)),
            "local": int(m.group(4))}


def _compile(job: Job, arch: int, max_stack: int) -> tuple[Job, str, bool]:
    """Compile one job in this process; (job, one-line result, failed)."""
    from triton.runtime import driver

    _, _, tuner, call = next(c for c in _cases(job.dtype, job.shape) if c[:2] == (job.kernel, job.variant))
    cfg = tuner.configs[job.config]
    launches = _capture(tuner, call)
    if not launches:
        return job, "no launch (the wrapper did not reach the kernel)", True
    args, kwargs = launches[0]
    if tuner.early_config_prune:  # configs the autotuner never tries for this launch
        from fastsae.kernels.preact_tile import fitting

        named = dict(zip(tuner.arg_names, args))
        dtype = next(iter(named.values())).dtype
        if not fitting(tuner.configs, tuner.early_config_prune.words, dtype, **kwargs)[0] and job.kernel == "topk":
            return job, "not launched: no config fits, choose_strategy takes the chunked encoder", False
        if cfg not in tuner.early_config_prune(tuner.configs, named, **kwargs):
            return job, "pruned for this launch (not compiled)", False
    saved = driver._active  # the real default driver fails without a GPU: never ask for it
    driver.set_active(_TargetDriver(arch))
    t0 = time.time()
    try:
        k = tuner.fn.warmup(*args, grid=(1,), **kwargs, **cfg.all_kwargs())
        use = _usage(k.asm["cubin"])
        smem = int(k.metadata.shared) + use["static_smem"]
        spilled = use["stack"] > max_stack or use["local"] > 0
        over = smem > SMEM_LIMIT.get(arch, SMEM_LIMIT[90])
        verdict = "FAIL smem" if over else "FAIL spills" if spilled else "ok"
        info = (f"{verdict}: regs {use['regs']}, stack {use['stack']} B, smem {smem} B, "
                f"cp.async {k.asm['ptx'].count('cp.async.') if 'ptx' in k.asm else '?'}")
        return job, f"{info} ({time.time() - t0:.1f}s)", verdict != "ok"
    except Exception as e:  # report every failing config, not just the first
        return job, f"FAIL compile: {type(e).__name__}: {str(e).splitlines()[0][:200]}", True
    finally:
        driver._active = saved


def _jobs(args) -> list[Job]:
    from fastsae.kernels.preact_tile import interpreted

    if interpreted():
        raise SystemExit("unset TRITON_INTERPRET: this script compiles the kernels for real")
    jobs = []
    for dt in args.dtype:
        for shape in args.shape:
            cases = [c for c in _cases(dt, shape) if not args.kernel or c[0] in args.kernel]
            for kernel in dict.fromkeys(c[0] for c in cases):
                mine = [c for c in cases if c[0] == kernel]
                n = len(mine[0][2].configs)
                if args.smoke:  # the lightest and the heaviest variant, each in one config
                    jobs += [Job(kernel, mine[0][1], dt, shape, 0), Job(kernel, mine[-1][1], dt, shape, n - 1)]
                else:
                    jobs += [Job(kernel, c[1], dt, shape, i) for c in mine for i in range(n)]
    return jobs


def _config_text(job: Job) -> str:
    from fastsae.kernels import fused_relu, sparse_decoder, topk_encoder

    tuner = {"topk": topk_encoder._topk_partial_kernel, "sparse_decode": sparse_decoder._sparse_decode_kernel,
             "fused_relu": fused_relu._fused_threshold_kernel}[job.kernel]
    c = tuner.configs[job.config]
    blocks = " ".join(f"{k}={v}" for k, v in c.kwargs.items())
    return f"cfg{job.config} [{blocks} warps={c.num_warps} stages={c.num_stages}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--shape", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--kernel", nargs="+", default=None, help="topk, sparse_decode, fused_relu")
    p.add_argument("--max-stack", type=int, default=64, help="stack bytes allowed before a config counts as spilling")
    p.add_argument("--smoke", action="store_true",
                   help="CI: per kernel its lightest and heaviest variant, one config each")
    p.add_argument("--limit", type=int, default=None, help="only the first N compiles (a dry run)")
    p.add_argument("--jobs", type=int, default=1, help="parallel compiler processes")
    p.add_argument("--out", help="also write the report to this file")
    args = p.parse_args(argv)
    import triton

    jobs = _jobs(args)[: args.limit]
    head = (f"# kernels_sm90_compile: sm_{args.arch}, triton {triton.__version__}, {len(jobs)} compiles "
            f"(launch-specialised via warmup), max stack {args.max_stack} B, smem limit "
            f"{SMEM_LIMIT.get(args.arch, SMEM_LIMIT[90])} B; {platform.machine()}, no GPU: "
            "registers/stack/smem only")
    lines = [head]
    print(head, flush=True)
    failures = 0
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(_compile, jobs, [args.arch] * len(jobs), [args.max_stack] * len(jobs)))
    else:
        results = (_compile(j, args.arch, args.max_stack) for j in jobs)
    for job, info, failed in results:
        failures += failed
        line = f"{job.kernel:13s} {job.dtype:9s} {job.shape:7s} {job.variant:34s} {_config_text(job)}: {info}"
        lines.append(line)
        print(line, flush=True)
    tail = f"{len(jobs) - failures}/{len(jobs)} compiles passed for sm_{args.arch}"
    lines.append(tail)
    print(tail)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return failures


if __name__ == "__main__":
    sys.exit(min(main(), 255))
