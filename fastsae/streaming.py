"""Activations straight from the model: a source that runs a `transformers` model on text (or
token files) while training and yields hook-point activations, with no harvest step.

    tokens = TokenStream(tokenizer=tok, text_files=["corpus.txt"], batch_size=8)
    source = ModelSource(model, "transformer.h.6", tokens, batch_size=4096)
    fastsae.Trainer(cfg, source).fit()

Documents are read in order, `tokens.batch_size` per forward pass (stopped after the deepest
hook, as `harvest` does), until a shuffle buffer holds at least `buffer_rows` rows. Padding and
special tokens are dropped exactly as `harvest` drops them, so the rows are the ones `harvest`
writes from the same documents and batch size (in the same order with shuffle=False). The
buffer's rows are permuted by a generator seeded with (seed, epoch, buffer number) and cut into
batches of `batch_size` rows; the documents are read again, epoch after epoch, until the trainer
stops (or `epochs` passes).

Several hooks share one forward pass and one permutation: the source then yields
{hook: [B, d]} (row i of every hook is the same token), and `view(hook)` is one hook's stream,
for one Trainer per hook (or several widths on one hook) stepped together by
fastsae.group.TrainerGroup.

Resume. The state is {epoch, buffer, doc (the buffer's first document), offset (its rows already
yielded), seed}; the buffer is not saved. Resuming re-reads the buffer's documents, re-runs the
model on them in the same forward batches (the same activations, on a deterministic backend),
permutes them the same way and skips `offset` rows, so a resumed run sees exactly the batches of
the uninterrupted one, at the cost of one buffer fill. fingerprint() describes the model (a
sample of its weights), the hook, the documents and the settings that shape the stream, for the
resume data check.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch

from .checkpoint import sha256_tensors
from .config import dtype_from_str, dtype_to_str
from .data import ActivationSource, _generator
from .errors import ConfigError, InputError

_DIGEST_BYTES = 1 << 16  # how much of each file the fingerprint reads


def _file_digest(paths: Sequence[Path]) -> tuple[str, str]:
    """('a.txt (123 bytes), ...', digest of each file's size and first 64 KiB): never a full read."""
    h = hashlib.sha256()
    for p in paths:
        size = p.stat().st_size
        h.update(f"\0{p.name}\0{size}\0".encode())
        with open(p, "rb") as f:
            h.update(f.read(_DIGEST_BYTES))
    return ", ".join(f"{p.name} ({p.stat().st_size} bytes)" for p in paths), h.hexdigest()[:16]


class TokenStream:
    """Documents as forward batches (input_ids, attention_mask or None) [B, S] of `batch_size`
    documents, from any batch boundary on: what ModelSource and end-to-end training read.

    One of: `texts` (a list of strings, or a zero-argument callable returning an iterable of
    them), `text_files` (.txt, one document per non-empty line, or .jsonl with `text_field`), both
    tokenized with `tokenizer`, truncated to `context_length` and right-padded per batch as
    `harvest` does; or `token_files` (integer .npy/.safetensors, [sequences, seq] rows as they
    are, or [tokens] cut into `context_length` pieces, read as fastsae.model.token_file_batches
    reads them; `tokenizer`, if given, names the special tokens to drop). context_length None:
    128, or the model's limit if lower (set when a source binds it to its model).
    """

    def __init__(self, *, tokenizer=None, texts: Sequence[str] | Callable[[], Iterable[str]] | None = None,
                 text_files: Iterable[str | os.PathLike] | None = None, text_field: str = "text",
                 token_files: Iterable[str | os.PathLike] | None = None, batch_size: int = 8,
                 context_length: int | None = None):
        given = [name for name, v in (("texts", texts), ("text_files", text_files), ("token_files", token_files))
                 if v is not None]
        if len(given) != 1:
            raise ConfigError("a token stream reads one kind of input: pass texts, text_files or token_files"
                              + (f" (got {', '.join(given)})" if given else ""))
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"documents per forward pass must be a positive integer, got {batch_size!r}")
        if texts is not None and isinstance(texts, str):
            raise ConfigError("texts is a list of documents, got one string: pass [text] or text_files=[path]")
        self.tokenizer, self.texts, self.text_field = tokenizer, texts, text_field
        self.text_files = [Path(p) for p in text_files] if text_files is not None else None
        if token_files is not None:
            from .model import token_files as listed

            token_files = listed(token_files)
        self.token_files = token_files
        if self.text_files is not None:
            missing = [p for p in self.text_files if not p.is_file()]
            if missing:
                raise InputError(f"text file {missing[0]} does not exist")
        if self.token_files is None and tokenizer is None:
            raise ConfigError("text is tokenized by the model's tokenizer: pass tokenizer=")
        self.batch_size, self.context_length = batch_size, context_length

    def with_context_length(self, context_length: int) -> TokenStream:
        other = copy.copy(self)
        other.context_length = context_length
        return other

    def _documents(self) -> Iterable[str]:
        if self.text_files is not None:
            from .harvest import read_texts

            return read_texts(self.text_files, self.text_field)
        return self.texts() if callable(self.texts) else self.texts

    def batches(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """The forward batches from document `start` on (a batch boundary: a multiple of
        batch_size, or where a token file begins)."""
        from .model import token_batches, token_file_batches

        if self.context_length is None:
            raise ConfigError("the token stream has no context length yet: pass context_length=")
        if self.token_files is None:
            docs = itertools.islice(iter(self._documents()), start, None)
            yield from token_batches(self.tokenizer, docs, self.batch_size, self.context_length)
            return
        seen = 0
        for ids, mask in token_file_batches(self.token_files, self.batch_size, self.context_length):
            if seen >= start:
                yield ids, mask
            elif seen + ids.shape[0] > start:
                raise InputError(f"sequence {start} (a saved position) is not where a batch of the token files "
                                 "begins: were the files changed? resume on the same files")
            seen += ids.shape[0]

    def fingerprint(self) -> dict:
        out = {"context_length": self.context_length, "model_batch_size": self.batch_size}
        if self.tokenizer is not None:
            out["tokenizer"] = f"{type(self.tokenizer).__name__}, {len(self.tokenizer)} tokens"
        if self.text_files is not None or self.token_files is not None:
            files = self.text_files if self.text_files is not None else self.token_files
            out["documents"], out["documents_sample"] = _file_digest(files)
            if self.text_files is not None:
                out["text_field"] = self.text_field
        elif isinstance(self.texts, Sequence):
            docs = list(self.texts[:16]) + list(self.texts[-16:])
            out["documents"] = f"{len(self.texts)} texts"
            out["documents_sample"] = hashlib.sha256("\0".join(docs).encode()).hexdigest()[:16]
        else:  # a callable: its documents cannot be looked at without reading them all
            out["documents"] = "texts from a callable"
        return out


def model_digest(model: torch.nn.Module) -> str:
    """A digest of a model's parameter names, shapes and a few values of each (cheap: no full
    read of the weights): changes when the model does."""
    picked = []
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        at = torch.linspace(0, max(flat.numel() - 1, 0), min(flat.numel(), 8)).long().to(flat.device)
        picked.append((f"{name}{tuple(p.shape)}", flat[at]))
    return sha256_tensors(picked)[:16]


class ModelSource(ActivationSource):
    """Batches [batch_size, d] of a model's activations at `hooks` (a module name, or a list of
    them: then each batch is {hook: [batch_size, d]}), computed while training. See the module
    docstring for the order of the rows and how a resumed run sees the same batches.

    buffer_rows: rows per shuffle buffer (whole forward passes: a buffer may hold a few more).
    exclude_special: drop special tokens (BOS and the like), as harvest does by default.
    dtype: of the yielded rows (as harvest's --dtype). buffer_device: where the buffer lives
    (default the model's device: no round trip through the host). epochs: passes over the
    documents (None: endless). progress: a bar while a buffer fills.
    forward_seconds / forward_passes count the model's time; fill_seconds the buffer fills' whole
    time (reading and tokenizing the documents too), for benchmarks.
    """

    def __init__(self, model: torch.nn.Module, hooks: str | Sequence[str], tokens: TokenStream,
                 batch_size: int = 4096, buffer_rows: int = 262_144, shuffle: bool = True, seed: int = 0,
                 exclude_special: bool = True, dtype: torch.dtype | str = torch.float32,
                 buffer_device: str | torch.device | None = None, epochs: int | None = None,
                 progress: bool = False):
        from .model import _model_device, check_context_length, resolve_hook, special_token_ids

        self.single = isinstance(hooks, str)
        names = [hooks] if self.single else list(hooks)
        if not names:
            raise ConfigError("name at least one hook point")
        self.hooks = [resolve_hook(model, h) for h in names]
        if len(set(self.hooks)) != len(self.hooks):
            raise ConfigError(f"hook points {self.hooks} name one module twice: pass each once")
        for name, v in (("batch_size", batch_size), ("buffer_rows", buffer_rows)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if epochs is not None and epochs < 1:
            raise ConfigError(f"epochs must be at least 1 (or None: endless), got {epochs}")
        self.model = model.eval()  # dropout off: the activations must not depend on when they are computed
        self.tokens = tokens.with_context_length(check_context_length(model, tokens.context_length))
        tok = tokens.tokenizer
        self.special = special_token_ids(tok) if exclude_special and tok is not None else None
        self.exclude_special = exclude_special
        self.batch_size, self.buffer_rows, self.shuffle, self.seed = batch_size, buffer_rows, shuffle, seed
        self.dtype = dtype_from_str(dtype)
        self.buffer_device = torch.device(buffer_device) if buffer_device is not None else _model_device(model)
        self.epochs, self.progress = epochs, progress
        self.epoch, self.buffer, self.doc, self.offset = 0, 0, 0, 0
        self.forward_seconds, self.forward_passes, self.fill_seconds = 0.0, 0, 0.0
        self._sample: tuple | None = None
        self.hook_widths = self._hook_widths()

    def _hook_widths(self) -> dict[str, int]:
        from .model import capture

        first = next(self.tokens.batches(0), None)
        if first is None:
            raise InputError("the documents are empty: pass text to read")
        ids, mask = first
        acts = capture(self.model, self.hooks, ids[:1], None if mask is None else mask[:1])
        return {h: int(a.shape[-1]) for h, a in acts.items()}

    @property
    def d_in(self) -> int:
        if not self.single:
            raise ConfigError(f"this source yields the activations of {len(self.hooks)} hook points: train one SAE "
                              "per hook on source.view(hook), stepped together by fastsae.group.TrainerGroup")
        return self.hook_widths[self.hooks[0]]

    def view(self, hook: str) -> HookView:
        """The stream of one hook's rows (an ActivationSource sharing this source's position)."""
        from .model import resolve_hook

        name = resolve_hook(self.model, hook)
        if name not in self.hooks:
            raise ConfigError(f"this source reads {', '.join(self.hooks)}, not {name}: add it to its hooks")
        return HookView(self, name)

    # ------------------------------------------------------------ the stream
    def _fill(self, doc: int) -> tuple[dict[str, torch.Tensor], int, bool]:
        """(rows per hook, the next buffer's first document, whether the documents ran out): the
        whole forward passes from document `doc` until at least buffer_rows rows are in."""
        from tqdm.auto import tqdm

        from .model import capture, valid_positions

        filling = time.perf_counter()
        rows: dict[str, list[torch.Tensor]] = {h: [] for h in self.hooks}
        n, ended = 0, True
        bar = tqdm(total=self.buffer_rows, desc="activations", unit="tok", leave=False, disable=not self.progress)
        try:
            for ids, mask in self.tokens.batches(doc):
                start = time.perf_counter()
                acts = capture(self.model, self.hooks, ids, mask)
                keep = valid_positions(ids, mask, self.special)
                for h in self.hooks:
                    rows[h].append(acts[h][keep.to(acts[h].device)].to(self.buffer_device, self.dtype))
                self.forward_seconds += time.perf_counter() - start
                self.forward_passes += 1
                got = int(keep.sum())
                n, doc = n + got, doc + ids.shape[0]
                bar.update(got)
                if n >= self.buffer_rows:
                    ended = False
                    break
        finally:
            bar.close()
        width = self.hook_widths
        buf = {h: torch.cat(r) if r else torch.empty(0, width[h], dtype=self.dtype, device=self.buffer_device)
               for h, r in rows.items()}
        self.fill_seconds += time.perf_counter() - filling
        return buf, doc, ended

    def _advance(self, next_doc: int, ended: bool) -> None:
        if ended:
            self.epoch, self.buffer, self.doc = self.epoch + 1, 0, 0
        else:
            self.buffer, self.doc = self.buffer + 1, next_doc
        self.offset = 0

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """{hook: [batch_size, d]} batches from the current position (the source's position
        moves with them)."""
        pending: list[dict[str, torch.Tensor]] = []
        have = 0
        while self.epochs is None or self.epoch < self.epochs:
            buf, next_doc, ended = self._fill(self.doc)
            n = buf[self.hooks[0]].shape[0]
            if n == 0:
                if self.doc == 0:  # a whole pass over the documents gave nothing
                    raise InputError("no activations: the documents are empty, or hold only padding and special "
                                     "tokens")
                self._advance(next_doc, True)
                continue
            if self.shuffle:
                perm = torch.randperm(n, generator=_generator(self.seed, self.epoch, self.buffer + 1))
                buf = {h: b[perm.to(b.device)] for h, b in buf.items()}
            while self.offset < n:
                take = min(self.batch_size - have, n - self.offset)
                pending.append({h: b[self.offset:self.offset + take] for h, b in buf.items()})
                self.offset += take
                have += take
                if have == self.batch_size:
                    batch = pending[0] if len(pending) == 1 else {h: torch.cat([p[h] for p in pending])
                                                                   for h in self.hooks}
                    pending, have = [], 0
                    if self.offset == n:  # keep the position canonical for resume
                        self._advance(next_doc, ended)
                        yield batch
                        break
                    yield batch
            else:
                self._advance(next_doc, ended)

    def __iter__(self):
        if not self.single:
            yield from self.batches()
            return
        hook = self.hooks[0]
        for b in self.batches():
            yield b[hook]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "buffer": self.buffer, "doc": self.doc, "offset": self.offset,
                "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.buffer, self.doc, self.offset, self.seed = (
            state["epoch"], state["buffer"], state["doc"], state["offset"], state["seed"])

    def sample_rows(self, n_rows: int) -> dict[str, torch.Tensor]:
        """Up to n_rows rows per hook from the current position, without moving it (kept, so
        the trainers of a group initialising from the same position run the model once)."""
        key = (json.dumps(self.state_dict(), sort_keys=True), n_rows)
        if self._sample is not None and self._sample[0] == key:
            return self._sample[1]
        state = self.state_dict()
        got: dict[str, list[torch.Tensor]] = {h: [] for h in self.hooks}
        count = 0
        for batch in self.batches():
            for h in self.hooks:
                got[h].append(batch[h])
            count += batch[self.hooks[0]].shape[0]
            if count >= n_rows:
                break
        self.load_state_dict(state)
        if not count:
            raise InputError("the activation source is empty")
        rows = {h: torch.cat(r)[:n_rows] for h, r in got.items()}
        self._sample = (key, rows)
        return rows

    def sample(self, n_rows: int):
        rows = self.sample_rows(n_rows)
        return rows[self.hooks[0]] if self.single else rows

    def fingerprint(self, hooks: Sequence[str] | None = None) -> dict:
        # the model by its weights, not its name: a moved model directory is the same model
        return {"kind": "model", "model_weights": model_digest(self.model),
                "hooks": list(self.hooks if hooks is None else hooks), **self.tokens.fingerprint(),
                "exclude_special": self.exclude_special, "batch_size": self.batch_size,
                "buffer_rows": self.buffer_rows, "shuffle": self.shuffle, "dtype": dtype_to_str(self.dtype)}


class HookView(ActivationSource):
    """One hook's rows of a ModelSource: its position is the source's (state_dict and
    load_state_dict read and set it), so the Trainers of a group save the same position. Its
    fingerprint is that of a ModelSource of this hook alone, so a run trained in a group resumes
    on a single-hook source and back."""

    def __init__(self, source: ModelSource, hook: str):
        self.source, self.hook = source, hook
        self.d_in = source.hook_widths[hook]

    def __iter__(self):
        for b in self.source.batches():
            yield b[self.hook]

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)

    def sample(self, n_rows: int) -> torch.Tensor:
        return self.source.sample_rows(n_rows)[self.hook]

    def fingerprint(self) -> dict:
        return self.source.fingerprint([self.hook])


__all__ = ["TokenStream", "ModelSource", "HookView", "model_digest"]
