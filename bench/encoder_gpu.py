"""The TopK encoder strategies vs torch: time, TFLOP/s and peak memory.

For every (d_in, d_sae, batch, k) it times
  (a) mm       torch.mm(x, W_enc) of the same shape alone (the roofline the encoders chase),
  (b) mm+topk  addmm(b_enc, x - b_dec, W_enc) then torch.topk: what the libraries do today,
  (c) fused    fastsae.kernels.topk_encoder.topk_encode (never writes [B, d_sae]),
  (d) chunked  fastsae.kernels.topk_chunked.topk_encode_chunked (GEMM per latent chunk +
               filter/merge; [B, chunk] at a time),
and reports TFLOP/s = 2·B·d·n / time, the peak memory each allocates beyond its inputs, the
targets (the best strategy >= 85 % of (a)'s throughput and >= 1.3x faster than (b)), which
strategy `choose_strategy` would pick, and whether the index sets agree with an fp32 top-k
on the first rows.

    python bench/encoder_gpu.py                          # the full grid, on a CUDA GPU
    python bench/encoder_gpu.py --out bench/results/encoder_gpu_H100.md
    TRITON_INTERPRET=1 python bench/encoder_gpu.py --quick   # tiny, CPU: proves it runs

Timing: CUDA events through triton.testing.do_bench (median). In --quick mode on CPU the
times are interpreter times and mean nothing; only the table's shape and the agreement do.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import time

import torch
from tqdm import tqdm


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, nargs="+", default=[768, 4096], help="d_in values")
    p.add_argument("--log2-d-sae", type=int, nargs="+", default=list(range(15, 21)), help="log2 of d_sae values")
    p.add_argument("--batch", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--k", type=int, nargs="+", default=[32, 128])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--check-rows", type=int, default=256, help="rows whose index sets are compared")
    p.add_argument("--quick", action="store_true", help="one tiny shape (runs on CPU under TRITON_INTERPRET=1)")
    p.add_argument("--out", help="also write the markdown table to this file")
    return p.parse_args(argv)


def _timer(device: torch.device):
    """fn -> median milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_time(fn):
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return cpu_time


def _peak_extra_mib(fn, device: torch.device):
    """Peak memory fn allocates beyond what is already allocated (MiB); None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean fraction of each row's indices that both selections share."""
    same = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float()
    return float(same.mean())


def run_one(d, n, B, k, dtype, device, check_rows, time_fn):
    from fastsae.kernels.topk_chunked import topk_encode_chunked
    from fastsae.kernels.topk_encoder import MAX_K, choose_strategy, topk_encode

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, d, device=device, dtype=dtype, generator=g)
    W_enc = (torch.randn(d, n, device=device, dtype=torch.float32, generator=g) / d**0.5).to(dtype)
    b_enc = torch.randn(n, device=device, dtype=dtype, generator=g) * 0.1
    b_dec = torch.randn(d, device=device, dtype=dtype, generator=g) * 0.1
    flops = 2.0 * B * d * n

    mm = lambda: torch.mm(x, W_enc)  # noqa: E731
    mm_topk = lambda: torch.addmm(b_enc, x - b_dec, W_enc).topk(k, dim=1)  # noqa: E731
    fused = lambda: topk_encode(x, W_enc, b_enc, b_dec, k)  # noqa: E731
    chunked = lambda: topk_encode_chunked(x, W_enc, b_enc, b_dec, k)  # noqa: E731

    row = {"d": d, "n": n, "B": B, "k": k, "rule": choose_strategy(B, d, n, k)}
    for name, fn in (("mm", mm), ("mm+topk", mm_topk), ("fused", fused), ("chunked", chunked)):
        if name == "fused" and k > MAX_K:
            row[name] = None
            continue
        try:
            ms = time_fn(fn)
            row[name] = (ms, flops / (ms * 1e-3) / 1e12, _peak_extra_mib(fn, device))
        except torch.OutOfMemoryError:
            row[name] = "OOM"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = slice(0, min(B, check_rows))
    # the oracle: fp32 math on the stored values, as the fused kernel accumulates
    _, ref_i = torch.addmm(b_enc.float(), (x[rows] - b_dec).float(), W_enc.float()).topk(k, dim=1)
    _, got_i = topk_encode(x[rows], W_enc, b_enc, b_dec, k)
    row["agree"] = _agreement(got_i, ref_i)
    row["agree_chunked"] = _agreement(topk_encode_chunked(x[rows], W_enc, b_enc, b_dec, k)[1], ref_i)
    return row


