"""Timing one callable: warm-up, repeats, median and spread.

CUDA: each sample is bracketed by CUDA events recorded on the current stream, and the
stream is synchronised before the first event (so earlier queued work is not billed to
fn) and after the last (so the whole of fn is). CPU: time.perf_counter around the call,
and time.process_time for the CPU time it used.

A sample shorter than `min_sample_s` (a tiny op) runs fn `number` times in a row and
reports the mean per call, so the clock's resolution and the launch of one event pair do
not dominate. A `setup` (work needed before each call but not part of it, e.g. the forward
pass whose graph a backward consumes) runs untimed before every single call.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class Timing:
    """Per-call times in milliseconds over `repeats` samples (each the mean of `number` calls)."""

    median_ms: float
    min_ms: float
    max_ms: float
    iqr_ms: float  # interquartile range: the spread that one slow outlier does not move
    repeats: int
    number: int
    samples_ms: list[float]
    # CPU: median CPU seconds (all threads) per call; less swayed than wall time by other jobs
    # on shared cores, and about threads x wall time when the op parallelises. None on CUDA.
    cpu_median_ms: float | None = None

    @property
    def spread_pct(self) -> float:
        """IQR as a percentage of the median."""
        return 100.0 * self.iqr_ms / self.median_ms if self.median_ms > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spread_pct": self.spread_pct}


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _sample_s(fn, setup, number: int, device: torch.device) -> tuple[float, float | None]:
    """(wall seconds, CPU seconds of all this process's threads or None on CUDA) for `number`
    calls of fn; setup, when given, is outside both clocks."""
    if device.type == "cuda":
        total = 0.0
        state = None
        for _ in range(number):
            if setup is not None:
                state = setup()
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(state) if setup is not None else fn()
            end.record()
            torch.cuda.synchronize(device)
            total += start.elapsed_time(end) / 1e3
        return total, None
    if setup is None:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(number):
            fn()
        return time.perf_counter() - t0, time.process_time() - c0
    wall = cpu = 0.0
    for _ in range(number):
        state = setup()
        t0, c0 = time.perf_counter(), time.process_time()
        fn(state)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
    return wall, cpu


def _quantile(sorted_xs: list[float], q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def measure(
    fn: Callable,
    device: torch.device | str = "cpu",
    *,
    warmup: int = 3,
    repeats: int = 10,
    setup: Callable[[], Any] | None = None,
    min_sample_s: float | None = None,
) -> Timing:
    """Time fn() (or fn(setup()) when setup is given) on `device`.

    warmup calls run first and are discarded (lazy allocation, autotuning, caches); at least
    one runs, to choose how many calls make a sample.
    min_sample_s: None picks 1 ms on CUDA and 5 ms on CPU; 0 disables batching of calls.
    """
    device = torch.device(device)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    one = 0.0
    for _ in range(max(1, warmup)):  # the last warm-up call (or one untimed call) calibrates `number`
        one = _sample_s(fn, setup, 1, device)[0]
    if min_sample_s is None:
        min_sample_s = 1e-3 if device.type == "cuda" else 5e-3
    number = 1 if one <= 0 or one >= min_sample_s else min(1000, math.ceil(min_sample_s / one))
    pairs = [_sample_s(fn, setup, number, device) for _ in range(repeats)]
    samples = [w / number * 1e3 for w, _ in pairs]
    cpu = None if pairs[0][1] is None else statistics.median(c / number * 1e3 for _, c in pairs)
    xs = sorted(samples)
    return Timing(
        median_ms=statistics.median(xs),
        min_ms=xs[0],
        max_ms=xs[-1],
        iqr_ms=_quantile(xs, 0.75) - _quantile(xs, 0.25),
        repeats=repeats,
        number=number,
        samples_ms=samples,
        cpu_median_ms=cpu,
    )


def tflops(flops: float, ms: float) -> float:
    """Achieved TFLOP/s of `flops` floating-point operations done in `ms` milliseconds."""
    return flops / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")


def cpu_ms(fn: Callable[[], Any], number: int) -> float:
    """CPU milliseconds of this process per call of fn, over `number` calls in a row: the
    interleaved profiles' clock, steadier than wall time when other jobs share the cores."""
    t = time.process_time()
    for _ in range(number):
        fn()
    return (time.process_time() - t) / number * 1e3
