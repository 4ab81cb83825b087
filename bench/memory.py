"""Peak memory, and running each measurement in a fresh process so peaks never leak.

Peak of what: the bytes an implementation adds on top of the process as it was before it
was built (interpreter, libraries, input batch): its parameters, gradients, optimizer state
and the temporaries of the measured work.
  * CUDA: the caching allocator's peak (torch.cuda.max_memory_allocated) minus what was
    allocated at the baseline. Exact for tensors; excludes the CUDA context and allocator slack.
  * CPU: the peak resident set size (VmHWM) minus the resident size at the baseline. On Linux
    the high-water mark is reset to the current RSS by writing "5" to /proc/self/clear_refs;
    elsewhere it falls back to getrusage's lifetime peak (then only the first phase measured
    in a process is exact).

Isolation: `run_isolated` runs a function in a fresh child process of a multiprocessing
"forkserver". The server is a clean interpreter that only imported the (slow to import)
libraries, never ran a benchmark, and forks one child per implementation+shape: every child
starts from the same state, so a wide dictionary's allocator caches cannot inflate (or a
previous run's freed memory hide) the next peak, and a child the kernel kills for memory
takes nobody else with it. CUDA is never initialised in the server (forking a CUDA context
is not allowed); each child initialises its own.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import resource
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


# ------------------------------------------------------------------ CPU resident memory
def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def _lifetime_peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS; False where the OS cannot (lifetime peak then)."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else _lifetime_peak_rss_bytes()


# ------------------------------------------------------------------ one measured phase
class PeakMemory:
    """Peak bytes added by the code run between `start()` and `stop()` on `device`.

        pm = PeakMemory(device); pm.start(); work(); added = pm.stop()
    `baseline` is taken at construction (call it before building the implementation), so
    every later phase is reported relative to the same empty process.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            self.baseline = current_rss_bytes()
        self.exact = True

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.exact = reset_peak_rss()

    def stop(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = peak_rss_bytes()
        return max(0, peak - self.baseline)

    @property
    def kind(self) -> str:
        return "cuda_allocator_peak" if self.cuda else "peak_rss"


# ------------------------------------------------------------------ fresh process per run
_context = None

# Safe to import in a forkserver that will fork CUDA children: none of these initialises CUDA.
# torch._dynamo is here because torch.optim imports it lazily: seconds in every child otherwise.
# Not sparsify: its import initialises CUDA (its forward's autocast decorator calls
# torch.cuda.is_bf16_supported()), so on CUDA each child imports it itself.
CUDA_SAFE_PRELOAD = ["torch", "torch._dynamo", "fastsae", "fastsae.trainer", "bench.worker"]


def start_server(preload: list[str], env: dict[str, str] | None = None, method: str = "forkserver") -> None:
    """Choose how children start. "forkserver": a server that imported `preload` once
    (ImportErrors there are ignored: a child that needs a missing library reports it itself);
    "spawn": a new interpreter per child (slower: every child imports everything). `env` is set
    in this process first, so the server and every child inherit it."""
    global _context
    if env:
        os.environ.update(env)
    # torch.cuda.is_available() through NVML does not initialise CUDA, so a preloaded module
    # that merely asks cannot spoil the server for CUDA children.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(preload)
    _context = ctx


def _child(conn, fn: Callable, arg: Any) -> None:
    # Objects inherited from the server go to the permanent generation: a gc pass would
    # otherwise write to every one of them, copying the server's whole heap into this child
    # (seconds, and resident memory that is not the implementation's).
    gc.freeze()
    try:
        if torch.cuda._is_in_bad_fork():
            raise RuntimeError("CUDA was initialised in the process this child was forked from "
                               "(a preloaded module did it); rerun with --isolation spawn")
        conn.send(("ok", fn(arg)))
    except BaseException as e:  # report every failure to the parent, OOM included
        oom = isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()
        conn.send(("oom" if oom else "error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))
    finally:
        conn.close()


def run_isolated(fn: Callable, arg: Any, timeout_s: float) -> tuple[str, Any]:
    """fn(arg) in a fresh child process. Returns (status, payload): ("ok", result), or
    ("oom" | "error" | "timeout" | "killed", message). A child that dies without a word from
    SIGKILL counts as "oom" (what the kernel's OOM killer sends); any other silent death is
    "killed"."""
    ctx = _context or mp.get_context("forkserver")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, arg), daemon=True)
    proc.start()
    send.close()
    status: str | None = None
    payload: Any = None
    try:
        if recv.poll(timeout_s):
            try:
                status, payload = recv.recv()
            except EOFError:
                pass
        else:
            status, payload = "timeout", f"no result within {timeout_s:.0f} s (raise --timeout)"
    finally:
        if status == "timeout":
            proc.kill()
        proc.join(30)
        recv.close()
    if status is None:
        code = proc.exitcode
        why = "killed by SIGKILL (the kernel's OOM killer?)" if code == -9 else f"exited with code {code}"
        status, payload = ("oom" if code == -9 else "killed"), f"the process {why} before reporting"
    return status, payload
