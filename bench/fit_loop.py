"""The user loops as users run them, fresh batches every step, with and without
fastsae.keep_freed_memory(), one thread.

    python -m bench.fit_loop                                  # the step_profile shapes
    python -m bench.fit_loop --shape 384,4096,32,1024 --rounds 3

bench.step_profile times train_step on one batch over and over, where the allocator settles;
here each run is a fresh process (the allocator setting cannot be undone) that trains on
batches drawn from a random [64·B, d] tensor:
  trainer      Trainer(cfg, data).fit(), timed from its callback over the last 3/4 of the steps,
               no latent counted dead (AuxK off, as step_profile's "trainer");
               FASTSAE_KEEP_FREED_MEMORY=0 for "freed memory returned"
  module loop  TopKSAE in a plain loop: a random batch, training_forward().loss.backward(),
               torch.optim.Adam(fused).step(), zero_grad, with or without a
               keep_freed_memory() call first
and the encoder GEMM x @ W_enc in the same process, after the loop. Per step: CPU ms (user +
system), system ms, minor page faults, and CPU time as a multiple of the GEMM's. Rounds
alternate the settings; medians are reported. Writes bench/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .report import machine_info
from .step_profile import add_common_args, shapes_of, write_results

LOOPS = ("trainer", "module loop")
SETTINGS = ("freed memory returned", "freed memory kept")


def _usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def _gemm_ms(x: torch.Tensor, W: torch.Tensor, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        t = time.process_time()
        torch.mm(x, W)
        times.append(time.process_time() - t)
    return 1e3 * statistics.median(times)


def worker(shape, loop: str, steps: int) -> dict:
    """One run in this process: per-step CPU time, system time and faults of the loop."""
    from fastsae import SAEConfig, TopKSAE, keep_freed_memory
    from fastsae.trainer import TrainConfig, Trainer

    d, n, k, B = shape
    g = torch.Generator().manual_seed(0)
    data = torch.randn(64 * B, d, generator=g)
    cfg = SAEConfig(d_in=d, d_sae=n, architecture="topk", k=k)
    first = steps // 4
    marks = {}
    if loop == "trainer":
        # no latent counts as dead (as in step_profile's "trainer"): a short run's dead window
        # is short, and AuxK would run in some runs and not others
        tc = TrainConfig(sae=cfg, steps=steps, batch_size=B, lr=1e-4, out_dir=tempfile.mkdtemp(prefix="fastsae-fit-"),
                         progress=False, console=False, plot=False, checkpoint_every=0, dead_tokens=10**12)
        trainer = Trainer(tc, data)

        def mark(t, _scalars):
            if t.step in (first, steps):
                marks[t.step] = _usage()

        trainer.fit(callback=mark)
        W = trainer.sae.W_enc.detach()
    else:
        keep_freed_memory()  # as the Trainer does; FASTSAE_KEEP_FREED_MEMORY=0 leaves the allocator alone
        sae = TopKSAE(cfg)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
        for step in range(1, steps + 1):
            x = data[torch.randint(0, data.shape[0], (B,), generator=g)]
            sae.training_forward(x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step in (first, steps):
                marks[step] = _usage()
        W = sae.W_enc.detach()
    (u0, s0, f0), (u1, s1, f1) = marks[first], marks[steps]
    m = steps - first
    gemm = _gemm_ms(data[:B], W.clone())
    cpu = 1e3 * (u1 - u0 + s1 - s0) / m
    return {"cpu_ms": cpu, "sys_ms": 1e3 * (s1 - s0) / m, "faults": (f1 - f0) / m, "gemm_ms": gemm,
            "x_gemm": cpu / gemm}


def run(shape, loop: str, setting: str, steps: int, threads: int) -> dict:
    env = {**os.environ, "FASTSAE_KEEP_FREED_MEMORY": "1" if setting == SETTINGS[1] else "0"}
    cmd = [sys.executable, "-m", "bench.fit_loop", "--worker", ",".join(map(str, shape)), "--loop", loop,
           "--steps", str(steps), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent,
                         timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"the {loop} run at {shape} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def steps_for(shape, seconds: float) -> int:
    """Steps that take about `seconds` (a step costs about twice the GEMM), at least 8."""
    d, n, _, B = shape
    gemm_s = _gemm_ms(torch.randn(B, d), torch.randn(d, n), 3) / 1e3
    return max(8, min(2000, int(seconds / (2 * gemm_s))))


def markdown(results: list[dict], machine: dict) -> str:
    out = ["# The user loops on fresh batches, freed memory returned to the OS or kept (CPU, one thread)", "",
           f"Medians over alternated runs, each a fresh process; torch {torch.__version__}, {machine.get('cpu')}, "
           f"{machine.get('platform')}. CPU ms = user + system time per step; x GEMM against x @ W_enc timed in the "
           "same process.", ""]
    for r in results:
        s = r["shape"]
        out += [f"## d_in={s[0]} d_sae={s[1]} k={s[2]} B={s[3]} ({r['steps']} steps a run)", "",
                "| loop | allocator | CPU ms | system ms | page faults | x GEMM |", "|---|---|---:|---:|---:|---:|"]
        for loop in LOOPS:
            for setting in SETTINGS:
                m = r["median"][loop][setting]
                out.append(f"| {loop} | {setting} | {m['cpu_ms']:.2f} | {m['sys_ms']:.2f} | {m['faults']:.0f} | "
                           f"{m['x_gemm']:.2f} |")
        out.append("")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fit_loop", description=__doc__.split("\n\n")[0])
    add_common_args(p, "fit_loop")
    p.add_argument("--rounds", type=int, default=3, help="runs per loop and setting (default 3)")
    p.add_argument("--seconds", type=float, default=4.0, help="about how long one run trains (default 4)")
    p.add_argument("--steps", type=int, help="steps a run (default: about --seconds worth)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--loop", choices=LOOPS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(tuple(int(v) for v in args.worker.split(",")), args.loop, args.steps)))
        return 0
    machine = machine_info()
    results = []
    for shape in shapes_of(args):
        steps = args.steps or steps_for(shape, args.seconds)
        runs = {loop: {s: [] for s in SETTINGS} for loop in LOOPS}
        for _ in range(args.rounds):
            for loop in LOOPS:
                for setting in SETTINGS:
                    runs[loop][setting].append(run(shape, loop, setting, steps, args.threads))
        median = {loop: {s: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
                         for s, rs in by.items()} for loop, by in runs.items()}
        results.append({"shape": list(shape), "steps": steps, "median": median, "runs": runs})
        print(json.dumps({"shape": shape, "x_gemm": {f"{loop}, {s}": round(m["x_gemm"], 3)
                                                     for loop, by in median.items() for s, m in by.items()}}),
              flush=True)
    write_results(args, machine, results, markdown(results, machine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
