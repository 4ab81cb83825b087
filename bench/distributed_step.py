"""What latent sharding and data parallel cost per training step, on CPU with gloo.

    python -m bench.distributed_step                 # d=256, d_sae=2^14 and 2^16, k=32, B=512
    python -m bench.distributed_step --d-sae 65536 --optimizer row_sparse_adam

Runs the one Trainer's train_step (the same code torchrun runs) in three layouts on the
same cores: one process with all of them, 1 replica x N shards and N replicas x 1 shard
(N processes, one thread each, fastsae.distributed.launch), at the same global batch.
Every rank calls train_step the same number of times (no per-rank calibration, which
would deadlock the collectives); rank 0's median step is reported. On a machine with few
cores this measures the communication and duplicated work the layouts add, not a speed-up:
more ranks than cores only share them. Writes bench/results/distributed-step-<cpu>.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _trainer(d_in, d_sae, k, batch, optimizer, layout):
    from fastsae import SAEConfig
    from fastsae.trainer import TrainConfig, Trainer

    cfg = TrainConfig(sae=SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k), steps=10**9,
                      batch_size=batch, lr=1e-4, optimizer=optimizer, b_dec_init="zeros", log_every=10**9,
                      checkpoint_every=0, out_dir=tempfile.mkdtemp(prefix="fastsae-bench-dist-"), progress=False,
                      console=False, plot=False)
    return Trainer(cfg, torch.zeros(batch, d_in), layout=layout)


def step_ms(d_in: int, d_sae: int, k: int, global_batch: int, optimizer: str, shards: int | None,
            warmup: int, repeats: int) -> float:
    """Median ms of train_step on this rank (every rank of the job calls this)."""
    from bench.timing import measure
    from fastsae.distributed import build_layout

    layout = build_layout(shards=shards)
    trainer = _trainer(d_in, d_sae, k, global_batch // layout.replicas, optimizer, layout)
    g = torch.Generator().manual_seed(layout.replica)  # the shards of a replica share its batch
    x = torch.randn(global_batch // layout.replicas, d_in, generator=g)
    return measure(lambda: trainer.train_step(x), "cpu", warmup=warmup, repeats=repeats, min_sample_s=0).median_ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-sae", type=int, nargs="+", default=[2**14, 2**16])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=512, help="global batch (split over the replicas)")
    p.add_argument("--optimizer", default="adam", choices=("adam", "row_sparse_adam"))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, help="default: bench/results/distributed-step-<cpu>.md")
    args = p.parse_args(argv)

    import bench.distributed_step as me  # the workers import the function by module name
    from bench.report import device_info, machine_info
    from fastsae.distributed import launch

    n, threads = args.ranks, torch.get_num_threads()
    rows = []
    for d_sae in args.d_sae:
        common = (args.d_in, d_sae, args.k, args.batch, args.optimizer)
        t0 = time.perf_counter()
        single = step_ms(*common, None, args.warmup, args.repeats)
        row = {"d_sae": d_sae, "single": single}
        for name, shards in (("shards", n), ("replicas", 1)):
            res = launch(me.step_ms, n, (*common, shards, args.warmup, args.repeats), timeout_s=1800,
                         collective_timeout_s=600)
            if not all(r.ok for r in res):
                raise SystemExit(f"{name} run failed: {[r.error for r in res if not r.ok]}")
            row[name] = res[0].value
        rows.append(row)
        print(f"d_sae={d_sae}: one process {single:.1f} ms, 1x{n} shards {row['shards']:.1f} ms, "
              f"{n}x1 replicas {row['replicas']:.1f} ms ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    m = machine_info()
    lines = [
        "# Sharded and data-parallel step cost (CPU, gloo)", "",
        f"{device_info('cpu')['name']}, {m['logical_cpus']} logical CPUs, load average "
        f"{m.get('load_average_at_start', [float('nan')])[0]:.2f} at start; torch {torch.__version__}.", "",
        f"TopK, d_in={args.d_in}, k={args.k}, global batch {args.batch}, {args.optimizer}, float32. "
        f"Trainer.train_step, median of {args.repeats} after {args.warmup} warm-up steps (rank 0). "
        f"One process uses {threads} threads; each of the {n} ranks of the other layouts uses one, "
        "on the same cores. Ratio = step time / one process's.", "",
        f"| d_sae | one process | 1 x {n} shards | {n} x 1 replicas |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['d_sae']:,} | {r['single']:.1f} ms "
                     f"| {r['shards']:.1f} ms ({r['shards'] / r['single']:.2f}x) "
                     f"| {r['replicas']:.1f} ms ({r['replicas'] / r['single']:.2f}x) |")
    out = args.out or RESULTS / f"distributed-step-{device_info('cpu')['slug']}.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
