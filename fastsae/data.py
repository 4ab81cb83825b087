"""Activation sources: where training batches [B, d_in] come from.

* TensorSource: an in-memory tensor, reshuffled every epoch.
* IterableSource: any iterable of batches (a list, a generator, a DataLoader).
* ShardSource: activation shards on disk (.npy, memory-mapped, or .safetensors, read by
  slice), streamed through a shuffle buffer, so data larger than RAM trains.
* PairedSource: two aligned sources side by side (a transcoder's inputs and targets).

Every source has state_dict()/load_state_dict(): the trainer saves the position with each
checkpoint, and a resumed run sees exactly the batches the uninterrupted run would have.
Shuffling is a pure function of (seed, epoch, buffer number), so resuming needs only a few
integers, never the buffer's contents. fingerprint() describes the data cheaply (no full
read), so a resumed run can tell that its data changed (fingerprint_changes).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .checkpoint import sha256_tensors
from .errors import InputError

SHARD_SUFFIXES = (".npy", ".safetensors")
MANIFEST_NAME = "manifest.json"
# safetensors dtype names a shard may hold (activations are floating point)
_SAFETENSORS_FLOATS = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for k in keys:  # mix the keys into one 63-bit seed
        seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def _as_rows(batch, d_in: int | None, where: str) -> torch.Tensor:
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(np.ascontiguousarray(batch))
    if not isinstance(batch, torch.Tensor):
        raise InputError(f"{where} yielded a {type(batch).__name__}; a batch must be a tensor [..., d_in]")
    if batch.dim() == 0:
        raise InputError(f"{where} yielded a scalar; a batch must be a tensor [..., d_in]")
    if d_in is not None and batch.shape[-1] != d_in:
        raise InputError(
            f"{where} yielded activations of dimension {batch.shape[-1]} (shape {tuple(batch.shape)}), "
            f"but the SAE has d_in={d_in}: train on the hook point the SAE was built for"
        )
    return batch.reshape(-1, batch.shape[-1])


class ActivationSource:
    """An endless (or finite, for IterableSource) stream of [B, d_in] batches."""

    d_in: int | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """A small JSON-able description of the data (never a full read): compare two with
        fingerprint_changes to tell whether a resumed run reads the data it started on."""
        return {"kind": type(self).__name__, "d_in": self.d_in}

    def sample(self, n_rows: int) -> torch.Tensor:
        """Up to n_rows rows for initialisation, without moving the training position."""
        state = self.state_dict()
        rows, got = [], 0
        for batch in self:
            rows.append(batch)
            got += batch.shape[0]
            if got >= n_rows:
                break
        self.load_state_dict(state)
        if not rows:
            raise InputError("the activation source is empty")
        return torch.cat(rows)[:n_rows]


class TensorSource(ActivationSource):
    """Batches of `batch_size` rows from an in-memory tensor [N, d] (or [..., d]), in a fresh
    random order every epoch (shuffle=True) or in order. A last partial batch is dropped."""

    def __init__(self, data: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0):
        self.data = _as_rows(data, None, "TensorSource")
        if not 1 <= batch_size <= self.data.shape[0]:
            raise InputError(
                f"batch_size={batch_size} must be between 1 and the number of rows ({self.data.shape[0]})"
            )
        self.d_in = self.data.shape[1]
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> torch.Tensor:
        n = self.data.shape[0]
        return torch.randperm(n, generator=_generator(self.seed, epoch)) if self.shuffle else torch.arange(n)

    def __iter__(self):
        n, b = self.data.shape[0], self.batch_size
        order = self._order(self.epoch)
        while True:
            if self.position + b > n:
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order(self.epoch)
            idx = order[self.position:self.position + b].to(self.data.device)
            self.position += b
            yield self.data.index_select(0, idx)  # row copies; data[idx]'s elementwise gather is 5x slower

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def fingerprint(self):
        n = self.data.shape[0]
        rows = torch.linspace(0, n - 1, min(n, 64)).round().long().to(self.data.device)
        return {"kind": "tensor", "shape": list(self.data.shape), "dtype": str(self.data.dtype),
                "sample": _digest([self.data[rows]])}

    def load_state_dict(self, state):
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]


class IterableSource(ActivationSource):
    """Batches from any iterable (re-iterable, or a zero-argument factory that returns a fresh
    iterator). Each batch [..., d] is flattened to rows. Resuming skips the batches already
    consumed, so a resumed run sees the same data if the iterable replays the same batches."""

    def __init__(self, batches: Iterable | Callable[[], Iterable], d_in: int | None = None):
        self.factory = batches if callable(batches) and not hasattr(batches, "__iter__") else (lambda: batches)
        self.d_in = d_in
        self.consumed = 0

    def __iter__(self):
        skip = self.consumed
        for i, batch in enumerate(self.factory()):
            if i < skip:
                continue
            rows = _as_rows(batch, self.d_in, "the batch iterable")
            self.consumed = i + 1
            yield rows

    def state_dict(self):
        return {"consumed": self.consumed}

    def fingerprint(self):
        # The batches cannot be looked at without consuming them: only the width is known.
        return {"kind": "iterable", "d_in": self.d_in}

    def load_state_dict(self, state):
        self.consumed = state["consumed"]


def _digest(tensors: Iterable[torch.Tensor]) -> str:
    """A short content hash of small tensors."""
    return sha256_tensors((str(i), t) for i, t in enumerate(tensors))[:16]


def _refuse_dtype(path: Path, dtype: str) -> None:
    raise InputError(
        f"{path} holds {dtype} values; activation shards must be floating point (float16, bfloat16, "
        "float32 or float64): integer, bool or complex arrays are not activations"
    )


class _Shard:
    """One on-disk [rows, d] array, read by row range without loading the rest."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise InputError(f"shard {path} does not exist" if not path.exists() else
                             f"shard {path} is not a file")
        self.bytes = path.stat().st_size
        if self.bytes == 0:
            raise InputError(f"{path} is empty (0 bytes): the shard was not written completely; harvest it again")
        if path.suffix == ".npy":
            try:
                self.array = np.load(path, mmap_mode="r")
            except (ValueError, OSError, EOFError) as e:
                raise InputError(f"{path} is not a readable .npy array ({e}): the file is truncated or "
                                 "corrupt; harvest it again") from e
            dt = self.array.dtype
            if dt.kind != "f":
                _refuse_dtype(path, str(dt))
            if not dt.isnative:
                raise InputError(f"{path} is stored in the other byte order ({dt.str}, big-endian here); rewrite "
                                 "it in this machine's order: np.save(path, arr.astype(arr.dtype.newbyteorder('=')))")
            self.dtype = str(dt)
            shape = self.array.shape
        elif path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                self.file = safe_open(str(path), framework="pt")
                keys = list(self.file.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise InputError(f"{path} is not a readable safetensors file ({e}): the file is truncated or "
                                 "corrupt; harvest it again") from e
            key = "activations" if "activations" in keys else (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise InputError(f"{path} holds tensors {keys}: name the activations 'activations'")
            self.slice = self.file.get_slice(key)
            st_dtype = self.slice.get_dtype()
            if st_dtype not in _SAFETENSORS_FLOATS:
                _refuse_dtype(path, st_dtype)
            self.dtype = _SAFETENSORS_FLOATS[st_dtype]
            shape = tuple(self.slice.get_shape())
        else:
            raise InputError(f"{path}: shard files must end in {' or '.join(SHARD_SUFFIXES)}")
        if len(shape) != 2:
            raise InputError(f"{path} holds an array of shape {tuple(shape)}; shards must be [rows, d_in]")
        self.rows, self.d = int(shape[0]), int(shape[1])

    def read(self, start: int, stop: int) -> torch.Tensor:
        if self.path.suffix == ".npy":
            return torch.from_numpy(np.array(self.array[start:stop]))
        return self.slice[start:stop]

    def fingerprint(self) -> dict:
        ends = [self.read(0, 1), self.read(self.rows - 1, self.rows)] if self.rows else []
        return {"file": self.path.name, "bytes": self.bytes, "shape": [self.rows, self.d], "dtype": self.dtype,
                "sample": _digest(ends)}


def read_manifest(directory: str | Path) -> dict:
    """The manifest.json that `fastsae harvest` writes beside its shards ({} if none)."""
    p = Path(directory) / MANIFEST_NAME
    if not p.is_file():
        return {}
    try:
        manifest = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p} is not valid JSON ({e}): the manifest is corrupt; harvest again, or delete it "
                         "to read every shard file of the directory") from e
    if not isinstance(manifest, dict):
        raise InputError(f"{p} must hold a JSON object, got {type(manifest).__name__}: the manifest is corrupt")
    shards = manifest.get("shards", [])  # a manifest without "shards" describes the data, not its files
    if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("file"), str)
                                               for s in shards):
        raise InputError(f"{p} does not list its shards (a JSON object with \"shards\": [{{\"file\": ..., "
                         "\"rows\": ...}}, ...]): the manifest is corrupt")
    for s in shards:
        f = Path(s["file"])
        if f.is_absolute() or ".." in f.parts:
            raise InputError(f"{p} lists shard {s['file']!r} outside its directory: the manifest is corrupt")
    return manifest


