"""Sweep dictionary size × sparsity on toy data with known features; JSON table + heatmaps.

    fastsae toy-sweep --out docs/toy_sweep --arch standard topk \
        --ratios 0.5,1,2,4 --l1 0.03,0.1,0.3 --k 3,5,8 --steps 5000 --compare-init

Every cell (architecture, ratio d_sae/G, coefficient: the L1 coefficient for ReLU SAEs, k for
the TopK family) trains a fresh SAE on the same data stream and is scored against the ground
truth (MMCS, fraction recovered, dead latents, L0, FVU, shrinkage). Results go to
OUT/results.json after every cell, so an interrupted sweep re-run with the same settings skips
finished cells. --compare-init also trains one cell from random and from data-sample init and
plots MMCS against steps.

With a feature hierarchy (--parents P --children C) every cell is also scored for feature
absorption (`absorption`): TopK vs BatchTopK vs Matryoshka BatchTopK, e.g.

    fastsae toy-sweep --out absorption --arch topk batchtopk matryoshka_batchtopk --ratios 1 --k 4 \
        --d 64 --features 128 --parents 16 --children 4 --mean-active 4 --steps 3000

With --d-out, the data is paired (fastsae.toy.ToyData's paired mode) and every cell trains a
transcoder from x to y, scored against the output features; --skip on off trains skip
transcoders beside plain ones (--target-linear adds the dense linear part a skip can take).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import metrics
from ..atomic import atomic_write
from ..config import SAEConfig
from ..errors import InputError
from ..sae import BaseSAE, build_sae
from .data import ToyData
from .train import COEFFICIENTS as TOY_ARCHS
from .train import INITS, make_toy_sae, train_toy

ARCHS = ("standard", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk")
K_ARCHS = ("topk", "batchtopk", "matryoshka_batchtopk")  # the coefficient is k
ARCH_NAMES = {"standard": "ReLU + L1", "topk": "TopK", "batchtopk": "BatchTopK", "jumprelu": "JumpReLU",
              "matryoshka_batchtopk": "Matryoshka BatchTopK"}
COEF_NAMES = {"standard": "L1", "jumprelu": "L0", **dict.fromkeys(K_ARCHS, "k")}
ABSORPTION_COS = 0.3  # a child's latent "carries" its parent when cos(its decoder row, parent) exceeds this

RESULTS = "results.json"
TABLE = "results.md"
HEATMAP_METRICS = {  # metric -> (title, colour map, fixed colour range or None)
    "mmcs": ("MMCS with the true features", "viridis", (0.0, 1.0)),
    "recovered": ("fraction of features recovered (cos > 0.99)", "viridis", (0.0, 1.0)),
    "dead_fraction": ("fraction of dead latents", "magma_r", (0.0, 1.0)),
    "shrinkage": ("shrinkage γ (1 = unbiased)", "coolwarm", None),
}


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("toy_sweep"), help="output folder (results.json, PNGs)")
    p.add_argument("--arch", nargs="+", choices=ARCHS, default=["standard", "topk"],
                   help="architectures to sweep: standard = ReLU + L1, topk, batchtopk, jumprelu, matryoshka_batchtopk")
    p.add_argument("--ratios", type=_floats, default=[0.5, 1.0, 2.0, 4.0], help="d_sae / G values")
    p.add_argument("--l1", type=_floats, default=[0.03, 0.1, 0.3, 1.0], help="L1 coefficients (standard)")
    p.add_argument("--k", type=_ints, default=[3, 5, 8, 12], help="k values (topk, batchtopk, matryoshka)")
    p.add_argument("--matryoshka-fractions", type=_floats, default=[0.125, 0.5, 1.0],
                   help="Matryoshka levels as fractions of d_sae (the last must be 1)")
    p.add_argument("--l0", type=_floats, default=[0.03, 0.1, 0.3], help="L0 coefficients (jumprelu)")
    p.add_argument("--steps", type=int, default=5000, help="training steps per cell (default 5000)")
    p.add_argument("--batch", type=int, default=256, help="rows per step (default 256)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--lr-decay", type=float, default=None,
                   help="decay lr linearly to 0 over this last fraction (default: the Trainer's; 0 = none)")
    p.add_argument("--resample-every", type=int, default=None,
                   help="steps between resamplings of dead latents (default: the Trainer's; 0 = never)")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="steps of the Trainer's shrinkage fix after each cell's training (default 0)")
    p.add_argument("--eval-samples", type=int, default=16384)
    p.add_argument("--compare-init", action="store_true",
                   help="also train one cell from random and from data-sample init, plot MMCS vs steps")
    p.add_argument("--init-arch", choices=("standard", "topk", "batchtopk", "jumprelu"), default="standard",
                   help="architecture of the init comparison cell")
    p.add_argument("--init-ratio", type=float, default=2.0)
    p.add_argument("--init-coef", type=float, default=None,
                   help="coefficient of the init comparison cell (default: the middle of --l1 / --k)")
    p.add_argument("--track-every", type=int, default=100, help="MMCS tracking interval of the init comparison")
    p.add_argument("--track-cells", action="store_true",
                   help="track MMCS every --track-every steps in the sweep's cells too, saving the "
                        "progress of unfinished cells to OUT/progress.json (for long runs)")
    g = p.add_argument_group("toy data (fastsae.toy.ToyData)")
    g.add_argument("--d", type=int, default=256, help="activation dimension")
    g.add_argument("--features", type=int, default=512, help="ground-truth features G")
    g.add_argument("--mean-active", type=float, default=5.0, help="mean active features per sample m")
    g.add_argument("--decay", type=float, default=0.99, help="probability decay per feature index")
    g.add_argument("--correlation", type=float, default=0.5, help="copula correlation strength in [0, 1)")
    g.add_argument("--correlation-rank", type=int, default=16)
    g.add_argument("--parents", type=int, default=0, help="parent features of the hierarchy (0: none)")
    g.add_argument("--children", type=int, default=0, help="children per parent")
    g.add_argument("--child-probability", type=float, default=0.5,
                   help="probability that one child fires when its parent does")
    g.add_argument("--d-out", type=int, default=None, help="paired mode: train transcoders to this output width")
    g.add_argument("--target-linear", type=float, default=0.0, help="paired mode: scale of the target's linear part")
    p.add_argument("--skip", nargs="+", choices=("off", "on"), default=["off"],
                   help="paired mode: transcoders without and/or with a skip connection")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-plots", action="store_true", help="write the JSON table only")


def _data_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(d=args.d, n_features=args.features, mean_active=args.mean_active, decay=args.decay,
                correlation=args.correlation, correlation_rank=args.correlation_rank, seed=args.seed,
                device=args.device, parents=args.parents, children=args.children,
                child_probability=args.child_probability, d_out=args.d_out, target_linear=args.target_linear)


def _settings(args: argparse.Namespace, data: ToyData) -> dict[str, Any]:
    """What every cell shares: a results file is only resumed under the same settings."""
    out = {"data": data.config(), "steps": args.steps, "batch": args.batch, "lr": args.lr,
           "lr_decay": args.lr_decay, "resample_every": args.resample_every,
           "finetune_steps": args.finetune_steps, "trainer": "fastsae.Trainer",
           "eval_samples": args.eval_samples, "optimizer": "adam"}
    if "matryoshka_batchtopk" in args.arch:
        out["matryoshka_fractions"] = list(args.matryoshka_fractions)
    return out


def make_sae(arch: str, data: ToyData, ratio: float, coef: float, seed: int = 0,
             matryoshka_fractions=(0.125, 0.5, 1.0), skip: bool = False) -> BaseSAE:
    """make_toy_sae's SAE, and the BatchTopK family (coef = k; Matryoshka's levels at the given
    fractions of d_sae); with paired data, the transcoder of that architecture (skip: with a
    skip connection)."""
    d_sae = max(1, int(round(ratio * data.n_features)))
    extra: dict = {}
    if data.d_out is not None:
        extra = dict(transcoder=True, d_out=data.d_out, apply_b_dec_to_input=False, skip_connection=skip)
    elif arch in TOY_ARCHS:
        return make_toy_sae(arch, data, ratio, coef, seed=seed)
    if arch == "standard":
        extra["l1_coefficient"] = float(coef)
    elif arch == "jumprelu":
        extra["l0_coefficient"] = float(coef)
    elif int(round(coef)) != coef:
        raise InputError(f"{arch}'s sparsity coefficient is k, an integer: got {coef}")
    else:
        extra["k"] = int(coef)
    if arch == "matryoshka_batchtopk":
        if abs(matryoshka_fractions[-1] - 1.0) > 1e-9:
            raise InputError(f"the last Matryoshka fraction must be 1 (the whole dictionary), got "
                             f"{matryoshka_fractions}")
        widths = sorted({max(1, int(round(f * d_sae))) for f in matryoshka_fractions})
        extra["matryoshka_widths"] = widths
    torch.manual_seed(seed)
    return build_sae(SAEConfig(d_in=data.d, d_sae=d_sae, architecture=arch, device=data.device, **extra))


@torch.no_grad()
def absorption(sae: BaseSAE, data: ToyData, n_samples: int = 16384, batch: int = 4096,
               seed: int = 12345, cos_threshold: float = ABSORPTION_COS) -> dict[str, float]:
    """Feature absorption on a hierarchy (docs/architectures.md defines each number). Every true
    feature g is matched to its latent ℓ_g = argmax_j cos(W_dec[j], f_g). On samples where a
    parent p and one of its children c fire:
        absorption: the fraction where ℓ_p stays silent while ℓ_c fires and carries the parent
            (cos(W_dec[ℓ_c], f_p) > cos_threshold);
        parent_recall_with_child / parent_recall_alone: how often ℓ_p fires when p fires with a
            child / without one;
        child_parent_cos: the mean cos(W_dec[ℓ_c], f_p) over children (0 for clean children);
        mmcs_parents / mmcs_children: MMCS over each group."""
    hier = data.hierarchy()
    if not hier:
        return {}
    dev = sae.device
    parents = torch.tensor([p for p, _ in hier], device=dev)
    children = torch.tensor([c for _, c in hier], device=dev)  # [P, C]
    W = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1)
    F = torch.nn.functional.normalize(data.features.float().to(dev), dim=1)
    cos = F @ W.t()
    match = cos.argmax(1)
    carries = cos[parents.unsqueeze(1), match[children]] > cos_threshold  # [P, C]
    gen = torch.Generator(device=data.device).manual_seed(seed)
    with_child = alone = fires_with = fires_alone = absorbed = 0
    for start in range(0, n_samples, batch):
        x, codes = data.sample(min(batch, n_samples - start), return_codes=True, generator=gen)
        acts = sae.encode(x.to(dev, sae.dtype), dense=True) if sae.takes_sparse_path else sae.encode(x.to(dev))
        fired = acts > 0
        codes = codes.to(dev)
        p_on, c_on = codes[:, parents] > 0, codes[:, children] > 0
        any_child = c_on.any(2)
        lp = fired[:, match[parents]]
        lc = fired[:, match[children]]
        both = p_on & any_child
        only = p_on & ~any_child
        with_child += int(both.sum())
        alone += int(only.sum())
        fires_with += int((both & lp).sum())
        fires_alone += int((only & lp).sum())
        absorbed += int((both & ~lp & (c_on & lc & carries).any(2)).sum())
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {
        "absorption": ratio(absorbed, with_child),
        "parent_recall_with_child": ratio(fires_with, with_child),
        "parent_recall_alone": ratio(fires_alone, alone),
        "child_parent_cos": float(cos[parents.unsqueeze(1), match[children]].mean()),
        "mmcs_parents": float(metrics.max_cosine_similarities(data.features[parents.cpu()], sae.W_dec).mean()),
        "mmcs_children": float(metrics.max_cosine_similarities(data.features[children.flatten().cpu()],
                                                               sae.W_dec).mean()),
    }


def cell_key(arch: str, ratio: float, coef: float) -> str:
    return f"{arch}/ratio={ratio:g}/coef={coef:g}"


def load_results(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    path = out / RESULTS
    if not path.exists():
        return {"settings": settings, "cells": {}, "init_comparison": {}}
    results = json.loads(path.read_text())
    if results.get("settings") != settings:
        raise InputError(
            f"{path} was written with different settings ({results.get('settings')}), so its cells "
            f"cannot be resumed under {settings}: pass another --out, or delete {path} to start over"
        )
    results.setdefault("init_comparison", {})
    return results


def save_results(out: Path, results: dict[str, Any]) -> None:
    text = json.dumps(results, indent=1)
    atomic_write(out / RESULTS, lambda tmp: Path(tmp).write_text(text))


def _train_cell(args, arch, ratio, coef, init="random", track_every=0, desc="cell"):
    data = ToyData(**_data_kwargs(args))  # every cell sees the same stream
    base, skip = arch.removesuffix("+skip"), arch.endswith("+skip")
    sae = make_sae(base, data, ratio, coef, seed=args.seed, matryoshka_fractions=args.matryoshka_fractions,
                   skip=skip)
    on_track = None
    if track_every and args.track_cells:
        progress_path = args.out / "progress.json"

        def on_track(entry):
            progress = json.loads(progress_path.read_text()) if progress_path.exists() else {}
            progress.setdefault(desc, []).append(entry)
            atomic_write(progress_path, lambda tmp: Path(tmp).write_text(json.dumps(progress, indent=1)))

    run = train_toy(sae, data, args.steps, batch=args.batch, lr=args.lr, init=init,
                    track_every=track_every, lr_decay_fraction=args.lr_decay,
                    resample_every=args.resample_every, eval_samples=args.eval_samples, desc=desc,
                    on_track=on_track, seed=args.seed, finetune_steps=args.finetune_steps)
    cell = {"arch": arch, "ratio": ratio, "coefficient": coef, "d_sae": sae.d_sae, "init": init, **run.to_dict()}
    if data.d_out is None:
        cell["metrics"].update(absorption(sae, data, n_samples=args.eval_samples))
    return cell


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    data = ToyData(**_data_kwargs(args))
    results = load_results(args.out, _settings(args, data))
    coefs = {"standard": args.l1, "jumprelu": args.l0, **{a: [float(k) for k in args.k] for a in K_ARCHS}}
    archs = args.arch
    if args.d_out is not None:  # transcoders, with and/or without a skip connection
        archs = [a + ("+skip" if s == "on" else "") for a in args.arch for s in args.skip]
    grid = [(a, r, c) for a in archs for r in args.ratios for c in coefs[a.removesuffix("+skip")]]
    todo = [cell for cell in grid if cell_key(*cell) not in results["cells"]]
    print(f"toy-sweep: {len(grid)} cells ({len(grid) - len(todo)} already in {args.out / RESULTS}), "
          f"{args.steps} steps each, G={data.n_features} features in d={data.d}")
    for arch, ratio, coef in tqdm(todo, desc="cells", unit="cell"):
        cell = _train_cell(args, arch, ratio, coef, desc=cell_key(arch, ratio, coef),
                           track_every=args.track_every if args.track_cells else 0)
        results["cells"][cell_key(arch, ratio, coef)] = cell
        save_results(args.out, results)
        m = cell["metrics"]
        tqdm.write(f"  {cell_key(arch, ratio, coef)}: MMCS {m['mmcs']:.4f}  recovered {m['recovered']:.1%}  "
                   f"L0 {m['l0']:.1f}  FVU {m['fvu']:.4f}  dead {m['dead_latents']}  γ {m['shrinkage']:.3f}"
                   + (f"  absorption {m['absorption']:.3f}" if "absorption" in m else ""))

    if args.compare_init and args.d_out is not None:
        raise InputError("--compare-init is for SAEs; drop it (or --d-out)")
    if args.compare_init:
        mid = coefs[args.init_arch][len(coefs[args.init_arch]) // 2]
        coef = args.init_coef if args.init_coef is not None else mid
        comparison = results["init_comparison"]
        key = cell_key(args.init_arch, args.init_ratio, coef)
        if comparison.get("cell") != key:  # a different comparison cell starts the comparison over
            comparison.clear()
            comparison["cell"] = key
        for init in INITS:
            if init not in comparison:
                comparison[init] = _train_cell(args, args.init_arch, args.init_ratio, coef, init=init,
                                               track_every=args.track_every, desc=f"{key} ({init} init)")
                save_results(args.out, results)
            m = comparison[init]["metrics"]
            print(f"  {init} init, {key}: MMCS {m['mmcs']:.4f}  dead {m['dead_latents']}")

    table = markdown_table(results)
    atomic_write(args.out / TABLE, lambda tmp: Path(tmp).write_text(table))
    print(table)
    if not args.no_plots:
        for path in plot_results(results, args.out):
            print(f"  wrote {path}")
    print(f"  wrote {args.out / RESULTS} and {args.out / TABLE}")
    return 0


def markdown_table(results: dict[str, Any]) -> str:
    """One row per cell (and per init of the comparison), ready for a README."""
    s = results["settings"]
    extras = (f", linear lr decay over the last {s['lr_decay']:.0%}" if s["lr_decay"] else "") + (
        f", dead latents resampled every {s['resample_every']} steps" if s["resample_every"] else "") + (
        f", {s['finetune_steps']} fine-tuning steps" if s.get("finetune_steps") else "") + (
        "; fastsae's Trainer with its defaults otherwise" if s.get("trainer") else "")
    d = s["data"]
    hier = (f", {d['parents']} parents with {d['children']} children each (child probability "
            f"{d['child_probability']:g})" if d.get("parents") else "")
    if d.get("d_out"):
        hier += (f"; transcoders to d_out={d['d_out']} (target linear part {d['target_linear']:g}), MMCS against "
                 "the output features, FVU of the target")
    head = (f"{s['steps']} steps, batch {s['batch']}, Adam lr {s['lr']:g}{extras}; G={d['n_features']} "
            f"features in d={d['d']}, m={d['mean_active']:g}{hier}; metrics on "
            f"{s['eval_samples']} fresh samples\n\n")
    rows = sorted(results["cells"].values(), key=lambda c: (c["arch"], c["ratio"], c["coefficient"]))
    comparison = results.get("init_comparison", {})
    rows += [comparison[i] for i in INITS if i in comparison]
    absorb = any("absorption" in c["metrics"] for c in rows)
    cols = ["SAE", "d_sae", "coefficient", "init", "MMCS", "recovered (cos > 0.99)", "L0", "FVU", "dead latents",
            "shrinkage γ"]
    if absorb:
        cols += ["absorption", "parent recall with / without child", "child–parent cos", "MMCS parents / children"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for c in rows:
        m = c["metrics"]
        base = c["arch"].removesuffix("+skip")
        coef = f"{COEF_NAMES[base]} = {c['coefficient']:g}"
        name = ARCH_NAMES[base] + (" + skip" if c["arch"].endswith("+skip") else "")
        row = (f"| {name} | {c['d_sae']} ({c['ratio']:g}·G) | {coef} | {c['init']} | {m['mmcs']:.4f} "
               f"| {m['recovered']:.1%} | {m['l0']:.2f} | {m['fvu']:.4f} | {m['dead_latents']} "
               f"| {m['shrinkage']:.3f} |")
        if absorb:
            row += (f" {m['absorption']:.3f} | {m['parent_recall_with_child']:.3f} / {m['parent_recall_alone']:.3f} "
                    f"| {m['child_parent_cos']:.3f} | {m['mmcs_parents']:.3f} / {m['mmcs_children']:.3f} |"
                    if "absorption" in m else " | | | |")
        lines.append(row)
    return head + "\n".join(lines) + "\n"


def plot_results(results: dict[str, Any], out: Path) -> list[Path]:
    """Heatmaps (ratio × coefficient) per architecture and metric, and the init comparison."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib is not installed: pip install 'fastsae[plot]' for the PNGs; JSON written)")
        return []
    written = []
    cells = list(results["cells"].values())
    for arch in sorted({c["arch"] for c in cells}):
        mine = [c for c in cells if c["arch"] == arch]
        ratios = sorted({c["ratio"] for c in mine})
        coefs = sorted({c["coefficient"] for c in mine})
        if len(ratios) * len(coefs) < 2:  # a single cell is a table row, not a map
            continue
        for metric, (title, cmap, limits) in HEATMAP_METRICS.items():
            grid = torch.full((len(ratios), len(coefs)), float("nan"))
            for c in mine:
                grid[ratios.index(c["ratio"]), coefs.index(c["coefficient"])] = c["metrics"][metric]
            fig, ax = plt.subplots(figsize=(1.3 * len(coefs) + 2.5, 0.8 * len(ratios) + 1.8))
            vmin, vmax = limits if limits else _centred_range(grid, 1.0)
            im = ax.imshow(grid.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
            for i in range(len(ratios)):
                for j in range(len(coefs)):
                    if not torch.isnan(grid[i, j]):
                        ax.text(j, i, f"{float(grid[i, j]):.3f}", ha="center", va="center", fontsize=8,
                                color="white" if _dark(im, float(grid[i, j])) else "black")
            ax.set_xticks(range(len(coefs)), [f"{c:g}" for c in coefs])
            ax.set_yticks(range(len(ratios)), [f"{r:g}" for r in ratios])
            base = arch.removesuffix("+skip")
            ax.set_xlabel(COEF_NAMES[base] + (" coefficient" if COEF_NAMES[base] != "k" else ""))
            ax.set_ylabel("d_sae / G")
            ax.set_title(f"{ARCH_NAMES[base]}{' + skip' if base != arch else ''}: {title}", fontsize=9)
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            written.append(_save(fig, out / f"{arch}_{metric}.png"))
            plt.close(fig)
    comparison = results.get("init_comparison", {})
    if all(init in comparison for init in INITS):
        curves = {f"{init} init": comparison[init]["history"] for init in INITS}
        title = f"data-sample vs random init: {comparison['cell']}"
        written.append(_plot_curves(plt, curves, title, out / "init_comparison.png"))
    progress_path = out / "progress.json"
    if progress_path.exists():
        curves = json.loads(progress_path.read_text())
        written.append(_plot_curves(plt, curves, "tracked cells", out / "progress.png"))
    return written


def _plot_curves(plt, curves: dict[str, list[dict[str, float]]], title: str, path: Path) -> Path:
    """MMCS and fraction recovered against steps, one line per curve."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, history in curves.items():
        steps = [p["step"] for p in history]
        axes[0].plot(steps, [p["mmcs"] for p in history], label=label)
        if all("recovered" in p for p in history):
            axes[1].plot(steps, [p["recovered"] for p in history], label=label)
    axes[0].set_ylabel("MMCS with the true features")
    axes[1].set_ylabel("fraction recovered (cos > 0.99)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _centred_range(grid: torch.Tensor, centre: float) -> tuple[float, float]:
    finite = grid[~torch.isnan(grid)]
    spread = float((finite - centre).abs().max()) if finite.numel() else 1.0
    return centre - max(spread, 1e-3), centre + max(spread, 1e-3)


def _dark(im, value: float) -> bool:
    r, g, b, _ = im.cmap(im.norm(value))
    return 0.299 * r + 0.587 * g + 0.114 * b < 0.5


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
