"""A training run's directory and its checkpoints.

    <out_dir>/train_config.json    the TrainConfig (and the layout, for a distributed run)
    <out_dir>/log.jsonl            one JSON line per logged step
    <out_dir>/curves.png           the training curves, at the end
    <out_dir>/checkpoints/step_XXXXXXXX/   the SAE (or a sharded SAE) + trainer_state.pt
                                   (one trainer_state.rankR.pt per rank when distributed)
    <out_dir>/checkpoints/LATEST   the name of the newest published checkpoint
    <out_dir>/final/               the trained SAE (single-process format)
    <out_dir>/final_sharded/       a distributed run's sharded SAE

A checkpoint is built in checkpoints/.tmp-step_N, then renamed once every rank has written its
part and LATEST is rewritten: a write that fails or is killed leaves the previous checkpoint
and LATEST as they were (and the leftovers are removed by the next save).

One process (rank 0) at a time holds <out_dir>/.lock while it trains: a second process
pointed at the same folder is refused instead of interleaving the log and clobbering final/.
A fresh run does not start in a folder that already holds a run unless told to overwrite it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from .atomic import atomic_write, atomic_write_text, fsync_dir
from .checkpoint import save_sae
from .errors import CheckpointError, ConfigError, FastSAEError
from .parallel import ParallelContext
from .sae import BaseSAE, load_sae
from .tracking import read_log

CONFIG_NAME = "train_config.json"
LOG_NAME = "log.jsonl"
STATE_NAME = "trainer_state.pt"
STATE_PATTERN = "trainer_state.rank{rank}.pt"
LATEST_NAME = "LATEST"
LOCK_NAME = ".lock"
CONSOLIDATE_MAX_BYTES = 1 << 30  # a sharded SAE up to this size is also written as one final/


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def state_file_name(context: ParallelContext) -> str:
    """trainer_state.pt on one process; one trainer_state.rankR.pt per rank otherwise."""
    return STATE_NAME if context.world_size == 1 else STATE_PATTERN.format(rank=context.rank)


def _is_sharded(ckpt: Path) -> bool:
    return (ckpt / "manifest.json").is_file()


def is_complete(ckpt: Path) -> bool:
    """Weights (single-process or sharded) and at least one trainer state."""
    weights = all((ckpt / n).is_file() for n in ("cfg.json", "sae_weights.safetensors")) or _is_sharded(ckpt)
    return weights and any(ckpt.glob("trainer_state*.pt"))


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    d = Path(out_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith("step_") and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint LATEST names, or (if that is missing or incomplete) the newest complete one."""
    d = Path(out_dir) / "checkpoints"
    latest = d / LATEST_NAME
    if latest.is_file():
        cand = d / latest.read_text(encoding="utf-8").strip()
        if cand.is_dir() and is_complete(cand):
            return cand
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