def shard_paths(location: str | Path | Iterable[str | Path]) -> list[Path]:
    """The shard files of a directory (those its manifest.json lists, or all of them, sorted),
    or the given list of files."""
    if isinstance(location, (str, Path)):
        location = Path(location)
        if not location.exists():
            raise InputError(f"{location} does not exist: pass a directory of activation shards (from "
                             "`fastsae harvest`) or a shard file")
        if location.is_dir():
            manifest = read_manifest(location)
            if manifest.get("paired"):
                folders = manifest.get("folders", {})
                raise InputError(f"{location} holds activations of several hook points ({', '.join(folders)}): "
                                 f"pass one of their folders, e.g. {location / next(iter(folders.values()), '<hook>')}")
            if manifest.get("shards"):
                listed = [location / s["file"] for s in manifest["shards"]]
                unlisted = sorted({p.name for p in location.iterdir() if p.suffix in SHARD_SUFFIXES}
                                  - {p.name for p in listed})
                if unlisted:
                    warnings.warn(f"{location}: reading the {len(listed)} shard(s) listed in {MANIFEST_NAME}; "
                                  f"ignoring {len(unlisted)} other shard file(s) ({', '.join(unlisted[:3])}"
                                  f"{', ...' if len(unlisted) > 3 else ''})", stacklevel=3)
                return listed
            paths = sorted(p for p in location.iterdir() if p.suffix in SHARD_SUFFIXES)
            if not paths:
                raise InputError(f"{location} has no {' or '.join(SHARD_SUFFIXES)} shard files")
            return paths
        return [location]
    return [Path(p) for p in location]


