"""Shrinkage before and after the Trainer's fine-tuning stage, on toy data.

    python -m bench.shrinkage                      # ReLU + L1 at 0.1, 0.2, 0.4 on the small generator
    python -m bench.shrinkage --d 256 --features 512 --steps 20000 --finetune-steps 2000 --l1 0.2

Each run trains with the Trainer's defaults for --steps steps, is scored (γ, FVU, MMCS, L0 on
16 384 fresh samples), then runs the fine-tuning stage (TrainConfig.finetune_steps: encoder
frozen, decoder refit by MSE alone) and is scored again. γ = E‖x̂‖²/E⟨x̂, x⟩ (< 1: shrunk).
TopK rows show the stage on an architecture without a penalty. Writes OUT/shrinkage-<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from fastsae.config import SAEConfig, TrainConfig
from fastsae.toy.data import ToyData
from fastsae.toy.train import evaluate
from fastsae.trainer import Trainer

from .report import RESULTS, git_info, machine_info

KEYS = ("shrinkage", "fvu", "mmcs", "recovered", "l0")


def run(data: ToyData, sae: dict, steps: int, finetune: int, batch: int, lr: float, seed: int,
        mode: str = "scale") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(sae=SAEConfig(d_in=data.d, d_sae=2 * data.n_features, **sae), steps=steps,
                          finetune_steps=finetune, finetune=mode, batch_size=batch, lr=lr, seed=seed, out_dir=tmp,
                          progress=False, console=False, plot=False, checkpoint_every=0)
        tr = Trainer(cfg, data.source(batch))
        tr.fit(max_steps=steps)
        before = evaluate(tr.sae, data)
        tr.fit()
        after = evaluate(tr.sae, data)
    return {"sae": sae, "before": {k: before[k] for k in KEYS}, "after": {k: after[k] for k in KEYS}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.shrinkage", description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=64, help="toy activation dimension (default 64)")
    p.add_argument("--features", type=int, default=128, help="ground-truth features G (default 128); d_sae = 2G")
    p.add_argument("--l1", type=float, nargs="+", default=[0.1, 0.2, 0.4], help="L1 coefficients")
    p.add_argument("--k", type=int, nargs="*", default=[5], help="TopK rows (k values)")
    p.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    p.add_argument("--finetune-steps", type=int, default=1000, help="fine-tuning steps (default 1000)")
    p.add_argument("--finetune", choices=("scale", "decoder"), default="scale",
                   help="what the stage refits (TrainConfig.finetune; default scale)")
    p.add_argument("--batch", type=int, default=256, help="rows per step (default 256)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak lr (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seeds data and SAE")
    p.add_argument("--name", default="small", help="results file stem")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = ToyData(d=args.d, n_features=args.features, seed=args.seed)
    configs = [dict(architecture="standard", l1_coefficient=c) for c in args.l1] + \
        [dict(architecture="topk", k=k) for k in args.k]
    rows = []
    for sae in configs:
        r = run(data, sae, args.steps, args.finetune_steps, args.batch, args.lr, args.seed, args.finetune)
        rows.append(r)
        print(json.dumps(r), flush=True)
    lines = [f"Toy data d={args.d}, G={args.features}, d_sae=2G; {args.steps} steps with the Trainer's defaults "
             f"(batch {args.batch}, lr {args.lr:g}), then {args.finetune_steps} fine-tuning steps "
             f"(finetune={args.finetune!r}); metrics on "
             "16 384 fresh samples.", "",
             "| SAE | γ before → after | FVU before → after | MMCS before → after | recovered before → after "
             "| L0 |", "|---|---|---|---|---|---|"]
    for r in rows:
        s, b, a = r["sae"], r["before"], r["after"]
        name = f"ReLU + L1 = {s['l1_coefficient']:g}" if s["architecture"] == "standard" else f"TopK k = {s['k']}"
        lines.append(f"| {name} | {b['shrinkage']:.3f} → {a['shrinkage']:.3f} | {b['fvu']:.4f} → {a['fvu']:.4f} "
                     f"| {b['mmcs']:.4f} → {a['mmcs']:.4f} | {b['recovered']:.1%} → {a['recovered']:.1%} "
                     f"| {a['l0']:.2f} |")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"shrinkage-{args.name}.json").write_text(json.dumps(
        {"settings": vars(args) | {"out": str(args.out)}, "rows": rows, "git": git_info(),
         "machine": {**machine_info(), "load_average_at_end": list(os.getloadavg())}}, indent=1))
    (args.out / f"shrinkage-{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