def _cell(r):
    if r is None:
        return "n/a", "", ""
    if r == "OOM":
        return "OOM", "", ""
    ms, tflops, mib = r
    return f"{ms:.3f}", f"{tflops:.1f}", "-" if mib is None else f"{mib:.0f}"


def table(rows, device_name: str, dtype: str) -> str:
    head = (f"# TopK encoder strategies vs torch ({device_name}, {dtype}, torch {torch.__version__})\n\n"
            "ms / TFLOP/s / extra peak MiB per method; x/mm = throughput as a fraction of the GEMM alone "
            "(target >= 0.85 for the best strategy), speedup = (mm+topk time) / (best strategy time) "
            "(target >= 1.3); rule = what choose_strategy picks; agree = index-set agreement with an fp32 "
            "top-k on the first rows, fused/chunked (1.0 = exact; near-ties within rounding may swap).\n\n"
            "| d | d_sae | B | k | mm ms | mm TF/s | mm MiB | mm+topk ms | mm+topk TF/s | mm+topk MiB "
            "| fused ms | fused TF/s | fused MiB | chunked ms | chunked TF/s | chunked MiB "
            "| fused/mm | chunked/mm | speedup | rule | agree |\n"
            "|" + "---|" * 21 + "\n")
    lines = []
    for r in rows:
        f = derived(r)
        cells = [_cell(r[m]) for m in ("mm", "mm+topk", "fused", "chunked")]
        lines.append(f"| {r['d']} | {r['n']} | {r['B']} | {r['k']} | " + " | ".join(" | ".join(c) for c in cells)
                     + f" | {_num(f['fused/mm'])} | {_num(f['chunked/mm'])} | {_num(f['speedup'], 'x')} "
                     f"| {r['rule']} | {r['agree']:.4f}/{r['agree_chunked']:.4f} |")
    return head + "\n".join(lines) + "\n"


def _num(v, unit=""):
    return "" if v is None else f"{v:.2f}{unit}"


def derived(r) -> dict:
    """Fractions of the GEMM's throughput per strategy and the best strategy's speedup over mm+topk."""
    ms = {m: r[m][0] for m in ("mm", "mm+topk", "fused", "chunked") if isinstance(r.get(m), tuple)}
    out = {f"{s}/mm": (ms["mm"] / ms[s] if "mm" in ms and s in ms else None) for s in ("fused", "chunked")}
    best = min((ms[s] for s in ("fused", "chunked") if s in ms), default=None)
    out["speedup"] = ms["mm+topk"] / best if best and "mm+topk" in ms else None
    out["best"] = min((s for s in ("fused", "chunked") if s in ms), key=ms.get, default=None)
    return out


def main(argv=None) -> str:
    args = _args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        if not args.quick:
            raise SystemExit("encoder_gpu.py needs a CUDA GPU; on CPU run it with --quick (Triton interpreter)")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    dtype = getattr(torch, args.dtype)
    if args.quick:
        grid = [(24, 128, 20, 4), (20, 70, 17, 3)]
    else:
        grid = [(d, 2**e, B, k) for d, e, B, k in itertools.product(args.d, args.log2_d_sae, args.batch, args.k)]
    cpu = platform.processor() or platform.machine()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU interpreter ({cpu})"
    time_fn = _timer(device)
    rows = [run_one(d, n, B, k, dtype, device, args.check_rows, time_fn)
            for d, n, B, k in tqdm(grid, desc="encoder configs")]
    text = table(rows, name, args.dtype)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