class ShardSource(ActivationSource):
    """Stream batches from activation shards on disk through a shuffle buffer.

    The shards are cut into chunks of `chunk_rows` contiguous rows. Each epoch visits the
    chunks in a random order; `buffer_rows // chunk_rows` consecutive chunks are loaded
    together and their rows permuted, and batches are cut from the stream of permuted
    buffers. Memory: one buffer (buffer_rows × d) plus a batch. shuffle=False reads in order.
    """

    def __init__(self, shards, batch_size: int, shuffle: bool = True, buffer_rows: int = 262_144,
                 chunk_rows: int = 4096, seed: int = 0, dtype: torch.dtype = torch.float32):
        directory = Path(shards) if isinstance(shards, (str, Path)) and Path(shards).is_dir() else None
        self.manifest = read_manifest(directory) if directory is not None else {}
        self.shards = [_Shard(p) for p in shard_paths(shards)]
        dims = {s.d for s in self.shards}
        if len(dims) > 1:
            sizes = ", ".join(f"{s.path.name}: {s.d}" for s in self.shards)
            raise InputError(f"shards disagree on the activation dimension ({sizes}): keep one hook point per run")
        self.d_in = self.shards[0].d
        if self.manifest:
            self._check_against_manifest(directory / MANIFEST_NAME)
        self.chunks = [(i, a, min(a + chunk_rows, s.rows)) for i, s in enumerate(self.shards)
                       for a in range(0, s.rows, chunk_rows)]
        if not self.chunks:
            raise InputError("the shards hold no rows")
        self.batch_size, self.shuffle, self.seed, self.dtype = batch_size, shuffle, seed, dtype
        self.chunks_per_buffer = max(1, buffer_rows // chunk_rows)
        self.n_buffers = -(-len(self.chunks) // self.chunks_per_buffer)
        self.epoch, self.buffer, self.offset = 0, 0, 0

    def _check_against_manifest(self, path: Path) -> None:
        """Each listed shard holds the rows, and the shards the width, that the manifest says."""
        for shard, entry in zip(self.shards, self.manifest.get("shards", [])):
            rows = entry.get("rows")
            if rows is not None and rows != shard.rows:
                raise InputError(f"{shard.path} holds {shard.rows} rows but {path} says {rows}: the shard is "
                                 "truncated or was replaced; harvest again")
        d_in = self.manifest.get("d_in")
        if d_in is not None and d_in != self.d_in:
            raise InputError(f"the shards hold activations of dimension {self.d_in} but {path} says d_in={d_in}: "
                             "the shards were replaced; harvest again")

    @property
    def n_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def fingerprint(self):
        manifest = json.dumps(self.manifest, sort_keys=True) if self.manifest else None
        return {"kind": "shards", "manifest": hashlib.sha256(manifest.encode()).hexdigest()[:16] if manifest else None,
                "shards": [s.fingerprint() for s in self.shards]}

    def _load_buffer(self, epoch: int, buffer: int) -> torch.Tensor:
        order = torch.randperm(len(self.chunks), generator=_generator(self.seed, epoch)) if self.shuffle \
            else torch.arange(len(self.chunks))
        picked = order[buffer * self.chunks_per_buffer:(buffer + 1) * self.chunks_per_buffer].tolist()
        rows = torch.cat([self.shards[i].read(a, b) for i, a, b in (self.chunks[c] for c in picked)])
        if self.shuffle:
            perm = torch.randperm(rows.shape[0], generator=_generator(self.seed, epoch, buffer + 1))
            rows = rows.index_select(0, perm)
        return rows.to(self.dtype)

    def __iter__(self):
        pending, have = [], 0
        while True:
            buf = self._load_buffer(self.epoch, self.buffer)
            while self.offset < buf.shape[0]:
                take = min(self.batch_size - have, buf.shape[0] - self.offset)
                pending.append(buf[self.offset:self.offset + take])
                self.offset += take
                have += take
                if have == self.batch_size:
                    batch = torch.cat(pending) if len(pending) > 1 else pending[0]
                    pending, have = [], 0
                    if self.offset == buf.shape[0]:  # keep the position canonical for resume
                        self._next_buffer()
                        yield batch
                        break
                    yield batch
            else:
                self._next_buffer()

    def _next_buffer(self) -> None:
        self.buffer, self.offset = self.buffer + 1, 0
        if self.buffer == self.n_buffers:
            self.epoch, self.buffer = self.epoch + 1, 0

    def state_dict(self):
        return {"epoch": self.epoch, "buffer": self.buffer, "offset": self.offset, "seed": self.seed}

    def load_state_dict(self, state):
        self.epoch, self.buffer, self.offset, self.seed = (
            state["epoch"], state["buffer"], state["offset"], state["seed"])


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """How data fingerprinted as `new` differs from data fingerprinted as `old` (from
    ActivationSource.fingerprint), one short phrase per difference; [] when they agree."""
    if old == new:
        return []
    if old.get("kind") != new.get("kind"):
        return [f"the kind of source changed: {old.get('kind')} -> {new.get('kind')}"]
    if old.get("kind") != "shards":
        return [f"{key}: {old.get(key)} -> {new.get(key)}" if key != "sample" else "the sampled rows differ"
                for key in sorted(set(old) | set(new), key=lambda k: (k == "sample", k))
                if old.get(key) != new.get(key)]
    before = {s["file"]: s for s in old.get("shards", [])}
    after = {s["file"]: s for s in new.get("shards", [])}
    changes = []
    if set(before) - set(after):
        changes.append(f"shards gone: {', '.join(sorted(set(before) - set(after)))}")
    if set(after) - set(before):
        changes.append(f"shards added: {', '.join(sorted(set(after) - set(before)))}")
    for name in sorted(set(before) & set(after)):
        a, b = before[name], after[name]
        diff = [f"{k} {a.get(k)} -> {b.get(k)}" for k in ("shape", "dtype", "bytes") if a.get(k) != b.get(k)]
        if not diff and a.get("sample") != b.get("sample"):
            diff = ["its rows differ"]
        if diff:
            changes.append(f"{name}: {', '.join(diff)}")
    if old.get("manifest") != new.get("manifest"):
        changes.append(f"{MANIFEST_NAME} changed")
    if not changes:  # the same shards in another order
        changes.append("the shards are listed in another order")
    return changes


class PairedSource(ActivationSource):
    """Two aligned activation streams side by side, for transcoders: every batch is
    [B, d_in + d_out], each row an input beside its target (the trainer splits them).

    inputs / targets: tensors [N, d] with the same rows, shard directories (or files) whose
    shards pair up with the same row counts (e.g. two hook points harvested in one model pass),
    or any ActivationSources that yield the same rows in the same order. Tensors and shards are
    shuffled identically on both sides (the same seed, chunking and buffer), so rows stay paired.
    """

    def __init__(self, inputs, targets, batch_size: int, shuffle: bool = True, seed: int = 0, **shard_options):
        self.inputs = self._side(inputs, batch_size, shuffle, seed, shard_options, "inputs")
        self.targets = self._side(targets, batch_size, shuffle, seed, shard_options, "targets")
        a, b = self.inputs, self.targets
        if isinstance(a, TensorSource) and isinstance(b, TensorSource) and a.data.shape[0] != b.data.shape[0]:
            raise InputError(f"the inputs hold {a.data.shape[0]} rows but the targets {b.data.shape[0]}: "
                             "pair every input row with its target row")
        if isinstance(self.inputs, ShardSource) and isinstance(self.targets, ShardSource):
            rows_in = [(s.path.name, s.rows) for s in self.inputs.shards]
            rows_out = [(s.path.name, s.rows) for s in self.targets.shards]
            if [r for _, r in rows_in] != [r for _, r in rows_out]:
                raise InputError(
                    f"the input shards {rows_in} and the target shards {rows_out} do not pair up row for row: "
                    "harvest both hook points in the same pass, into shards of the same sizes"
                )
        self.widths = (self.inputs.d_in, self.targets.d_in)
        self.d_in = None if None in self.widths else sum(self.widths)

    @staticmethod
    def _side(data, batch_size, shuffle, seed, shard_options, which) -> ActivationSource:
        if isinstance(data, ActivationSource):
            return data
        if isinstance(data, (str, Path)):
            return ShardSource(data, batch_size, shuffle=shuffle, seed=seed, **shard_options)
        if isinstance(data, (torch.Tensor, np.ndarray)):
            return TensorSource(torch.as_tensor(data), batch_size, shuffle=shuffle, seed=seed)
        raise InputError(f"PairedSource {which}: pass a tensor, a shard directory or an ActivationSource, "
                         f"got {type(data).__name__}")

    def __iter__(self):
        for a, b in zip(self.inputs, self.targets):
            if a.shape[0] != b.shape[0]:
                raise InputError(f"an input batch has {a.shape[0]} rows but its target batch {b.shape[0]}: "
                                 "the two streams are not aligned")
            yield torch.cat([a, b.to(a.dtype)], -1)

    def state_dict(self):
        return {"inputs": self.inputs.state_dict(), "targets": self.targets.state_dict()}

    def load_state_dict(self, state):
        self.inputs.load_state_dict(state["inputs"])
        self.targets.load_state_dict(state["targets"])


def as_source(data, batch_size: int, shuffle: bool = True, seed: int = 0) -> ActivationSource:
    """Wrap a tensor, a shard directory/file or an iterable of batches as a source."""
    if isinstance(data, ActivationSource):
        return data
    if isinstance(data, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(data)
        return TensorSource(t, batch_size, shuffle=shuffle, seed=seed)
    if isinstance(data, (str, Path)):
        return ShardSource(data, batch_size, shuffle=shuffle, seed=seed)
    return IterableSource(data)