class RunDir:
    """The files of one run in `out_dir`, written by `context`'s ranks (rank 0 writes the
    shared files; every rank writes its own part of a checkpoint)."""

    def __init__(self, out_dir: str | Path, context: ParallelContext):
        self.path = Path(out_dir)
        self.context = context
        self.log_path = self.path / LOG_NAME
        self.config_path = self.path / CONFIG_NAME
        self.checkpoints = self.path / "checkpoints"
        self._lock = None

    # ------------------------------------------------------------ one process at a time
    def lock(self) -> None:
        """Hold <out_dir>/.lock (rank 0) until unlock() or the process ends."""
        if not self.context.is_main or self._lock is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 (held open on purpose)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ConfigError(f"{self.path} is in use by {holder}, which is training into it: wait for it to "
                              "finish, or pick another out_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()}\n")
        f.flush()
        self._lock = f

    def unlock(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    # ------------------------------------------------------------ the run's config and log
    def existing_run(self) -> list[str]:
        """What of an earlier run the folder holds (empty: nothing)."""
        found = [n for n in (CONFIG_NAME, LOG_NAME, "final", "final_sharded") if (self.path / n).exists()]
        ckpts = list_checkpoints(self.path)
        if ckpts:
            found.append(f"{len(ckpts)} checkpoint(s)")
        return found

    def start(self, config: dict, overwrite: bool = False) -> None:
        """A fresh run (rank 0): refuse a folder holding another run unless `overwrite`, in which
        case that run's files are removed; then write the config."""
        if not self.context.is_main:
            return
        found = self.existing_run()
        if found and not overwrite:
            raise ConfigError(f"{self.path} already holds a run ({', '.join(found)}): resume it (--resume / "
                              "Trainer.resume), pick another out_dir, or set overwrite=True (--overwrite) to "
                              "replace it")
        self.path.mkdir(parents=True, exist_ok=True)
        for name in ("final", "final_sharded", "checkpoints"):
            shutil.rmtree(self.path / name, ignore_errors=True)
        for name in (LOG_NAME, "curves.png"):
            (self.path / name).unlink(missing_ok=True)
        atomic_write_text(self.config_path, json.dumps(config, indent=2) + "\n")

    def record_resume(self, config: dict, step: int, changed: dict) -> None:
        """Rewrite the config with what a resume changed, and append the change to its history."""
        if not self.context.is_main:
            return
        previous = self.read_config().get("resumes", [])
        config = {**config, "resumes": previous + ([{"step": step, "changed": changed}] if changed else [])}
        atomic_write_text(self.config_path, json.dumps(config, indent=2) + "\n")

    def read_config(self) -> dict:
        if not self.config_path.is_file():
            raise CheckpointError(f"{self.path} is not a training run: it has no {CONFIG_NAME}")
        try:
            return json.loads(self.config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.config_path} is not valid JSON ({e}); the file is corrupt") from e

    def trim_log(self, step: int) -> list[dict]:
        """Drop log lines written after `step` (rank 0), so a resumed run's log reads as one run."""
        kept = [r for r in read_log(self.log_path) if r["step"] <= step]
        if self.context.is_main:
            atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, sae: BaseSAE, state: dict, keep: int) -> Path:
        """Write checkpoints/step_N (every rank calls it), point LATEST at it and keep the
        newest `keep` checkpoints."""
        ctx = self.context
        name = step_dir_name(step)
        final, tmp = self.checkpoints / name, self.checkpoints / f".tmp-{name}"
        try:
            if ctx.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            ctx.barrier("barrier before writing a checkpoint")
            if sae.sharded:
                sae.save_pretrained(tmp)  # collective: each shard writes its file
            elif ctx.is_main:  # replicas hold identical copies: one writes
                save_sae(sae, tmp)
            atomic_write(tmp / state_file_name(ctx), lambda p: torch.save(state, p))
            ctx.barrier("barrier after writing the trainer states")
            if ctx.is_main:
                if final.exists():  # re-saving the same step: move the old one aside first
                    trash = self.checkpoints / f".old-{name}"
                    os.replace(final, trash)
                    shutil.rmtree(trash, ignore_errors=True)
                os.replace(tmp, final)
                fsync_dir(self.checkpoints)
                atomic_write_text(self.checkpoints / LATEST_NAME, name + "\n")
        except Exception as e:
            if isinstance(e, FastSAEError) and not isinstance(e, CheckpointError):
                raise  # a failed collective: the job cannot continue, and says so itself
            if ctx.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            prev = latest_checkpoint(self.path)
            raise CheckpointError(
                f"writing checkpoint {final} failed ({type(e).__name__}: {e}); "
                + (f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists")
                + ": free disk space or fix permissions, then resume"
            ) from e
        ctx.barrier("barrier after publishing a checkpoint")
        if ctx.is_main:
            for old in list_checkpoints(self.path)[:-keep]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
            self._remove_leftovers(keep_newest=final)
        return final

    def _remove_leftovers(self, keep_newest: Path) -> None:
        """Temporary and incomplete checkpoint folders a killed save or prune left behind (the lock
        guarantees no other process is writing here)."""
        for p in self.checkpoints.iterdir():
            stale = p.name.startswith((".tmp-", ".old-")) or (
                p.is_dir() and p.name.startswith("step_") and p != keep_newest and not is_complete(p))
            if stale:
                shutil.rmtree(p, ignore_errors=True)

    def read_state(self, ckpt: Path) -> dict:
        """This rank's trainer state in `ckpt` (another layout's, if this one's is missing, so
        the caller can say which layout the checkpoint needs)."""
        path = ckpt / state_file_name(self.context)
        if not path.is_file():
            written = sorted(ckpt.glob("trainer_state*.pt"))
            if not written:
                raise CheckpointError(f"{path} is missing: {ckpt} holds no trainer state; resume from an earlier one")
            path = written[0]
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path} is unreadable ({e}); resume from an earlier checkpoint") from e

    def newest_readable(self, requested: Path | None = None) -> tuple[Path, dict, BaseSAE]:
        """(checkpoint, this rank's trainer state, SAE) of `requested`, or of the newest
        checkpoint that reads back whole: a corrupt newest one is passed over with a warning."""
        if requested is not None:
            ckpt = Path(requested)
            if not ckpt.is_dir() or not is_complete(ckpt):
                raise CheckpointError(f"{ckpt} is not a complete checkpoint of this run: pick one of "
                                      f"{[p.name for p in list_checkpoints(self.path)] or 'none'}")
            return ckpt, self.read_state(ckpt), self.load_sae(ckpt)
        newest = latest_checkpoint(self.path)
        # every rank must resume from the same checkpoint: only a single process passes over a bad one
        candidates = list_checkpoints(self.path) if self.context.world_size == 1 else [newest] if newest else []
        if newest is not None and newest in candidates:  # LATEST first, then the others newest first
            candidates.remove(newest)
            candidates.append(newest)
        if not candidates:
            raise CheckpointError(f"no complete checkpoint to resume from in {self.checkpoints}")
        errors = []
        for ckpt in reversed(candidates):
            try:
                found = ckpt, self.read_state(ckpt), self.load_sae(ckpt)
            except CheckpointError as e:
                errors.append(f"{ckpt.name}: {e}")
                continue
            if errors:
                warnings.warn(f"resuming from {ckpt.name}, the newest checkpoint that reads back: "
                              + "; ".join(errors), stacklevel=3)
            return found
        raise CheckpointError(f"no checkpoint in {self.checkpoints} reads back: " + "; ".join(errors))

    def load_sae(self, ckpt: Path) -> BaseSAE:
        """The SAE in `ckpt`, as this rank's slice when the run is sharded."""
        if _is_sharded(ckpt):
            from .distributed.checkpoint import load_sharded

            return load_sharded(ckpt, self.context)
        return load_sae(ckpt)

    # ------------------------------------------------------------ the trained SAE
    def save_final(self, sae: BaseSAE, consolidate_max_bytes: int = CONSOLIDATE_MAX_BYTES):
        """(final/: the single-process format every loader and converter reads, final_sharded/
        for a sharded SAE). A sharded SAE is consolidated into final/ only while it is under
        consolidate_max_bytes; beyond that, load final_sharded/ with fastsae.load."""
        ctx = self.context
        final = self.path / "final"
        if not sae.sharded:
            if ctx.is_main:
                save_sae(sae, final)
            ctx.barrier("barrier after writing the final SAE")
            return final, None
        from .distributed.checkpoint import consolidate

        sharded = self.path / "final_sharded"
        sae.save_pretrained(sharded)
        size = sae.d_sae * (2 * sae.d_in + 1) * sae.W_enc.element_size()
        if size > consolidate_max_bytes:
            if ctx.is_main:
                print(f"fastsae: the SAE is {size / 2**30:.1f} GiB, so final/ was not consolidated into one "
                      f"file; load {sharded} with fastsae.load")
            return None, sharded
        if ctx.is_main:
            consolidate(sharded, final)
        ctx.barrier("barrier after consolidating the final SAE")
        return final, sharded


__all__ = ["RunDir", "list_checkpoints", "latest_checkpoint", "is_complete", "state_file_name", "step_dir_name"]
