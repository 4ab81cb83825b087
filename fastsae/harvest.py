"""Harvest activations: run a Hugging Face model over text and write a module's outputs to shards.

    fastsae harvest --model gpt2 --hook transformer.h.6 --text corpus.txt --out acts/
    fastsae harvest --model gpt2 --hook transformer.h.6.mlp --hook transformer.h.6 --out pairs/

The named module's output [batch, seq, d] is captured (fastsae.model.capture); padding (and, by
default, special tokens such as BOS, whose activations are outliers) are dropped, and the rows
go to shards of `shard_rows` rows (.npy, or .safetensors for bf16), each written atomically,
then manifest.json, which lists the shards it wrote. The forward pass stops once the deepest
hook has fired, so the layers after it are never computed. `fastsae train --data acts/` reads them.

Several hooks in one pass write one folder per hook (out/<hook>/, each a complete harvest
folder with its own manifest and shards) with rows paired across folders: row i of every
folder comes from the same token, and the shard boundaries agree. out/manifest.json then
lists the hooks and their folders ("paired": true) and no shards of its own.

A folder that already holds shards or a manifest is refused unless overwrite=True, which
removes the old manifest and shards first: a folder never mixes two harvests.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import atomic_write, atomic_write_text
from .config import dtype_from_str, dtype_to_str
from .data import SHARD_SUFFIXES
from .errors import ConfigError, InputError
from .model import capture, check_context_length, resolve_hook, special_token_ids, token_batches, valid_positions

MANIFEST = "manifest.json"


def read_texts(paths: Iterable[str | Path], field: str = "text") -> Iterator[str]:
    """Documents from .txt files (one per non-empty line) or .jsonl files (the `field` key)."""
    for path in map(Path, paths):
        if not path.is_file():
            raise InputError(f"text file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                if path.suffix == ".jsonl":
                    try:
                        yield json.loads(line)[field]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise InputError(f"{path}:{n} is not a JSON object with a {field!r} field ({e})") from e
                else:
                    yield line


class ShardWriter:
    """Accumulates rows and writes shard_NNNNN.npy/.safetensors of `shard_rows` rows."""

    def __init__(self, out_dir: str | Path, shard_rows: int, dtype: torch.dtype, fmt: str):
        if fmt not in ("npy", "safetensors"):
            raise ConfigError(f"shard format {fmt!r} is unknown: use 'npy' or 'safetensors'")
        if not isinstance(shard_rows, int) or shard_rows < 1:
            raise ConfigError(f"shard_rows={shard_rows!r} must be a positive number of rows")
        if fmt == "npy" and dtype == torch.bfloat16:
            raise ConfigError("numpy has no bfloat16: use --format safetensors for bf16 shards (or --dtype float16)")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_rows, self.dtype, self.fmt = shard_rows, dtype, fmt
        self.pending: list[torch.Tensor] = []
        self.n_pending = 0
        self.shards: list[dict] = []

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu", self.dtype)
        while rows.shape[0]:
            take = min(rows.shape[0], self.shard_rows - self.n_pending)
            self.pending.append(rows[:take])
            self.n_pending += take
            rows = rows[take:]
            if self.n_pending == self.shard_rows:
                self.flush()

    def flush(self) -> None:
        if not self.n_pending:
            return
        data = torch.cat(self.pending).contiguous()
        name = f"shard_{len(self.shards):05d}.{self.fmt}"
        if self.fmt == "npy":
            def write(tmp):
                with open(tmp, "wb") as f:
                    np.save(f, data.numpy())
        else:
            from safetensors.torch import save_file

            def write(tmp):
                save_file({"activations": data}, tmp)
        atomic_write(self.out_dir / name, write)
        self.shards.append({"file": name, "rows": int(data.shape[0])})
        self.pending, self.n_pending = [], 0


def _old_harvest(folder: Path) -> list[Path]:
    """What a previous harvest left in `folder`: its manifest, shard files, and the per-hook
    folders a paired manifest names."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_file() and (p.suffix in SHARD_SUFFIXES or p.name == MANIFEST)]
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            sub = json.loads(manifest.read_text(encoding="utf-8")).get("folders", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            sub = {}
        for name in sub.values() if isinstance(sub, dict) else ():
            d = folder / str(name)
            if d.is_dir() and d.parent == folder:
                found.append(d)
    return found


def prepare_out_dir(out_dir: str | Path, overwrite: bool, hooks: Sequence[str] = ()) -> Path:
    """Make `out_dir` ready for a new harvest: refuse one that holds a previous harvest's
    shards or manifest, unless `overwrite`, which removes them (the manifest first, so an
    interrupted removal never leaves a manifest naming missing shards)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: pass a directory for the shards")
    folders = [out] + [out / h for h in hooks]
    old = [p for d in folders for p in _old_harvest(d)]
    if old and not overwrite:
        names = ", ".join(sorted({str(p.relative_to(out)) for p in old})[:4]) + (", ..." if len(old) > 4 else "")
        raise ConfigError(f"{out} already holds harvested activations ({names}): pick an empty folder, or pass "
                          "--overwrite (overwrite=True) to delete them first")
    for p in sorted(old, key=lambda p: (p.name != MANIFEST, p.is_dir())):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


@torch.no_grad()
def harvest(model: torch.nn.Module, tokenizer, texts: Iterable[str], hook: str | Sequence[str], out_dir: str | Path,
            context_length: int | None = None, batch_size: int = 8, shard_rows: int = 65_536,
            dtype: torch.dtype | str = torch.float32, fmt: str = "npy", max_tokens: int | None = None,
            exclude_special: bool = True, progress: bool = True, model_name: str | None = None,
            overwrite: bool = False) -> dict:
    """Run `model` over `texts`, capture the output of module `hook` (or of each of several
    hooks, paired row by row), write shards; returns the manifest (see the module docstring).
    context_length: tokens per document at most (None: 128, or the model's limit if lower)."""
    dtype = dtype_from_str(dtype)
    hooks = [hook] if isinstance(hook, str) else list(hook)
    if not hooks:
        raise ConfigError("name at least one hook point")
    hooks = [resolve_hook(model, h) for h in hooks]
    if len(set(hooks)) != len(hooks):
        raise ConfigError(f"hook points {hooks} name one module twice: pass each once")
    context_length = check_context_length(model, context_length)
    paired = len(hooks) > 1
    out = prepare_out_dir(out_dir, overwrite, hooks if paired else ())
    writers = {h: ShardWriter(out / h if paired else out, shard_rows, dtype, fmt) for h in hooks}
    special = special_token_ids(tokenizer) if exclude_special else None
    model.eval()
    tokens = docs = 0
    d: dict[str, int] = {}
    bar = tqdm(total=max_tokens, desc="harvesting", unit="tok", disable=not progress)
    try:
        for input_ids, attention_mask in token_batches(tokenizer, texts, batch_size, context_length):
            docs += input_ids.shape[0]
            acts = capture(model, hooks, input_ids, attention_mask)
            keep = valid_positions(input_ids, attention_mask, special)
            n = int(keep.sum()) if max_tokens is None else min(int(keep.sum()), max_tokens - tokens)
            for h in hooks:
                rows = acts[h][keep.to(acts[h].device)][:n]
                d[h] = rows.shape[-1]
                writers[h].add(rows)
            tokens += n
            bar.update(n)
            if max_tokens is not None and tokens >= max_tokens:
                break
        for w in writers.values():
            w.flush()
    finally:
        bar.close()
    if not tokens:
        raise InputError("no activations were captured: the texts were empty (or all special tokens)")
    name = model_name or getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__
    common = {"model": name, "dtype": dtype_to_str(dtype), "format": fmt, "context_length": context_length,
              "exclude_special": exclude_special, "documents": docs, "rows": tokens}
    manifests = {h: {"model": name, "hook": h, "d_in": d[h], **common, "shards": writers[h].shards} for h in hooks}
    for h in hooks:
        atomic_write_text(writers[h].out_dir / MANIFEST, json.dumps(manifests[h], indent=2) + "\n")
    if not paired:
        return manifests[hooks[0]]
    top = {**common, "paired": True, "hooks": hooks, "folders": {h: h for h in hooks},
           "d_in": {h: d[h] for h in hooks}}
    atomic_write_text(out / MANIFEST, json.dumps(top, indent=2) + "\n")
    return top


# ---------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a Hugging Face model name or a local directory")
    p.add_argument("--hook", required=True, action="append",
                   help="name of the module whose output to capture, e.g. transformer.h.6; repeat for paired "
                        "activations (one subfolder per hook)")
    p.add_argument("--text", required=True, action="append", help=".txt (one document per line) or .jsonl file; repeatable")  # noqa: E501
    p.add_argument("--text-field", default="text", help="the field of a .jsonl record holding the text")
    p.add_argument("--out", required=True, help="directory for the shards and manifest.json")
    p.add_argument("--overwrite", action="store_true", help="delete a previous harvest in --out first")
    p.add_argument("--context-length", type=int, default=None,
                   help="tokens per document at most (default 128, or the model's limit if lower)")
    p.add_argument("--batch-size", type=int, default=8, help="documents per forward pass (default 8)")
    p.add_argument("--shard-rows", type=int, default=65_536, help="rows per shard file (default 65536)")
    p.add_argument("--dtype", default="float32", help="dtype of the stored activations (default float32)")
    p.add_argument("--format", default="npy", choices=("npy", "safetensors"), help="shard format (default npy)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many activation rows")
    p.add_argument("--keep-special", action="store_true", help="keep special tokens' (e.g. BOS) activations")
    p.add_argument("--device", default="cpu", help="device of the model (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .model import load_model

    missing = [t for t in args.text if not Path(t).is_file()]
    if missing:  # before anything, --overwrite included, is done
        raise InputError(f"text file {missing[0]} does not exist")
    model, tokenizer = load_model(args.model, head="none", device=args.device)
    manifest = harvest(model, tokenizer, read_texts(args.text, args.text_field), args.hook, args.out,
                       context_length=args.context_length, batch_size=args.batch_size,
                       shard_rows=args.shard_rows, dtype=args.dtype, fmt=args.format, max_tokens=args.max_tokens,
                       exclude_special=not args.keep_special, progress=not args.no_progress,
                       model_name=args.model, overwrite=args.overwrite)
    where = [f"{args.out}/{f}" for f in manifest["folders"].values()] if manifest.get("paired") else [args.out]
    n_shards = sum(len(json.loads((Path(w) / MANIFEST).read_text())["shards"]) for w in where)
    print(f"fastsae: wrote {manifest['rows']} activation rows per hook from {manifest['documents']} documents in "
          f"{n_shards} shard(s) to {args.out}; train with: fastsae train --data {where[0]} --expansion 16 --k 32")
    return 0
