"""Compile every Triton kernel of fastsae.kernels for a GPU target without a GPU (Triton's
bundled ptxas), for each autotune config and storage dtype, and print registers, spills and
shared memory per config. Catches GPU-only compile errors (dot shapes, loop-carried types,
shared memory over the limit) on a CPU-only machine, and shows which configs would spill.

    python bench/kernels_sm90_compile.py                 # sm_90 (H100)
    python bench/kernels_sm90_compile.py --arch 80 --kernel topk

Needs TRITON_INTERPRET unset (the interpreter replaces compilation).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time

from tqdm import tqdm

_TY = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _kernels(dt: str):
    """(name, autotuner, pointer types, constexprs) for each kernel, storage dtype dt."""
    from fastsae.kernels import fused_relu, sparse_decoder, topk_encoder

    t = _TY[dt]
    prec = "tf32x3" if dt == "float32" else "tf32"
    yield ("topk", topk_encoder._topk_partial_kernel,
           {"x_ptr": t, "bdec_ptr": t, "w_ptr": t, "benc_ptr": t, "cand_v_ptr": "fp32", "cand_i_ptr": "i32"},
           [dict(SPLITS=4, HAS_BDEC=True, K_PAD=kp, DOT_PRECISION=prec, UPCAST=False) for kp in (32, 128)])
    yield ("sparse_decode", sparse_decoder._sparse_decode_kernel,
           {"val_ptr": t, "idx_ptr": "i64", "w_ptr": t, "bdec_ptr": t, "x_ptr": t, "out_ptr": t, "sq_ptr": "fp32"},
           [dict(HAS_BDEC=True, HAS_X=hx) for hx in (False, True)])
    yield ("fused_relu", fused_relu._fused_threshold_kernel,
           {"x_ptr": t, "bdec_in_ptr": t, "wenc_ptr": t, "benc_ptr": t, "th_ptr": t, "l1w_ptr": "fp32",
            "wdec_ptr": t, "bdec_out_ptr": t, "out_ptr": t, "rec_v_ptr": t, "rec_i_ptr": "i32",
            "count_ptr": "i32", "l1_ptr": "fp32"},
           [dict(HAS_BDEC_IN=True, HAS_L1W=True, FUSE_DECODE=fd, HAS_BDEC_OUT=True, DOT_PRECISION=prec,
                 UPCAST=False, BLOCK_DOUT=bd) for fd, bd in ((False, 16), (True, 128), (True, 256))])


def _usage(cubin: bytes, cuobjdump: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        return out.strip()
    return f"regs {m.group(1)}, stack {m.group(2)} B, local {m.group(4)} B, static smem {m.group(3)} B"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", nargs="+", default=list(_TY), choices=list(_TY))
    p.add_argument("--kernel", nargs="+", default=None, help="topk, sparse_decode, fused_relu")
    p.add_argument("--smoke", action="store_true",
                   help="CI: per kernel only its heaviest variant (the last) in its first autotune config")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: this script compiles the kernels for real")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import compiler as nv
    from triton.compiler import ASTSource

    cuobjdump = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    jobs = []
    for dt in args.dtype:
        for name, tuner, ptrs, variants in _kernels(dt):
            if args.kernel and name not in args.kernel:
                continue
            for consts in variants[-1:] if args.smoke else variants:
                for cfg in tuner.configs[:1] if args.smoke else tuner.configs:
                    jobs.append((dt, name, tuner.fn, ptrs, {**consts, **cfg.kwargs}, cfg))
    failures = 0
    for dt, name, fn, ptrs, consts, cfg in tqdm(jobs, desc=f"compiling for sm_{args.arch}"):
        sig = {a: ("constexpr" if a in consts else "*" + ptrs[a] if a in ptrs else "i32") for a in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        shown = {k: v for k, v in consts.items() if k.startswith(("BLOCK", "K_PAD", "FUSE", "HAS_X"))}
        t0 = time.time()
        try:
            k = triton.compile(src, target=GPUTarget("cuda", args.arch, 32),
                               options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            info = f"{_usage(k.asm['cubin'], cuobjdump)}, dyn smem {k.metadata.shared} B"
        except Exception as e:  # report every failing config, not just the first
            failures += 1
            info = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        tqdm.write(f"{name:13s} {dt:9s} {shown} warps={cfg.num_warps} stages={cfg.num_stages}: "
                   f"{info} ({time.time() - t0:.1f}s)")
    print(f"{len(jobs) - failures}/{len(jobs)} configs compiled for sm_{args.arch}")
    return failures


if __name__ == "__main__":
    raise SystemExit(main())
