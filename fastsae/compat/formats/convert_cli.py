"""Convert an SAE checkpoint between formats (read: any fastsae.load reads; write: fastsae, saelens, sparsify).

    fastsae convert path/to/gemma_scope/params.npz out_dir --to saelens
    fastsae convert sparsify_run out_dir --hookpoint layers.6 --to fastsae
"""

from __future__ import annotations

import argparse

from .detect import FORMATS, SAVABLE, detect_format, load, save


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="checkpoint to read (directory or file)")
    p.add_argument("out", help="directory to write")
    p.add_argument("--to", choices=SAVABLE, default="fastsae", help="format to write (default: fastsae)")
    p.add_argument("--from", dest="from_format", choices=list(FORMATS), default=None,
                   help="format of source (default: detected)")
    p.add_argument("--hookpoint", default=None, help="sparsify run directories: which hookpoint")
    p.add_argument("--dtype", default=None, help="convert the weights to this dtype (e.g. float32, bfloat16)")


def run(args: argparse.Namespace) -> int:
    fmt = args.from_format or detect_format(args.source)
    options = {"hookpoint": args.hookpoint} if args.hookpoint else {}
    sae = load(args.source, format=fmt, dtype=args.dtype, **options)
    c = sae.cfg
    k = f" k={c.k}" if c.k is not None else ""
    print(f"read {args.source}: {fmt} {c.architecture} SAE, d_in={c.d_in} d_sae={c.d_sae}{k} {c.dtype}")
    out = save(sae, args.out, format=args.to)
    print(f"wrote {out} as {args.to}")
    return 0
