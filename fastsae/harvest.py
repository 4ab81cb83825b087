"""Harvest activations: run a Hugging Face model over text and write a module's outputs to shards.

    fastsae harvest --model gpt2 --hook transformer.h.6 --text corpus.txt --out acts/

A forward hook on the named module captures its output [batch, seq, d]; padding (and, by
default, special tokens such as BOS, whose activations are outliers) are dropped, and the
rows go to shards of `shard_rows` rows (.npy, or .safetensors for bf16), each written
atomically, plus manifest.json. The hook stops the forward pass once it has fired, so the
layers after the hook point are never computed. `fastsae train --data acts/` reads them.
"""

from __future__ import annotations

import argparse
import difflib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import atomic_write, atomic_write_text
from .config import dtype_from_str, dtype_to_str
from .errors import ConfigError, InputError


class _Captured(Exception):
    """Raised by the hook to stop the forward pass after the hooked module."""


def find_module(model: torch.nn.Module, hook: str) -> torch.nn.Module:
    modules = dict(model.named_modules())
    if hook not in modules:
        close = difflib.get_close_matches(hook, list(modules), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else \
            f"; some of its modules: {', '.join(list(modules)[1:8])}"
        raise ConfigError(f"the model has no module named {hook!r}{hint}")
    return modules[hook]


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


@torch.no_grad()
def harvest(model: torch.nn.Module, tokenizer, texts: Iterable[str], hook: str, out_dir: str | Path,
            context_length: int = 128, batch_size: int = 8, shard_rows: int = 65_536,
            dtype: torch.dtype | str = torch.float32, fmt: str = "npy", max_tokens: int | None = None,
            exclude_special: bool = True, progress: bool = True, model_name: str | None = None) -> dict:
    """Run `model` over `texts`, capture module `hook`'s output, write shards; returns the manifest."""
    dtype = dtype_from_str(dtype)
    module = find_module(model, hook)
    writer = ShardWriter(out_dir, shard_rows, dtype, fmt)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    device = next(model.parameters()).device
    captured: dict[str, torch.Tensor] = {}

    def on_output(_mod, _inp, out):
        captured["x"] = out[0] if isinstance(out, (tuple, list)) else out
        raise _Captured

    handle = module.register_forward_hook(on_output)
    model.eval()
    tokens = docs = 0
    d = None
    bar = tqdm(total=max_tokens, desc="harvesting", unit="tok", disable=not progress)
    try:
        batch: list[str] = []
        for doc in _chain(texts, [None]):
            if doc is not None:
                batch.append(doc)
                if len(batch) < batch_size:
                    continue
            if not batch:
                break
            enc = tokenizer(batch, truncation=True, max_length=context_length, padding=True, return_tensors="pt")
            docs += len(batch)
            batch = []
            captured.clear()
            try:
                model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
            except _Captured:
                pass
            if "x" not in captured:
                raise ConfigError(f"module {hook!r} did not run in the forward pass: pick another hook point")
            acts = captured["x"]
            if acts.dim() != 3 or acts.shape[:2] != enc["input_ids"].shape:
                raise ConfigError(
                    f"module {hook!r} returned shape {tuple(acts.shape)}, expected [batch, seq, d] matching the "
                    f"tokens {tuple(enc['input_ids'].shape)}: hook a residual-stream or MLP module"
                )
            keep = enc["attention_mask"].bool()
            if exclude_special and special.numel():
                keep &= ~torch.isin(enc["input_ids"], special)
            rows = acts[keep.to(acts.device)]
            if max_tokens is not None:
                rows = rows[:max_tokens - tokens]
            d = rows.shape[-1]
            writer.add(rows)
            tokens += rows.shape[0]
            bar.update(rows.shape[0])
            if max_tokens is not None and tokens >= max_tokens:
                break
        writer.flush()
    finally:
        handle.remove()
        bar.close()
    if not writer.shards:
        raise InputError("no activations were captured: the texts were empty (or all special tokens)")
    manifest = {
        "model": model_name or getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__,
        "hook": hook, "d_in": d, "dtype": dtype_to_str(dtype), "format": fmt, "context_length": context_length,
        "exclude_special": exclude_special, "documents": docs, "rows": tokens, "shards": writer.shards,
    }
    atomic_write_text(Path(out_dir) / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def _chain(*iterables):
    for it in iterables:
        yield from it


# ---------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a Hugging Face model name or a local directory")
    p.add_argument("--hook", required=True, help="name of the module whose output to capture, e.g. transformer.h.6")
    p.add_argument("--text", required=True, action="append", help=".txt (one document per line) or .jsonl file; repeatable")  # noqa: E501
    p.add_argument("--text-field", default="text", help="the field of a .jsonl record holding the text")
    p.add_argument("--out", required=True, help="directory for the shards and manifest.json")
    p.add_argument("--context-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="documents per forward pass")
    p.add_argument("--shard-rows", type=int, default=65_536)
    p.add_argument("--dtype", default="float32", help="dtype of the stored activations")
    p.add_argument("--format", default="npy", choices=("npy", "safetensors"))
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many activation rows")
    p.add_argument("--keep-special", action="store_true", help="keep special tokens' (e.g. BOS) activations")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise ConfigError("fastsae harvest needs transformers: pip install transformers") from e
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).to(args.device)
    hook = args.hook
    if hook not in dict(model.named_modules()) and "." in hook:
        # names written for the LM-head wrapper (transformer.h.0) also work on the bare model (h.0)
        hook = hook.split(".", 1)[1] if hook.split(".", 1)[1] in dict(model.named_modules()) else hook
    manifest = harvest(model, tokenizer, read_texts(args.text, args.text_field), hook, args.out,
                       context_length=args.context_length, batch_size=args.batch_size,
                       shard_rows=args.shard_rows, dtype=args.dtype, fmt=args.format, max_tokens=args.max_tokens,
                       exclude_special=not args.keep_special, progress=not args.no_progress,
                       model_name=args.model)
    print(f"fastsae: wrote {manifest['rows']} activation rows (d={manifest['d_in']}) from {manifest['documents']} "
          f"documents in {len(manifest['shards'])} shard(s) to {args.out}; train with: "
          f"fastsae train --data {args.out} --expansion 16 --k 32")
    return 0
