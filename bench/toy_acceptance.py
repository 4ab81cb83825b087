"""Toy acceptance: does fastsae's Trainer recover the ground truth with its defaults?

    python -m bench.toy_acceptance                       # TopK k=5 and ReLU+L1 0.2 at d_sae=2G, seeds 0 1 2
    python -m bench.toy_acceptance --arch topk --seeds 0 --steps 5000

Each run sets only what a user must: the architecture, the width (d_sae = 2·G), k or the L1
coefficient, steps, batch and lr; everything else is TrainConfig's default. The data is the
default toy generator (fastsae.toy.ToyData: d=256, G=512 features, ~5 active, correlated,
decaying probabilities) with the run's seed, which also seeds the SAE. MMCS and the fraction
recovered are tracked against the true features; the final metrics are scored on 16 384 fresh
samples. Results: OUT/<arch>-seed<s>.json per run (resumable: finished runs are skipped) and
OUT/acceptance.md, the table docs/toy_recovery.md quotes. One thread per run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fastsae import metrics
from fastsae.config import SAEConfig, TrainConfig
from fastsae.toy.data import ToyData
from fastsae.toy.train import evaluate
from fastsae.trainer import Trainer

from .report import RESULTS, git_info, machine_info

ARCHS = {"topk": dict(architecture="topk", k=5), "standard": dict(architecture="standard", l1_coefficient=0.2)}
NAMES = {"topk": "TopK, k = 5", "standard": "ReLU + L1, L1 = 0.2"}


def run_one(arch: str, seed: int, steps: int, batch: int, lr: float, track_every: int, out: Path,
            finetune_steps: int = 0) -> dict:
    """One acceptance run: the Trainer with defaults; returns the metrics and the MMCS curve."""
    data = ToyData(seed=seed)
    sae_cfg = SAEConfig(d_in=data.d, d_sae=2 * data.n_features, **ARCHS[arch])
    history = []
    start = time.perf_counter()

    def track(trainer, _scalars=None):
        if trainer.step % track_every == 0 or trainer.step == trainer.cfg.total_steps:
            cos = metrics.max_cosine_similarities(data.features, trainer.sae.W_dec)
            history.append({"step": trainer.step, "mmcs": float(cos.mean()),
                            "recovered": float((cos > 0.99).float().mean()),
                            "seconds": time.perf_counter() - start})
        return False

    with tempfile.TemporaryDirectory(prefix="fastsae-accept-") as tmp:
        cfg = TrainConfig(sae=sae_cfg, steps=steps, batch_size=batch, lr=lr, seed=seed, out_dir=tmp,
                          finetune_steps=finetune_steps, progress=False, console=False, plot=False,
                          checkpoint_every=0, log_every=max(1, steps // 20))
        trainer = Trainer(cfg, data.source(batch))
        track(trainer)
        trainer.fit(callback=track)
        log = trainer.tracker.history
    result = {"arch": arch, "seed": seed, "steps": steps, "batch": batch, "lr": lr, "finetune_steps": finetune_steps,
              "seconds": time.perf_counter() - start, "metrics": evaluate(trainer.sae, data),
              "resampled_latents": trainer.resampled, "history": history,
              "log": [{k: r[k] for k in ("step", "fvu", "l0", "dead_fraction", "auxk") if k in r} for r in log],
              "config": cfg.to_dict()}
    return result


def table(results: list[dict]) -> str:
    lines = ["| SAE | seed | MMCS | recovered (cos > 0.99) | L0 | FVU | dead latents | resampled | shrinkage γ "
             "| minutes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["arch"], r["seed"])):
        m = r["metrics"]
        lines.append(f"| {NAMES[r['arch']]} | {r['seed']} | {m['mmcs']:.4f} | {m['recovered']:.1%} | {m['l0']:.2f} "
                     f"| {m['fvu']:.4f} | {m['dead_latents']} | {r['resampled_latents']} | {m['shrinkage']:.3f} "
                     f"| {r['seconds'] / 60:.1f} |")
    for arch in sorted({r["arch"] for r in results}):
        mm = [r["metrics"]["mmcs"] for r in results if r["arch"] == arch]
        lines.append(f"| **{NAMES[arch]}**: min / mean over {len(mm)} seeds | | **{min(mm):.4f}** / "
                     f"{statistics.mean(mm):.4f} | | | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.toy_acceptance", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=sorted(ARCHS), help="architectures to run")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (data and SAE)")
    p.add_argument("--steps", type=int, default=20000, help="training steps (default 20000)")
    p.add_argument("--batch", type=int, default=256, help="rows per step (default 256)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--finetune-steps", type=int, default=0, help="fine-tuning steps after training (default 0)")
    p.add_argument("--track-every", type=int, default=1000, help="steps between MMCS measurements")
    p.add_argument("--out", type=Path, default=RESULTS / "toy_acceptance", help="results folder")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for arch in args.arch:
        for seed in args.seeds:
            path = args.out / f"{arch}-seed{seed}.json"
            if path.exists() and json.loads(path.read_text())["steps"] == args.steps:
                results.append(json.loads(path.read_text()))
                continue
            print(f"{arch} seed {seed}: {args.steps} steps ...", flush=True)
            r = run_one(arch, seed, args.steps, args.batch, args.lr, args.track_every, args.out, args.finetune_steps)
            r["machine"] = {**machine_info(), "load_average_at_end": list(os.getloadavg())}
            r["git"] = git_info()
            path.write_text(json.dumps(r, indent=1))
            m = r["metrics"]
            print(f"  MMCS {m['mmcs']:.4f}  recovered {m['recovered']:.1%}  L0 {m['l0']:.2f}  FVU {m['fvu']:.4f}  "
                  f"dead {m['dead_latents']}  γ {m['shrinkage']:.3f}  ({r['seconds'] / 60:.1f} min)", flush=True)
            results.append(r)
    text = (f"Trainer defaults; {args.steps} steps, batch {args.batch}, Adam lr {args.lr:g}, d_sae = 2·G = 1024; "
            f"default toy generator per seed; metrics on 16 384 fresh samples.\n\n" + table(results))
    (args.out / "acceptance.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
