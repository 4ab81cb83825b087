"""The user paths' step against the encoder GEMM, in one process: where a step's time goes.

    python -m bench.step_profile                                  # the shapes below, one thread
    python -m bench.step_profile --shape 256,16384,32,2048 --repeats 7

For each shape (d_in, d_sae, k, batch) it times, interleaved round by round so that a load
change on a shared machine hits every row alike:
  gemm            x @ W_enc alone (the floor)
  module loop     fastsae.TopKSAE in a plain user loop: training_forward().loss.backward(),
                  torch.optim.Adam(fused).step(), zero_grad (the drop-in path)
  trainer         fastsae's Trainer.train_step (sparse backward, dense Adam, unit-norm decoder,
                  tracking), with no dead latent
  trainer+auxk    the same with half the latents dead, so AuxK runs every step (its selection
                  taken in the encoder's pass where the backend has topk_encode_dead)
and, for the Trainer step, its parts (select, decode, backward, optimizer, AuxK), the optimizer
with gradient buffers (its path where Adam cannot be fed the rows) and the fused Adam kernel
alone (the optimizer's floor). Times are
CPU seconds of this process (time.process_time), steadier than wall time when other jobs share
the cores; the median over rounds is reported as a multiple of the GEMM's. The process keeps
freed memory (fastsae.keep_freed_memory, which the Trainer calls), so no row pays page faults
for its buffers; bench.fit_loop times the loops on fresh batches with and without it. Writes
bench/results/step_profile-<slug>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from .report import RESULTS, git_info, machine_info
from .timing import cpu_ms

SHAPES = [(256, 16384, 32, 2048), (256, 16384, 32, 512), (384, 4096, 32, 1024), (256, 1024, 5, 256)]


def build(shape, seed=0):
    from fastsae import SAEConfig, TopKSAE, keep_freed_memory
    from fastsae.trainer import TrainConfig, Trainer

    d, n, k, B = shape
    keep_freed_memory()  # as the Trainer built below does: every path timed with it
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g)
    cfg = SAEConfig(d_in=d, d_sae=n, architecture="topk", k=k)
    torch.manual_seed(seed)
    module = TopKSAE(cfg)
    opt = torch.optim.Adam(module.parameters(), lr=1e-4, fused=True)

    def module_step():
        module.training_forward(x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def trainer(dead: bool):
        out = tempfile.mkdtemp(prefix="fastsae-prof-")
        tc = TrainConfig(sae=cfg, steps=10**9, batch_size=B, lr=1e-4, b_dec_init="zeros", out_dir=out,
                         progress=False, console=False, plot=False, checkpoint_every=0, log_every=10**9,
                         dead_tokens=10**12)
        torch.manual_seed(seed)
        tr = Trainer(tc, x, sae=TopKSAE(cfg))
        if dead:  # half the latents dead: AuxK runs (what a toy run's start looks like)
            tr.tracker.tokens_since_fired[: n // 2] = 10**12 + 1
            tr.tracker.tokens_since_fired[n // 2:] = 0
            tr.tracker.dead_tokens = 10**12
        return tr

    tr, tr_aux = trainer(False), trainer(True)

    def trainer_step(t=tr):
        t.train_step(x)
        if t is tr_aux:  # keep half the latents dead
            t.tracker.tokens_since_fired[: n // 2] = 10**12 + 1

    W = module.W_enc.detach().clone()
    return {"gemm": lambda: torch.mm(x, W), "module loop": module_step, "trainer": trainer_step,
            "trainer+auxk": lambda: trainer_step(tr_aux)}, tr, x


def parts(tr, x):
    """The Trainer step's parts, timed alone (no optimizer effects between them)."""
    from fastsae.sae import reconstruction_terms

    sae = tr.sae
    with torch.no_grad():
        sel = sae.select(x, train=True)
        x_hat = sae.decode_selection(sel)
        err, _, _ = reconstruction_terms(x_hat, x)
    rows, db = sae.sparse_backward(x, sel, (2.0 / x.shape[0]) * err)
    dead = torch.arange(sae.d_sae // 2)
    _, dead_preacts = sae.select_for_training(x, dead, tr.k_aux)
    # torch's fused Adam kernel alone over tensors of the parameters' shapes: the optimizer's
    # floor (what dense Adam costs with no gradient buffer to build and no Python around it)
    shapes = [p.shape for p in sae.parameters()]
    params, grads, exp_avg = ([torch.randn(s) for s in shapes] for _ in range(3))
    exp_avg_sq, steps = [torch.rand(s) for s in shapes], [torch.tensor(1.0) for _ in shapes]

    def adam_kernel():
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(params, grads, exp_avg, exp_avg_sq, [], steps, amsgrad=False, lr=1e-4, beta1=0.9,
                           beta2=0.999, weight_decay=0.0, eps=1e-8, maximize=False)

    return {
        "select (topk_encode)": lambda: sae.select(x, train=True),
        "select + AuxK's selection (half dead)": lambda: sae.select_for_training(x, dead, tr.k_aux),
        "decode_selection": lambda: sae.decode_selection(sel),
        "sparse_backward": lambda: sae.sparse_backward(x, sel, (2.0 / x.shape[0]) * err),
        "dense Adam step_row_sparse": lambda: tr.opt.step_row_sparse(rows, db),
        "dense Adam step_row_sparse, gradient buffers": lambda: buffered(tr.opt, rows, db),
        "Adam kernel alone (the optimizer's floor)": adam_kernel,
        "AuxK's loss and gradients, scanning the dead columns (half dead)":
            lambda: sae.auxk_grads(x, -err, dead, tr.k_aux, 1.0),
        "AuxK's loss and gradients, given the selection": lambda: sae.auxk_grads(x, -err, dead, tr.k_aux, 1.0,
                                                                                 dead_preacts),
    }


def buffered(opt, rows, db):
    """DenseAdam's step with gradient buffers filled (the path before Adam was fed the rows)."""
    opt.rows_fed = False
    try:
        opt.step_row_sparse(rows, db)
    finally:
        opt.rows_fed = True


def profile(shape, repeats: int) -> dict:
    fns, tr, x = build(shape)
    fns.update(parts(tr, x))
    for fn in fns.values():  # warm-up, and a calibration of how many calls make ~0.2 s
        fn()
    number = {name: max(1, int(0.2 / max(cpu_ms(fn, 1) / 1e3, 1e-6))) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(cpu_ms(fn, number[name]))
    med = {name: statistics.median(v) for name, v in samples.items()}
    gemm = med["gemm"]
    return {"shape": dict(zip(("d_in", "d_sae", "k", "batch"), shape)), "median_cpu_ms": med,
            "x_gemm": {name: v / gemm for name, v in med.items()}, "samples_cpu_ms": samples,
            "auxk_share_of_step": (med["trainer+auxk"] - med["trainer"]) / med["trainer+auxk"]}


def markdown(results: list[dict], machine: dict) -> str:
    load = machine.get("load_average_at_start")
    out = ["# The user paths' step against the encoder GEMM (CPU, one thread)", "",
           f"CPU time of this process, median over rounds interleaved across rows; torch "
           f"{torch.__version__}, {machine.get('cpu')}. Load average at start / end: {load} / "
           f"{machine.get('load_average_at_end')} on {machine.get('logical_cpus')} logical CPUs "
           "(a shared machine: CPU time is steadier than wall time, not immune).", ""]
    for r in results:
        s = r["shape"]
        out += [f"## d_in={s['d_in']} d_sae={s['d_sae']} k={s['k']} B={s['batch']}", "",
                "| path | CPU ms | x GEMM |", "|---|---:|---:|"]
        for name, ms in r["median_cpu_ms"].items():
            out.append(f"| {name} | {ms:.2f} | {r['x_gemm'][name]:.2f} |")
        out += ["", f"AuxK's share of a step with half the latents dead: {r['auxk_share_of_step']:.0%}", ""]
    return "\n".join(out) + "\n"


def add_common_args(p: argparse.ArgumentParser, name: str) -> None:
    """The options bench.step_profile and bench.fit_loop share: shapes, threads, output."""
    p.add_argument("--shape", action="append", default=[], help="d_in,d_sae,k,batch (repeatable; default: "
                   + "; ".join(",".join(map(str, s)) for s in SHAPES) + ")")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--name", default=name, help="file name stem")


def shapes_of(args) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in s.split(",")) for s in args.shape] or SHAPES


def write_results(args, machine: dict, results: list[dict], text: str) -> None:
    """<out>/<name>.json (machine, commit, results) and .md (text), and text on stdout."""
    machine["load_average_at_end"] = list(os.getloadavg())
    rep = {"machine": machine, "git": git_info(), "threads": args.threads, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(rep, indent=1))
    (args.out / f"{args.name}.md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.step_profile", description=__doc__.split("\n\n")[0])
    add_common_args(p, "step_profile")
    p.add_argument("--repeats", type=int, default=5, help="rounds (default 5)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = machine_info()
    results = []
    for shape in shapes_of(args):
        r = profile(shape, args.repeats)
        results.append(r)
        print(json.dumps({"shape": r["shape"], "x_gemm": {k: round(v, 3) for k, v in r["x_gemm"].items()}}),
              flush=True)
    write_results(args, machine, results, markdown(results, machine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
