"""python -m bench: fastsae against the SAE libraries users would pick instead.

    python -m bench --quick               # CPU, about a minute on an idle machine
    python -m bench --full                # CUDA GPU: table at d_sae=2^17, sweep 2^14 .. widest that fits
    python -m bench --preset cpu-step     # CPU: one training step at d=256, d_sae=16384, k=32, B=2048
    python -m bench --quick --impl fastsae-cpp --impl sparsify --max-log2 15

Times encode, decode, backward and a full training step of every implementation (fastsae's
Trainer step on each backend the device has, fastsae's module in a plain autograd loop, a
plain dense PyTorch TopK SAE, SAELens TopKTrainingSAE, sparsify SparseCoder; each peer's step
is defined once, in bench/peers.py) against the encoder GEMM alone, with peak memory, each
implementation and width in a fresh process; then sweeps d_sae and plots step time and peak
memory.
Writes bench/results/<device>-<date>.{json,md} and two PNGs, and prints the markdown.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from . import memory, peers, report, sweep

PRESETS = {
    # CPU: 2^16 is the cap: a dense peer's step takes seconds there on a few cores, and the
    # sweep runs every implementation at every width.
    "quick": dict(device="cpu", d_in=256, k=32, batch=512, min_log2=14, max_log2=16, table_log2=None,
                  warmup=1, repeats=3, sweep_repeats=2, timeout=600, peak_mm_n=1024),
    # GPU: the sweep goes on until every implementation has run out of memory (2^24 latents
    # at d_in=768 is 96 GiB of fp32 weights alone).
    "full": dict(device="cuda", d_in=768, k=32, batch=4096, min_log2=14, max_log2=24, table_log2=17,
                 warmup=5, repeats=20, sweep_repeats=10, timeout=600, peak_mm_n=8192),
    # CPU: one shape, no sweep: the training step users run, against the GEMM and the peers
    "cpu-step": dict(device="cpu", d_in=256, k=32, batch=2048, min_log2=14, max_log2=14, table_log2=14,
                     warmup=1, repeats=5, sweep_repeats=1, timeout=900, peak_mm_n=1024),
}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def add_arguments(p: argparse.ArgumentParser) -> None:
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--preset", choices=sorted(PRESETS), help="a named preset (see the module's docstring)")
    preset.add_argument("--quick", action="store_true", help="= --preset quick: CPU, about a minute (the default "
                        "without a GPU)")
    preset.add_argument("--full", action="store_true", help="= --preset full: GPU (the default with one)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: the preset's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--d-in", type=int, help="input width (default: the preset's)")
    p.add_argument("--k", type=int, help="active latents per row")
    p.add_argument("--batch", type=int, help="rows per batch")
    p.add_argument("--min-log2", type=int, help="smallest d_sae of the sweep, as log2")
    p.add_argument("--max-log2", type=int, help="widest d_sae tried, as log2")
    p.add_argument("--table-log2", type=int, help="d_sae of the all-ops table, as log2 (quick: the sweep's first)")
    p.add_argument("--impl", action="append", default=[],
                   help="only these implementations (repeatable; a prefix of the name, e.g. fastsae-cpp, "
                        "torch-dense, saelens, sparsify); the GEMM floor always runs")
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int, help="timed calls per op in the table")
    p.add_argument("--sweep-repeats", type=int, help="timed steps per width in the sweep")
    p.add_argument("--timeout", type=float, help="seconds one implementation may take at one width")
    p.add_argument("--threads", type=int, help="torch CPU threads per measurement (default: torch's own choice)")
    p.add_argument("--tf32", action="store_true", help="CUDA fp32: allow TF32 matmuls (torch and fastsae's Triton)")
    p.add_argument("--isolation", default="forkserver", choices=["forkserver", "spawn"],
                   help="how each measurement gets its fresh process (spawn: slower, re-imports everything)")
    p.add_argument("--out-dir", type=Path, default=report.RESULTS, help="where results go (default bench/results)")
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="measure nothing: rewrite the markdown and plots of an earlier run's JSON")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def _select(requested: list[str]) -> list[str]:
    names = peers.names()
    if not requested:
        return names
    chosen = {peers.FLOOR}
    for want in (w for r in requested for w in r.split(",") if w.strip()):
        exact = [n for n in names if _slug(n) == _slug(want)]  # fastsae-cpp is not fastsae-cpp-module-loop
        hits = exact or [n for n in names if _slug(n).startswith(_slug(want))]
        if not hits:
            raise SystemExit(f"--impl {want!r} matches none of: {', '.join(_slug(n) for n in names)}")
        chosen.update(hits)
    return [n for n in names if n in chosen]


def make_plan(args) -> tuple[sweep.Plan, list[str]]:
    has_cuda = torch.cuda.is_available()
    name = args.preset or ("full" if args.full or (not args.quick and has_cuda) else "quick")
    cfg = dict(PRESETS[name])
    for key in ("device", "d_in", "k", "batch", "min_log2", "max_log2", "table_log2", "warmup", "repeats",
                "sweep_repeats", "timeout"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    device = torch.device(cfg["device"])
    if device.type == "cuda" and not has_cuda:
        raise SystemExit(f"the {name} preset runs on a CUDA GPU and torch sees none here: "
                         "use --quick (CPU), or --device cpu")
    table_log2 = cfg["min_log2"] if cfg["table_log2"] is None else cfg["table_log2"]  # None: the first width
    table_log2 = min(max(table_log2, cfg["min_log2"]), cfg["max_log2"])
    ws = sweep.widths(cfg["min_log2"], cfg["max_log2"])
    impls = _select(args.impl)
    unavailable = {n: why for n in impls if (why := peers.adapter_class(n).unavailable(device))}
    notes = [f"preset {name}" + (" (with overrides)" if any(
        getattr(args, k) is not None for k in ("d_in", "k", "batch", "min_log2", "max_log2", "table_log2")) else "")]
    if device.type == "cpu":
        notes.append(f"CPU: the sweep stops at d_sae=2^{cfg['max_log2']} (raise --max-log2 to go wider; "
                     "widths whose rough memory estimate exceeds the free RAM are skipped, not run)")
    notes += args.note
    plan = sweep.Plan(impls=impls, d_in=cfg["d_in"], k=cfg["k"], batch=cfg["batch"], widths=ws,
                      table_width=2**table_log2, device=str(device), dtype=args.dtype, warmup=cfg["warmup"],
                      repeats=cfg["repeats"], sweep_repeats=cfg["sweep_repeats"], timeout_s=cfg["timeout"],
                      peak_mm_n=cfg["peak_mm_n"], tf32=bool(args.tf32), threads=args.threads,
                      unavailable=unavailable)
    return plan, notes


def _start_processes(plan: sweep.Plan, method: str, notes: list[str]) -> None:
    device = torch.device(plan.device)
    env = peers.process_env(plan.impls, device)
    if device.type == "cuda":
        if os.environ.pop("TRITON_INTERPRET", None):
            notes.append("TRITON_INTERPRET was set; it was unset for the GPU run (the interpreter is not timed)")
        preload = list(memory.CUDA_SAFE_PRELOAD)
    else:
        preload = [*memory.CUDA_SAFE_PRELOAD, *(m for n, m in (("SAELens", "sae_lens"), ("sparsify", "sparsify"))
                                                if n in plan.impls and n not in plan.unavailable)]
    memory.start_server(preload, env, method)


def write_outputs(rep: dict, out_dir: Path, plots: bool) -> None:
    """The markdown (printed too) and the plots of a report, beside its JSON."""
    out = report.paths(rep, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = rep["plan"]
    images = None
    if plots and len(plan["widths"]) > 1:
        title = f"{rep['device']['name']}: d_in={plan['d_in']}, k={plan['k']}, batch={plan['batch']}, {plan['dtype']}"
        sweep.plot(rep["records"], title, out["time_png"], out["memory_png"])
        images = {"time_png": out["time_png"].name, "memory_png": out["memory_png"].name}
    text = report.markdown(rep, images)
    out["md"].write_text(text, encoding="utf-8")
    print(text)
    written = [out["json"], out["md"]] + ([out["time_png"], out["memory_png"]] if images else [])
    print("wrote " + ", ".join(str(p) for p in written))


def run(args) -> int:
    if args.render:
        rep = json.loads(args.render.read_text(encoding="utf-8"))
        write_outputs(rep, args.render.parent, not args.no_plots)
        return 0
    plan, notes = make_plan(args)
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    t0 = time.perf_counter()
    machine = report.machine_info()
    if "load_average_at_start" in machine and plan.device == "cpu":
        load = machine["load_average_at_start"][0]
        if load > (os.cpu_count() or 1):
            notes.append(f"the machine was busy: load average {load:.1f} on {os.cpu_count()} logical CPUs at "
                         "the start, so CPU times are inflated and noisy")
    _start_processes(plan, args.isolation, notes)
    print(f"bench: {len(plan.impls) - len(plan.unavailable)} implementations on {plan.device} ({plan.dtype}), "
          f"d_in={plan.d_in} k={plan.k} batch={plan.batch}, table at d_sae={plan.table_width}, "
          f"sweep {plan.widths[0]}..{plan.widths[-1]}", flush=True)
    records = sweep.run_plan(plan, progress=not args.no_progress)
    rep = report.build(plan, records, started, time.perf_counter() - t0, notes, machine)
    report.write_json(rep, report.paths(rep, args.out_dir)["json"])
    write_outputs(rep, args.out_dir, not args.no_plots)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
