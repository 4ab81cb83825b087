"""Dense Adam's row-sparse step against torch's fused Adam alone, in one process.

    python -m bench.optim_step                       # the shapes below, one thread
    python -m bench.optim_step --shape 384,4096,3000 --rounds 15

For each shape (d_in, d_sae, u touched latents) it times, interleaved round by round so that a
load change on a shared machine hits every row alike:
  fused adam      DenseAdam.opt.step() with the gradients already in place (aten::_fused_adam_:
                  the floor, dense Adam's memory traffic)
  step (rows fed) DenseAdam.step_row_sparse with the unit-norm decoder, Adam fed the rows by the
                  C++ op adam_rows_step_ where it applies (CPU, every parameter a multiple of 16
                  entries), else the same as the next row
  step (buffers)  the same step with gradient buffers (DenseAdam.rows_fed = False): the C++
                  buffer builder (dense_grads_from_rows_), fused Adam, the C++ normalize_rows_
  step (torch)    the same step on the plain-PyTorch path (DenseAdam.native = False): zero,
                  scatter, gather, project and normalise as separate torch ops
  grads op        dense_grads_from_rows_ alone;  normalize op: normalize_rows_ alone
Times are CPU seconds of this process (time.process_time), medians over the rounds, in ms and
as a multiple of the fused Adam's.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import fastsae
from fastsae.optim import DenseAdam
from fastsae.sparse import RowSparseGrads

from .timing import cpu_ms

SHAPES = [(256, 1024, 700), (384, 4096, 3000), (256, 16384, 12000)]


def _rows(d_in: int, d_sae: int, u: int, seed: int = 0) -> RowSparseGrads:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randperm(d_sae, generator=g)[:u].sort().values
    r = lambda *s: torch.randn(*s, generator=g) * 1e-3  # noqa: E731
    return RowSparseGrads(latents, r(u, d_in).t(), r(u), r(u, d_in), d_sae)


def _optimizer(d_in: int, d_sae: int, native: bool, rows_fed: bool = True) -> DenseAdam:
    sae = fastsae.TopKSAE(d_in=d_in, d_sae=d_sae, k=32)
    opt = DenseAdam(dict(sae.named_parameters()), lr=1e-4, unit_norm_rows=("W_dec",))
    opt.native, opt.rows_fed = native, rows_fed
    return opt


def measure(d_in: int, d_sae: int, u: int, rounds: int, min_ms: float = 60.0) -> dict[str, float]:
    rows, db = _rows(d_in, d_sae, u), torch.randn(d_in) * 1e-3
    fed, buffers, old, floor = (_optimizer(d_in, d_sae, n, r) for n, r in
                                ((True, True), (True, False), (False, False), (True, False)))
    floor.step_row_sparse(rows, db)  # allocates its buffers; then keep them as the gradients
    for name, m in floor.master.items():
        m.grad = floor._grads[name]
    F = torch.ops.fastsae
    g = floor._grads
    w = buffers.master["W_dec"]
    fns = {
        "fused adam": floor.opt.step,
        "step (rows fed)": lambda: fed.step_row_sparse(rows, db),
        "step (buffers)": lambda: buffers.step_row_sparse(rows, db),
        "step (torch)": lambda: old.step_row_sparse(rows, db),
        "grads op": lambda: F.dense_grads_from_rows_(g["W_enc"], g["b_enc"], g["W_dec"], rows.latents, rows.W_enc.t(),
                                                     rows.b_enc, rows.W_dec, w),
        "normalize op": lambda: F.normalize_rows_(w),
    }
    number = {}
    for name, fn in fns.items():  # warm up; enough calls per sample for min_ms
        fn()
        number[name] = max(1, int(min_ms / max(cpu_ms(fn, 1), 1e-3)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(cpu_ms(fn, number[name]))
    return {name: statistics.median(s) for name, s in samples.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", help="d_in,d_sae,u (repeatable; default: the three shapes)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else SHAPES
    if fastsae.ops.native("dense_grads_from_rows_", "cpu") is None:
        raise SystemExit("the C++ extension (fastsae._C) with dense_grads_from_rows_ is not built")
    print(f"threads={args.threads} rounds={args.rounds}, CPU ms per call (process_time medians), x fused adam")
    print("| d_in | d_sae | u | fused adam | step (rows fed) | step (buffers) | step (torch) | grads op "
          "| normalize op |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d_in, d_sae, u in shapes:
        t = measure(d_in, d_sae, u, args.rounds)
        f = t["fused adam"]
        cells = [f"{f:.2f}"] + [f"{t[k]:.2f} ({t[k] / f:.2f}x)" for k in
                                ("step (rows fed)", "step (buffers)", "step (torch)", "grads op", "normalize op")]
        print(f"| {d_in} | {d_sae} | {u} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
