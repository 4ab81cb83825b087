"""Keep the memory a training step frees in the process, instead of faulting it back each step.

A step allocates and frees the same few-MB tensors every time (the error rows, the gradient
rows, the selection's buffers). glibc's malloc hands freed memory at the top of its heap back
to the OS once more than M_TRIM_THRESHOLD lies free there, and serves blocks above
M_MMAP_THRESHOLD with fresh mappings. It adapts both thresholds to the sizes it sees, but a
loop that also fetches batches and logs keeps falling back into returning memory, which then
comes back as page faults the kernel zeroes: in Trainer.fit(), about 3,400 a step at d_in=384,
d_sae=4096, batch 1024 (8.5 ms, a fifth of the encoder GEMM) and 9,100 at d_in=256,
d_sae=16384, batch 2048 (23 ms). A plain drop-in loop can fall into it too (1,766 a step at
384/4096 in one run, none in others: it depends on the process's history).

keep_freed_memory() fixes the two thresholds (blocks up to 32 MiB from the heap, up to 1 GiB
kept free at its top), which ends those faults. The Trainer calls it; a drop-in loop can too.
It changes the whole process's allocator and cannot be undone (the process then keeps its
peak heap), so FASTSAE_KEEP_FREED_MEMORY=0 turns it off. Elsewhere than glibc (macOS,
Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1 << 30

_applied: bool | None = None  # the first call's outcome: later calls repeat it


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    # glibc only: musl has a mallopt that does nothing
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory (see the module's docstring). Returns True
    where it is in effect, False where it is not (turned off by FASTSAE_KEEP_FREED_MEMORY=0,
    or not glibc). Only the first call acts."""
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get("FASTSAE_KEEP_FREED_MEMORY", "1").strip() == "0":
        _applied = False
        return False
    libc = _glibc()
    if libc is None:
        _applied = False
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mmap_set = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    trim_set = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _applied = mmap_set and trim_set
    return _applied
