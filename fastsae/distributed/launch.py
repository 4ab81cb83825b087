"""Run a function on N local processes joined in a torch.distributed group (gloo by default):
for tests, CPU experiments and single-node jobs without torchrun.

    results = launch(fn, world_size=2, args=(...,))   # fn(*args) on every rank
    [r.value for r in results]                         # what each rank returned

No port can collide: the parent hosts the rendezvous TCPStore on a port the OS picks and the
children connect to it. Collectives time out after `collective_timeout_s`, so a rank that
dies or stalls turns into a DistributedError on the others; the launcher itself waits at
most `timeout_s` in all and kills (only) its own children that are still running then, or
`grace_s` after another rank failed. Processes are forked from a server that has already
imported torch, so a launch costs milliseconds, not an interpreter start per rank.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .collectives import DistributedError
from .groups import TIMEOUT_ENV


@dataclass
class RankResult:
    rank: int
    exitcode: int | None  # None: still running when the launcher killed it
    value: Any = None  # what fn returned (exit code 0 only)
    error: str | None = None  # the exception's message, as the rank reported it
    traceback: str | None = None
    killed: bool = False  # the launcher killed it (timeout, or grace after another rank failed)

    @property
    def ok(self) -> bool:
        return self.exitcode == 0 and self.error is None


def _context():
    methods = mp.get_all_start_methods()
    if "forkserver" in methods:
        ctx = mp.get_context("forkserver")
        # what would otherwise be imported in every rank, seconds each on a small box: the op
        # backends (triton above all) and torch._dynamo (the first torch.optim optimizer imports it)
        ctx.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "fastsae.distributed",
                                    "fastsae.ops.cpp", "fastsae.ops.triton"])
        return ctx
    return mp.get_context("spawn")


def _child(rank: int, world_size: int, port: int, backend: str, collective_timeout_s: float, threads: int,
           fn: Callable, args: tuple, result_dir: str) -> None:
    out = Path(result_dir)
    try:
        torch.set_num_threads(threads)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.environ[TIMEOUT_ENV] = str(collective_timeout_s)
        timeout = datetime.timedelta(seconds=collective_timeout_s)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        value = fn(*args)
        torch.save(value, out / f"rank{rank}.pt")
    except BaseException as e:  # report, then leave at once: a broken group must not hang exit
        (out / f"rank{rank}.err").write_text(
            f"{type(e).__name__}: {e}\n" + "".join(traceback.format_exception(e)), encoding="utf-8")
        os._exit(1)
    try:
        dist.destroy_process_group()
    finally:
        os._exit(0)


def launch(fn: Callable, world_size: int, args: tuple = (), *, backend: str = "gloo",
           timeout_s: float = 120.0, collective_timeout_s: float = 30.0, grace_s: float | None = None,
           threads: int = 1) -> list[RankResult]:
    """fn(*args) on `world_size` processes with torch.distributed initialised; one RankResult
    per rank (never raises for a failing rank: use `run` for that). fn must be importable
    (a module-level function) and its result picklable."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    grace_s = collective_timeout_s + 10.0 if grace_s is None else grace_s
    ctx = _context()
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=collective_timeout_s))
    with tempfile.TemporaryDirectory(prefix="fastsae-launch-") as result_dir:
        procs = [ctx.Process(target=_child, name=f"fastsae-rank{r}", daemon=True,
                             args=(r, world_size, store.port, backend, collective_timeout_s, threads, fn, args,
                                   result_dir))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        first_failure = None
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if first_failure is None and any(p.exitcode not in (None, 0) for p in procs):
                first_failure = now
            if now > deadline or (first_failure is not None and now > first_failure + grace_s):
                break
            time.sleep(0.02)
        killed = set()
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                killed.add(r)
            p.join(5)
        results = []
        for r, p in enumerate(procs):
            res = RankResult(r, None if r in killed else p.exitcode, killed=r in killed)
            err, val = Path(result_dir) / f"rank{r}.err", Path(result_dir) / f"rank{r}.pt"
            if err.is_file():
                text = err.read_text(encoding="utf-8")
                res.error, _, res.traceback = text.partition("\n")
            elif val.is_file() and p.exitcode == 0:
                res.value = torch.load(val, weights_only=False)
            elif r in killed:
                waited = time.monotonic() - deadline + timeout_s
                res.error = f"killed by the launcher: still running after {waited:.0f} s"
            else:
                res.error = f"exited with code {p.exitcode} without reporting an error"
            results.append(res)
    del store
    return results


def run(fn: Callable, world_size: int, args: tuple = (), **kwargs) -> list[Any]:
    """As launch, but returns the values and raises DistributedError if any rank failed."""
    results = launch(fn, world_size, args, **kwargs)
    bad = [r for r in results if not r.ok]
    if bad:
        lines = "\n".join(f"  rank {r.rank} (exit {r.exitcode}): {r.error}" for r in bad)
        detail = next((r.traceback for r in bad if r.traceback), "")
        raise DistributedError(f"{len(bad)} of {world_size} ranks failed:\n{lines}\n{detail}")
    return [r.value for r in results]
