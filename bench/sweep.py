"""Running the measurements: every implementation on every width, each in a fresh process,
and the scaling plots (step time and peak memory against d_sae).

The table's width gets every op; the other widths only the training step (and the floor
GEMM), which is what the plots show. An implementation that
fails at a width (out of memory, timeout, error) is marked there and not tried wider; on
CPU a width whose rough memory estimate exceeds the free RAM is not started at all (an OOM
kill would take down a shared machine) and is marked "skipped" with the estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from . import peers
from .memory import run_isolated
from .worker import run_case

FAILED = ("oom", "error", "timeout", "killed", "skipped")


@dataclass
class Plan:
    impls: list[str]
    d_in: int
    k: int
    batch: int
    widths: list[int]          # d_sae values of the sweep
    table_width: int           # the d_sae where every op is timed (the results table)
    device: str
    dtype: str
    warmup: int
    repeats: int
    sweep_repeats: int
    timeout_s: float
    peak_mm_n: int
    tf32: bool = False
    threads: int | None = None  # torch CPU threads in each measurement (None: torch's default)
    unavailable: dict[str, str] = field(default_factory=dict)  # impl -> why it cannot run here

    def shape(self, d_sae: int) -> peers.Shape:
        return peers.Shape(self.d_in, d_sae, self.k, self.batch)


def widths(min_log2: int, max_log2: int) -> list[int]:
    if min_log2 > max_log2:
        raise ValueError(f"the smallest width 2^{min_log2} is above the widest 2^{max_log2}")
    return [2**e for e in range(min_log2, max_log2 + 1)]


def estimated_bytes(s: peers.Shape, dtype_bytes: int) -> int:
    """A deliberately generous estimate for any implementation: parameters, gradients and two
    Adam moments, plus four dense [B, d_sae] temporaries (what the dense peers keep)."""
    params = 2 * s.d_in * s.d_sae + s.d_sae + s.d_in
    return dtype_bytes * (4 * params + 4 * s.batch * s.d_sae)


def _available_ram() -> int | None:
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return None


def run_plan(plan: Plan, progress: bool = True) -> list[dict[str, Any]]:
    """One record per (impl, width): impl, d_sae, status, and result (ok) or error (else).
    The table's width runs first; then the sweep, narrowest first. An implementation that
    failed at some width is not tried at any wider one."""
    records: list[dict[str, Any]] = []
    runnable = [n for n in plan.impls if n not in plan.unavailable]
    failed_at: dict[str, int] = {}  # impl -> narrowest width where it failed
    dtype_bytes = torch.finfo(getattr(torch, plan.dtype)).bits // 8
    order = [plan.table_width] + [w for w in plan.widths if w != plan.table_width]
    cases = [(w, n) for w in order for n in runnable]
    bar = tqdm(cases, desc="bench", unit="run", disable=not progress)
    for d_sae, impl in bar:
        if d_sae > failed_at.get(impl, d_sae):
            continue
        bar.set_postfix_str(f"{impl} d_sae={d_sae}")
        shape = plan.shape(d_sae)
        rec: dict[str, Any] = {"impl": impl, "d_sae": d_sae}
        table = d_sae == plan.table_width
        free = _available_ram() if plan.device == "cpu" else None
        need = estimated_bytes(shape, dtype_bytes)
        if free is not None and need > 0.8 * free:
            rec.update(status="skipped", error=f"estimated {need / 2**30:.1f} GiB > 80% of the "
                                                f"{free / 2**30:.1f} GiB available")
        else:
            spec = {"impl": impl, "shape": shape.to_dict(), "device": plan.device, "dtype": plan.dtype,
                    # off the table, the memory phase's two steps (one GEMM) are the warm-up
                    "ops": None if table else ["step", "gemm"], "warmup": plan.warmup if table else 0,
                    "repeats": plan.repeats if table else plan.sweep_repeats, "tf32": plan.tf32,
                    "threads": plan.threads,
                    "peak_mm_n": plan.peak_mm_n if (table and impl == peers.FLOOR) else 0}
            status, payload = run_isolated(run_case, spec, plan.timeout_s)
            rec["status"] = status
            rec["result" if status == "ok" else "error"] = payload
        if rec["status"] in FAILED:
            failed_at[impl] = min(d_sae, failed_at.get(impl, d_sae))
            tqdm.write(f"{impl} at d_sae={d_sae}: {rec['status']}: {str(rec['error']).splitlines()[0]}")
        records.append(rec)
    return sorted(records, key=lambda r: (r["d_sae"], runnable.index(r["impl"])))


# ------------------------------------------------------------------ views of the records
def step_ms(rec: dict[str, Any]) -> float | None:
    """The record's training-step time (the GEMM's for the floor), or None."""
    if rec.get("status") != "ok":
        return None
    t = rec["result"]["timings"]
    op = "gemm" if rec["impl"] == peers.FLOOR else "step"
    return t[op]["median_ms"] if op in t else None


def peak_bytes(rec: dict[str, Any]) -> int | None:
    if rec.get("status") != "ok":
        return None
    r = rec["result"]
    return r.get("peak_gemm_bytes") if rec["impl"] == peers.FLOOR else r.get("peak_step_bytes")


def plot(records: list[dict[str, Any]], title: str, time_path, memory_path) -> None:
    """Two log-log PNGs against d_sae: step time, and peak step memory. A failure is an
    'x' at the top of the axes at the width where it happened, labelled with its status."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = list(dict.fromkeys(r["impl"] for r in records))
    for path, value, ylabel, scale in ((time_path, step_ms, "time per training step (ms)", 1.0),
                                       (memory_path, peak_bytes, "peak memory of a step (MiB)", 2**-20)):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for i, impl in enumerate(impls):
            mine = sorted((r for r in records if r["impl"] == impl), key=lambda r: r["d_sae"])
            pts = [(r["d_sae"], value(r) * scale) for r in mine if value(r) is not None]
            style = dict(color=f"C{i}", marker="o", linestyle="--" if impl == peers.FLOOR else "-")
            label = "floor: x @ W_enc alone" if impl == peers.FLOOR else impl
            if pts:
                ax.plot(*zip(*pts), label=label, **style)
            for j, r in enumerate(r for r in mine if r.get("status") in FAILED):
                ax.plot([r["d_sae"]], [0.97], transform=ax.get_xaxis_transform(), marker="x",
                        markersize=10, color=f"C{i}", linestyle="none", clip_on=False,
                        label=None if pts or j else label)
                ax.annotate(r["status"], (r["d_sae"], 0.97), xycoords=ax.get_xaxis_transform(),
                            textcoords="offset points", xytext=(5, -4 - 9 * i), fontsize=7, color=f"C{i}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("d_sae (latents)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
