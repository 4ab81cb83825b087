"""Drop-in quality: each library's TopK SAE module, from its own constructor, in the same plain
user loop on the same batches; held-out FVU after training. Also fastsae's Trainer.

    python -m fastsae harvest --model DIR --hook encoder.layer.2 --text train.txt --out acts/train ...
    python -m bench.dropin_quality --train acts/train --heldout acts/heldout --seeds 0 1

The loop, for every module: loss = the library's training loss of the batch (fastsae's MSE,
sparsify's FVU, SAELens's training_forward_pass loss), loss.backward(), torch.optim.Adam(lr).step(),
zero_grad; nothing else (no decoder renormalisation, no b_dec init), as a user who swaps one
module for another would write it. Every module sees the same batches (a permutation of the
training rows fixed by the seed) and the same number of steps; held-out FVU is
Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the held-out rows. Rows of --variants are fastsae's module
with another constructor init, to see which init wins. Writes OUT/dropin-<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .report import RESULTS, git_info, machine_info, versions


def load_rows(location: str | Path, limit: int | None = None) -> torch.Tensor:
    from fastsae.data import shard_paths

    rows = torch.cat([torch.from_numpy(np.load(p)) for p in shard_paths(location) if p.suffix == ".npy"]).float()
    return rows[:limit] if limit else rows


def heldout_fvu(reconstruct, x: torch.Tensor, chunk: int = 4096) -> float:
    err = 0.0
    with torch.no_grad():
        for part in x.split(chunk):
            err += float((reconstruct(part) - part).pow(2).sum())
    return err / float((x - x.mean(0)).pow(2).sum())


# ------------------------------------------------------------------ each library's module and loss
def fastsae_module(d, n, k, encoder_scale: float | None = None):
    from fastsae import TopKSAE

    sae = TopKSAE(d_in=d, d_sae=n, k=k)
    if encoder_scale is not None:
        with torch.no_grad():
            sae.W_enc.mul_(encoder_scale)
    return sae, (lambda x: sae.training_forward(x).loss), (lambda x: sae(x))


def sparsify_module(d, n, k):
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k))
    return sae, (lambda x: sae(x).fvu), (lambda x: sae(x).sae_out)


def saelens_module(d, n, k):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, dtype="float32", device="cpu"))

    def loss(x):
        return sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                        n_training_steps=0, is_logging_step=False)).loss
    return sae, loss, (lambda x: sae.decode(sae.encode(x)))


MODULES = {"fastsae TopKSAE": fastsae_module, "sparsify SparseCoder": sparsify_module,
           "SAELens TopKTrainingSAE": saelens_module}


def plain_loop(make, x: torch.Tensor, heldout: torch.Tensor, order: torch.Tensor, steps: int, batch: int,
               lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    sae, loss_fn, reconstruct = make()
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    start = time.process_time()
    curve = []
    for step in range(steps):
        rows = order[(step * batch + torch.arange(batch)) % order.numel()]
        loss = loss_fn(x[rows])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % max(1, steps // 5) == 0:
            curve.append({"step": step + 1, "heldout_fvu": heldout_fvu(reconstruct, heldout)})
    return {"heldout_fvu": heldout_fvu(reconstruct, heldout), "cpu_s": time.process_time() - start, "curve": curve}


def _setting(text: str) -> tuple[str, object]:
    """KEY=VALUE of a TrainConfig field, the value read as an int, a float or a string."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"a Trainer setting is KEY=VALUE, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def trainer_run(x, heldout, d, n, k, steps, batch, lr, seed, settings: dict | None = None) -> dict:
    from fastsae.config import SAEConfig, TrainConfig
    from fastsae.trainer import Trainer

    start = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(sae=SAEConfig(d_in=d, d_sae=n, architecture="topk", k=k), steps=steps, batch_size=batch,
                          lr=lr, seed=seed, out_dir=tmp, progress=False, console=False, plot=False,
                          checkpoint_every=0, **(settings or {}))
        tr = Trainer(cfg, x)
        tr.fit()
    return {"heldout_fvu": heldout_fvu(lambda t: tr.sae(t), heldout), "cpu_s": time.process_time() - start}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dropin_quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--train", help="training activations (a shard folder from fastsae harvest)")
    p.add_argument("--heldout", help="held-out activations (another shard folder)")
    p.add_argument("--toy", action="store_true",
                   help="instead of --train/--heldout: the default toy generator (fastsae.toy.ToyData), "
                        "100000 training and 20000 held-out rows")
    p.add_argument("--d-sae", type=int, default=4096, help="latents (default 4096)")
    p.add_argument("--k", type=int, default=32, help="active latents per row (default 32)")
    p.add_argument("--steps", type=int, default=1500, help="steps (default 1500)")
    p.add_argument("--batch", type=int, default=512, help="rows per step (default 512)")
    p.add_argument("--lr", type=float, default=4e-4, help="Adam lr for every module (default 4e-4)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (init and batch order)")
    p.add_argument("--variants", type=float, nargs="*", default=[],
                   help="fastsae module rows with W_enc scaled by these factors at construction")
    p.add_argument("--only", nargs="*", default=None, help="run only these rows (names as in the table)")
    p.add_argument("--no-trainer", action="store_true", help="skip fastsae's Trainer row")
    p.add_argument("--trainer-settings", nargs="+", type=_setting, default=None, metavar="KEY=VALUE",
                   help="the Trainer row with these TrainConfig settings (e.g. b_dec_init=zeros decay_start=0.9) "
                        "instead of its defaults")
    p.add_argument("--max-rows", type=int, default=None, help="use at most this many training rows")
    p.add_argument("--name", default="minilm-l3", help="results file stem")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.toy:
        from fastsae.toy import ToyData

        data = ToyData(seed=0)
        x, heldout = data.sample(args.max_rows or 100_000), data.sample(20_000)
    elif args.train and args.heldout:
        x, heldout = load_rows(args.train, args.max_rows), load_rows(args.heldout)
    else:
        p.error("pass --train and --heldout (activation shards), or --toy")
    d, n, k = x.shape[1], args.d_sae, args.k
    rows = {name: (lambda f=f: f(d, n, k)) for name, f in MODULES.items()}
    for s in args.variants:
        rows[f"fastsae TopKSAE, W_enc x {s:g}"] = lambda s=s: fastsae_module(d, n, k, encoder_scale=s)
    if args.only is not None:
        rows = {name: f for name, f in rows.items() if name in args.only}
    out_json = args.out / f"dropin-{args.name}.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {"runs": []}
    done = {(r["row"], r["seed"]) for r in results["runs"]}
    for seed in args.seeds:
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
        settings = dict(args.trainer_settings or [])
        trainer_row = "fastsae Trainer (" + (", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults") + ")"
        todo = list(rows.items()) + ([] if args.no_trainer else [(trainer_row, None)])
        for name, make in todo:
            if (name, seed) in done:
                continue
            r = trainer_run(x, heldout, d, n, k, args.steps, args.batch, args.lr, seed, settings) if make is None else \
                plain_loop(make, x, heldout, order, args.steps, args.batch, args.lr, seed)
            results["runs"].append({"row": name, "seed": seed, **r})
            print(f"seed {seed}  {name}: held-out FVU {r['heldout_fvu']:.4f}  ({r['cpu_s']:.0f} CPU s)", flush=True)
            results.update(settings=vars(args) | {"train": str(args.train), "heldout": str(args.heldout),
                                                   "out": str(args.out), "rows": x.shape[0], "d_in": d,
                                                   "heldout_rows": heldout.shape[0]},
                           machine={**machine_info(), "load_average_at_end": list(os.getloadavg())},
                           versions=versions(), git=git_info())
            args.out.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(results, indent=1))
    text = markdown(results)
    (args.out / f"dropin-{args.name}.md").write_text(text)
    print(text)
    return 0


def markdown(results: dict) -> str:
    s = results["settings"]
    by_row: dict[str, dict[int, float]] = {}
    for r in results["runs"]:
        by_row.setdefault(r["row"], {})[r["seed"]] = r["heldout_fvu"]
    seeds = sorted({sd for v in by_row.values() for sd in v})
    lines = [f"Held-out FVU after {s['steps']} steps, batch {s['batch']}, Adam lr {s['lr']:g}, d_in={s['d_in']}, "
             f"d_sae={s['d_sae']}, k={s['k']}; {s['rows']} training rows, {s['heldout_rows']} held-out rows; "
             "each module from its constructor in the same plain loop (lower is better).", "",
             "| module | " + " | ".join(f"seed {sd}" for sd in seeds) + " | mean |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for name, v in by_row.items():
        cells = [f"{v[sd]:.4f}" if sd in v else "" for sd in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(v.values()):.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
