"""The sparse decode's rate against how many distinct decoder rows it reads, one thread.

    python -m bench.row_bandwidth                          # B=1024, k=192, d=384 (AuxK at 384/4096)
    python -m bench.row_bandwidth --latents 256 2048 32768

Each row of the batch sums k decoder rows picked at random among `latents` distinct ones
(`sparse_decode`, the decode of AuxK's selection). The rate is the bytes of the picked rows
(B·k·d·4) per CPU second, the median of the rounds. Flat while the rows fit a cache level: a
working set that fits L2 would not make the pass faster.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastsae import ops


def rate(B: int, k: int, d: int, latents: int, rounds: int, seed: int = 0) -> float:
    """GB/s of the decode of B rows of k picks among `latents` rows of d floats."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(latents, d, generator=g)
    ids = torch.stack([torch.randperm(latents, generator=g)[:k] for _ in range(B)])
    vals = torch.rand(B, k, generator=g)
    op = ops.native("sparse_decode", "cpu")
    if op is None:
        raise SystemExit("the C++ extension (fastsae._C) with sparse_decode is not built")
    op(vals, ids, W, None)
    times = []
    for _ in range(rounds):
        t = time.process_time()
        op(vals, ids, W, None)
        times.append(time.process_time() - t)
    return B * k * d * 4 / statistics.median(times) / 1e9


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--k", type=int, default=192)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--latents", type=int, nargs="+", default=[256, 512, 2048, 8192, 32768])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"sparse_decode, B={args.batch} k={args.k} d={args.d}, one thread, CPU-time medians of {args.rounds}")
    print("| distinct rows | their bytes | GB/s |")
    print("|---:|---:|---:|")
    for n in args.latents:
        if n < args.k:
            raise SystemExit(f"--latents {n} is below k={args.k}: each row picks k distinct latents")
        print(f"| {n} | {n * args.d * 4 / 2**20:.1f} MiB | {rate(args.batch, args.k, args.d, n, args.rounds):.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
