"""Data-sample initialisation against random init on toy data: MMCS and recovery against steps.

    python -m bench.init_study                         # small generator, ReLU + L1 and TopK, 2000 steps
    python -m bench.init_study --d 256 --features 512 --steps 5000 --arch standard

Every variant trains with the Trainer's recipe (b_dec at the geometric median of a sample,
dead-latent handling, lr decay over the last 20 %: the defaults when it was measured) from
the same seed; only the dictionary's starting point
differs. Variants (which weights come from samples, centring, how many):
  random            unit random decoder rows, W_enc = W_decᵀ (the default)
  data tied         decoder rows = normalised samples − b_dec, W_enc = W_decᵀ (TrainConfig.init="data")
  data, raw         the same without centring (samples, not samples − b_dec)
  data decoder      decoder rows from samples, encoder left random
  half data         half the rows from samples, half random (data_init_fraction=0.5)
  data, 1-feature   decoder rows from samples that hold a single active feature (toy data's
                    codes tell which; an oracle no real run has: it shows what a sample-init
                    needs to keep its lead)
Writes OUT/init_study-<name>.{json,md} and a PNG of MMCS / fraction recovered against steps.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from fastsae import metrics
from fastsae.config import SAEConfig, TrainConfig
from fastsae.constraints import normalize_rows_
from fastsae.init import init_from_data_, tie_encoder_
from fastsae.toy.data import ToyData
from fastsae.trainer import Trainer

from .report import RESULTS, git_info, machine_info


def _samples(data: ToyData, n: int, single: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(777)
    if not single:
        return data.sample(n, generator=gen)
    rows = []
    while sum(r.shape[0] for r in rows) < n:
        x, codes = data.sample(8192, return_codes=True, generator=gen)
        rows.append(x[(codes > 0).sum(1) == 1])
    return torch.cat(rows)[:n]


@torch.no_grad()
def apply_variant(name: str, sae, data: ToyData) -> None:
    n = sae.d_sae
    if name == "random":
        return
    if name == "data tied":
        init_from_data_(sae, _samples(data, 4 * n))
    elif name == "data, raw":
        init_from_data_(sae, _samples(data, 4 * n) + sae.b_dec)  # atoms = the samples themselves
    elif name == "data decoder":
        enc = sae.W_enc.clone()
        init_from_data_(sae, _samples(data, 4 * n))
        sae.W_enc.copy_(enc)
    elif name == "half data":
        init_from_data_(sae, _samples(data, 4 * n), fraction=0.5, generator=torch.Generator().manual_seed(1))
    elif name == "data, 1-feature":
        x = _samples(data, n, single=True)
        sae.W_dec.copy_(x)
        normalize_rows_(sae.W_dec)
        tie_encoder_(sae)
    else:
        raise ValueError(name)


VARIANTS = ("random", "data tied", "data, raw", "data decoder", "half data", "data, 1-feature")


def run(data, sae_kw, variant, steps, batch, lr, seed, track_every) -> dict:
    history = []

    def track(tr, _s=None):
        if tr.step % track_every == 0:
            cos = metrics.max_cosine_similarities(data.features, tr.sae.W_dec)
            history.append({"step": tr.step, "mmcs": float(cos.mean()),
                            "recovered": float((cos > 0.99).float().mean())})
        return False

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(sae=SAEConfig(d_in=data.d, d_sae=2 * data.n_features, **sae_kw), steps=steps,
                          batch_size=batch, lr=lr, seed=seed, out_dir=tmp, progress=False, console=False,
                          plot=False, checkpoint_every=0,
                          # the defaults this study was measured with: the variants centre their
                          # samples with b_dec, and "data, raw" undoes it
                          b_dec_init="geometric_median", decay_start=0.8)
        tr = Trainer(cfg, data.source(batch))
        apply_variant(variant, tr.sae, data)
        track(tr)
        tr.fit(callback=track)
    return {"variant": variant, "sae": sae_kw, "history": history}


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({r["sae"]["architecture"] for r in results})
    fig, axes = plt.subplots(len(archs), 2, figsize=(11, 3.6 * len(archs)), squeeze=False)
    for row, arch in zip(axes, archs):
        for r in (r for r in results if r["sae"]["architecture"] == arch):
            steps = [h["step"] for h in r["history"]]
            row[0].plot(steps, [h["mmcs"] for h in r["history"]], label=r["variant"])
            row[1].plot(steps, [h["recovered"] for h in r["history"]], label=r["variant"])
        row[0].set_ylabel(f"{arch}: MMCS")
        row[1].set_ylabel(f"{arch}: recovered (cos > 0.99)")
        for ax in row:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.init_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=64, help="toy activation dimension (default 64)")
    p.add_argument("--features", type=int, default=128, help="ground-truth features G (default 128); d_sae = 2G")
    p.add_argument("--arch", nargs="+", choices=("standard", "topk"), default=["standard", "topk"])
    p.add_argument("--l1", type=float, default=0.2, help="L1 coefficient (standard)")
    p.add_argument("--k", type=int, default=5, help="k (topk)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--track-every", type=int, default=100)
    p.add_argument("--name", default="small")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = ToyData(d=args.d, n_features=args.features, seed=args.seed)
    results = []
    for arch in args.arch:
        kw = dict(architecture=arch, l1_coefficient=args.l1) if arch == "standard" \
            else dict(architecture=arch, k=args.k)
        for v in args.variants:
            r = run(data, kw, v, args.steps, args.batch, args.lr, args.seed, args.track_every)
            results.append(r)
            h = r["history"]
            print(f"{arch:8s} {v:16s} MMCS at 0 / {h[len(h) // 4]['step']} / end: {h[0]['mmcs']:.3f} / "
                  f"{h[len(h) // 4]['mmcs']:.3f} / {h[-1]['mmcs']:.4f}  recovered at end {h[-1]['recovered']:.1%}",
                  flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"init_study-{args.name}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"settings": vars(args) | {"out": str(args.out)}, "results": results, "git": git_info(),
         "machine": {**machine_info(), "load_average_at_end": list(os.getloadavg())}}, indent=1))
    marks = sorted({0, args.steps // 10, args.steps // 4, args.steps // 2, args.steps})
    lines = [f"d={args.d}, G={args.features}, d_sae=2G, {args.steps} steps, batch {args.batch}, lr {args.lr:g}, "
             "Trainer defaults otherwise. MMCS at steps " + ", ".join(map(str, marks)) + "; recovered at the end.", "",
             "| SAE | init | " + " | ".join(f"MMCS @{m}" for m in marks) + " | recovered |",
             "|---|---|" + "---:|" * (len(marks) + 1)]
    for r in results:
        at = {h["step"]: h for h in r["history"]}
        cells = [f"{at[m]['mmcs']:.3f}" if m in at else "" for m in marks]
        lines.append(f"| {r['sae']['architecture']} | {r['variant']} | " + " | ".join(cells)
                     + f" | {r['history'][-1]['recovered']:.1%} |")
    text = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(text)
    plot(results, stem.with_suffix(".png"), f"data-sample vs random init: d={args.d}, G={args.features}")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
