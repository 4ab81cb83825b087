"""Train a TopK SAE on built-in toy data for about a minute and report what it learned."""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

from .metrics import max_cosine_similarities
from .sae import TopKSAE
from .toy import ToyData


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=60.0, help="training time budget (default 60)")
    p.add_argument("--max-steps", type=int, default=20000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--d", type=int, default=256, help="activation dimension")
    p.add_argument("--features", type=int, default=512, help="ground-truth features G")
    p.add_argument("--ratio", type=float, default=2.0, help="d_sae / G")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    data = ToyData(d=args.d, n_features=args.features, seed=args.seed)
    sae = TopKSAE(d_in=args.d, d_sae=int(args.ratio * args.features), k=args.k)
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    print(f"demo: TopK SAE d_in={sae.d_in} d_sae={sae.d_sae} k={sae.cfg.k}, backend={sae.backend}, "
          f"on toy data with {args.features} known features; budget {args.seconds:.0f}s")
    start = time.perf_counter()
    bar = tqdm(total=args.max_steps, desc="training", unit="step", mininterval=1.0)
    step = 0
    while step < args.max_steps and time.perf_counter() - start < args.seconds:
        out = sae.training_forward(data.sample(args.batch))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        with torch.no_grad():  # unit-norm decoder rows keep the scale in the activations
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
        fired[out.acts.indices[out.acts.values > 0]] = True
        step += 1
        bar.update(1)
        if step % 100 == 0:
            bar.set_postfix(fvu=f"{float(out.fvu):.4f}", l0=f"{float(out.l0):.1f}")
    bar.close()
    elapsed = time.perf_counter() - start

    with torch.no_grad():
        x = data.sample(4096)
        out = sae.training_forward(x)
        cos = max_cosine_similarities(data.features, sae.W_dec)
    print(f"\ntrained {step} steps in {elapsed:.1f}s ({step * args.batch / elapsed:,.0f} samples/s)")
    print(f"  FVU                 {float(out.fvu):.4f}   (fraction of variance unexplained)")
    print(f"  L0                  {float(out.l0):.2f}     (active latents per sample)")
    print(f"  MMCS                {float(cos.mean()):.4f}   (mean max cosine to the true features)")
    print(f"  recovered (cos>0.9) {float((cos > 0.9).float().mean()):.1%} of {args.features} features")
    print(f"  dead latents        {int((~fired).sum())} of {sae.d_sae} never fired in training")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
