"""Train an SAE on built-in toy data with fastsae's Trainer for about a minute and report what it learned."""

from __future__ import annotations

import argparse

import torch

from .toy.data import ToyData
from .toy.train import INITS, make_toy_sae, train_toy


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=60.0,
                   help="training time budget (default 60): the step count is chosen to fit it, so the run "
                        "gets its whole lr schedule; training also stops if the budget runs out")
    p.add_argument("--max-steps", type=int, default=20000, help="at most this many steps (default 20000)")
    p.add_argument("--batch", type=int, default=256, help="rows per step (default 256)")
    p.add_argument("--arch", choices=("topk", "standard", "batchtopk", "jumprelu"), default="topk",
                   help="topk (default), standard = ReLU + L1, batchtopk or jumprelu")
    p.add_argument("--d", type=int, default=256, help="activation dimension")
    p.add_argument("--features", type=int, default=512, help="ground-truth features G")
    p.add_argument("--ratio", type=float, default=2.0, help="d_sae / G")
    p.add_argument("--k", type=int, default=5, help="active latents per sample (topk, batchtopk)")
    p.add_argument("--l1", type=float, default=0.2, help="L1 coefficient (standard)")
    p.add_argument("--l0", type=float, default=0.1, help="L0 coefficient (jumprelu)")
    p.add_argument("--init", choices=INITS, default="random",
                   help="decoder init: random (default: faster on toy data, see docs/init_study.md) "
                        "or data samples")
    p.add_argument("--resample-every", type=int, default=None,
                   help="steps between resamplings of dead latents (default: the Trainer's, relative to "
                        "the run; 0 = never)")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="steps of the shrinkage fix after training (decoder refit without the penalty)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seeds the toy data and the SAE")
    p.add_argument("--eval-samples", type=int, default=16384, help="fresh samples the result is scored on")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these small matrices gain little from more, and "
                        "threads that outnumber free cores slow every step down; 0 = torch's default)")


PROBE_STEPS = 40  # steps of a short run of the same setup, to fit the step count into the budget
PROBE_SKIP = 10  # its first steps (setup, warm-up) are slower than the rest: they are not timed


def _steps_for_budget(args, data, coef) -> int:
    """How many steps fit in args.seconds (at most --max-steps), from a short timed run of the same setup."""
    if args.max_steps <= PROBE_STEPS:
        return args.max_steps
    probe = train_toy(make_toy_sae(args.arch, data, args.ratio, coef, seed=args.seed), data, PROBE_STEPS,
                      batch=args.batch, lr=args.lr, eval_samples=64, progress=False, track_every=PROBE_SKIP)
    at = {h["step"]: h["seconds"] for h in probe.history}
    if PROBE_SKIP in at and PROBE_STEPS in at:
        per_step = (at[PROBE_STEPS] - at[PROBE_SKIP]) / (PROBE_STEPS - PROBE_SKIP)
    else:  # stopped early: the whole probe
        per_step = probe.seconds / max(probe.steps, 1)
    return min(args.max_steps, max(PROBE_STEPS, int(args.seconds / max(per_step, 1e-6))))


def run(args: argparse.Namespace) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    data = ToyData(d=args.d, n_features=args.features, seed=args.seed)
    coef = {"topk": args.k, "batchtopk": args.k, "standard": args.l1, "jumprelu": args.l0}[args.arch]
    what = {"topk": f"k={args.k}", "batchtopk": f"k={args.k}", "standard": f"L1={args.l1:g}",
            "jumprelu": f"L0={args.l0:g}"}[args.arch]
    steps = _steps_for_budget(args, data, coef)
    sae = make_toy_sae(args.arch, data, args.ratio, coef, seed=args.seed)
    print(f"demo: {type(sae).__name__} d_in={sae.d_in} d_sae={sae.d_sae} {what}, {args.init} init, "
          f"backend={sae.backend}, on toy data with {data.n_features} known features "
          f"(mean {data.mean_active:g} active per sample); {steps} steps of fastsae's Trainer to fit a "
          f"budget of {args.seconds:.0f}s")
    # the budget's margin: a step may run slower than the probe's on a busy machine
    result = train_toy(sae, data, steps, batch=args.batch, lr=args.lr, init=args.init, seconds=args.seconds * 1.5,
                       resample_every=args.resample_every, eval_samples=args.eval_samples, seed=args.seed,
                       finetune_steps=args.finetune_steps)
    m = result.metrics
    rate = result.steps * args.batch / max(result.seconds, 1e-9)
    print(f"\ntrained {result.steps} steps in {result.seconds:.1f}s ({rate:,.0f} samples/s); "
          f"scored on {m['eval_samples']} fresh samples")
    print(f"  MMCS                 {m['mmcs']:.4f}   (mean max cosine to the true features)")
    print(f"  recovered (cos>0.99) {m['recovered']:.1%} of {data.n_features} features")
    print(f"  L0                   {m['l0']:.2f}     (active latents per sample)")
    print(f"  FVU                  {m['fvu']:.4f}   (fraction of variance unexplained)")
    print(f"  dead latents         {m['dead_latents']} of {sae.d_sae} never fired "
          f"({m['resampled_latents']} resampled in training)")
    print(f"  shrinkage γ          {m['shrinkage']:.3f}    (1 = unbiased, < 1 = biased low)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
