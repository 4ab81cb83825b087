"""Results: the machine, versions and commit they came from, a JSON file and a markdown
table under bench/results/, named <device-name>-<date>.

Table cells: median time per call, its spread (IQR / median) and the multiple of the floor
(the encoder GEMM `x @ W_enc` of the same shape, timed in the same way). On CUDA also the
achieved TFLOP/s (useful FLOPs, peers.op_flops) and that as a fraction of the measured
throughput of a large square torch.mm. "same x̂": the implementation's reconstruction of a
probe batch, from the shared weights, against the reference one (relative L2 error).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from . import peers
from .sweep import FAILED, peak_bytes, step_ms

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DISTRIBUTIONS = ("torch", "triton", "numpy", "fastsae", "sae-lens", "eai-sparsify")
REFERENCES = ("fastsae[reference]", "torch dense")  # whose x̂ the others are checked against
OP_COLUMNS = (("encode", "encode"), ("decode", "decode"), ("backward", "backward"), ("step", "step"),
              ("step_row_sparse_adam", "step, row-sparse Adam"))


# ------------------------------------------------------------------ where the numbers came from
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict[str, Any]:
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": p.name, "memory_bytes": p.total_memory,
                "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda,
                "slug": _slug(p.name)}
    name = _cpu_model()
    return {"type": "cpu", "name": name, "slug": "cpu-" + _slug(name)}


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu": _cpu_model(), "logical_cpus": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    try:
        import psutil

        info["ram_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = list(os.getloadavg())
    return info


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in DISTRIBUTIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


# ------------------------------------------------------------------ checks across implementations
def agreement(records: list[dict[str, Any]], width: int) -> dict[str, Any]:
    """Relative L2 error of every implementation's probe reconstruction against the first
    reference that ran; pops the probes out of the records (they are bulky)."""
    probes = {}
    for r in records:
        if r.get("status") == "ok":
            probe = r["result"].pop("probe_x_hat", None)
            if r["d_sae"] == width and probe is not None:
                probes[r["impl"]] = torch.tensor(probe, dtype=torch.float64)
    ref = next((n for n in REFERENCES if n in probes), None)
    if ref is None:
        return {"reference": None, "rel_err": {}}
    base = probes[ref]
    rel = {n: float((p - base).norm() / base.norm().clamp_min(1e-30)) for n, p in probes.items()}
    return {"reference": ref, "rel_err": rel}


def tolerance(dtype: str, device: str, impl: str) -> float:
    """fp32 implementations of the same math agree to rounding; bf16/fp16 (and sparsify's bf16
    autocast on CUDA) may flip near-tied top-k choices."""
    low = dtype != "float32" or (impl == peers.Sparsify.name and device.startswith("cuda"))
    return 5e-2 if low else 1e-3


# ------------------------------------------------------------------ JSON
def build(plan, records: list[dict[str, Any]], started: str, elapsed_s: float, notes: list[str],
          machine: dict[str, Any]) -> dict[str, Any]:
    """machine: machine_info() taken when the run started (its load average is the start's)."""
    from dataclasses import asdict

    machine = dict(machine)
    if hasattr(os, "getloadavg"):
        machine["load_average_at_end"] = list(os.getloadavg())
    return {
        "schema": 1,
        "started_utc": started,
        "elapsed_s": elapsed_s,
        "device": device_info(plan.device),
        "machine": machine,
        "versions": versions(),
        "git": git_info(),
        "plan": asdict(plan),
        "agreement": agreement(records, plan.table_width),
        "records": records,
        "notes": notes,
    }


def paths(report: dict[str, Any], out_dir: Path = RESULTS) -> dict[str, Path]:
    stem = f"{report['device']['slug']}-{report['started_utc'][:10]}"
    return {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md",
            "time_png": out_dir / f"{stem}-step-time.png", "memory_png": out_dir / f"{stem}-peak-memory.png"}


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n", encoding="utf-8")


# ------------------------------------------------------------------ markdown
def _mib(b: int | None) -> str:
    return "" if b is None else f"{b / 2**20:,.0f} MiB" if b >= 2**20 else f"{b / 2**10:,.0f} KiB"


def _ms(x: float) -> str:
    return f"{x:.3g} ms" if x < 100 else f"{x:,.0f} ms"


def _times(ratio: float) -> str:
    return f"{ratio:.0f}×" if ratio >= 10 else f"{ratio:.1f}×" if ratio >= 1 else f"{ratio:.2g}×"


def _failure(rec: dict[str, Any]) -> str:
    return f"**{rec['status']}**"


def _time_cell(t: dict[str, Any], op: str, shape: peers.Shape, floor_ms: float | None,
               peak_tflops: float | None, cuda: bool) -> str:
    ms = t["median_ms"]
    cell = f"{_ms(ms)} ±{t['spread_pct']:.0f}%"
    if floor_ms:
        cell += f" ({_times(ms / floor_ms)})"
    if cuda:
        tf = peers.op_flops(op, shape) / (ms * 1e-3) / 1e12
        cell += f" · {tf:.1f} TF/s"
        if peak_tflops:
            cell += f" · {100 * tf / peak_tflops:.0f}%"
    return cell


def markdown(report: dict[str, Any], image_names: dict[str, str] | None = None) -> str:
    plan = report["plan"]
    records = report["records"]
    dev, mach, ver, git = report["device"], report["machine"], report["versions"], report["git"]
    cuda = dev["type"] == "cuda"
    width = plan["table_width"]
    shape = peers.Shape(plan["d_in"], width, plan["k"], plan["batch"])
    at = {(r["impl"], r["d_sae"]): r for r in records}
    floor = at.get((peers.FLOOR, width))
    floor_ms = step_ms(floor) if floor else None
    peak = None
    if floor and floor.get("status") == "ok" and "peak_mm" in floor["result"]:
        peak = floor["result"]["peak_mm"]["tflops"]
    threads = next((r["result"]["threads"] for r in records if "threads" in r.get("result", {})),
                   mach["torch_threads"])
    load = mach.get("load_average_at_start")
    commit = (git.get("commit") or "unknown")[:10] + (" (uncommitted changes)" if git.get("dirty") else "")
    lines = [
        f"## fastsae vs peers on {dev['name']} ({report['started_utc'][:10]})",
        "",
        f"{mach['cpu']}, {mach['logical_cpus']} logical CPUs, {threads} torch threads"
        + (f", load average {load[0]:.1f} at start" if load else "")
        + f"; torch {ver['torch']}, fastsae {ver['fastsae']} at {commit}, SAELens {ver['sae-lens']}, "
        f"sparsify {ver['eai-sparsify']}; {plan['dtype']}"
        + (f", TF32 {'on' if plan['tf32'] else 'off'}" if cuda else "") + ".",
        "",
        f"Shape: d_in={shape.d_in}, d_sae={shape.d_sae}, k={shape.k}, batch={shape.batch}. "
        f"Median of {plan['repeats']} timed calls after {plan['warmup']} warm-up calls, ± the "
        "interquartile range as % of the median; (n×) = multiple of the encoder GEMM alone"
        + (f" ({_ms(floor_ms)})" if floor_ms else "") + "."
        + (f" TF/s counts useful FLOPs only (encoder GEMM 2·B·d·n, sparse decode 2·B·k·d, sparse "
           f"backward 8·B·k·d); % is of a square torch.mm's {peak:.1f} TF/s." if cuda and peak else ""),
        "Peak memory: what a training step adds to the process (parameters, gradients, optimizer "
        "state, temporaries): " + ("the CUDA allocator's peak." if cuda else "peak resident set size (RSS)."),
        "",
    ]
    head = ["implementation", *(label for _, label in OP_COLUMNS), "peak memory (step)", "same x̂"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    agree = report["agreement"]
    not_run = []
    for impl in plan["impls"]:
        if impl in plan["unavailable"]:
            not_run.append(f"- **{impl}** not run: {plan['unavailable'][impl]}")
            lines.append(f"| {impl} | " + " | ".join(["not run"] + [""] * (len(head) - 2)) + " |")
            continue
        rec = at.get((impl, width))
        if rec is None:
            narrower = [r for r in records if r["impl"] == impl and r["status"] in FAILED]
            if narrower:
                lines.append(f"| {impl} | not tried: **{narrower[0]['status']}** at d_sae={narrower[0]['d_sae']} |"
                             + " |" * (len(head) - 2))
            continue
        if rec["status"] != "ok":
            not_run.append(f"- **{impl}** failed at d_sae={width}: {rec['status']}: "
                           f"{str(rec.get('error', '')).splitlines()[0][:300]}")
            lines.append(f"| {impl} | " + " | ".join([_failure(rec)] + [""] * (len(head) - 2)) + " |")
            continue
        res = rec["result"]
        cells = []
        if impl == peers.FLOOR:
            t = res["timings"]["gemm"]
            cells.append(_time_cell(t, "gemm", shape, None, peak, cuda) + " (GEMM alone)")
            cells += [""] * (len(OP_COLUMNS) - 1)
            cells.append(_mib(res.get("peak_gemm_bytes")))
            cells.append("")
        else:
            for op, _ in OP_COLUMNS:
                t = res["timings"].get(op)
                cells.append(_time_cell(t, op, shape, floor_ms, peak, cuda) if t else "n/a")
            cells.append(_mib(res.get("peak_step_bytes")))
            err = agree["rel_err"].get(impl)
            if err is None:
                cells.append("")
            else:
                ok = err <= tolerance(plan["dtype"], plan["device"], impl)
                cells.append(("✓" if ok else "✗ differs") + f" {err:.0e}")
        lines.append(f"| {impl} | " + " | ".join(cells) + " |")
    lines.append("")
    if agree.get("reference"):
        lines.append(f"same x̂: relative L2 error of the reconstruction of {64} probe rows against "
                     f"{agree['reference']} (all built from the same weights).")
    if not cuda:
        lines += ["", *cpu_time_markdown(records, width)]
    how: dict[str, list[str]] = {}  # note -> the implementations it describes
    for n in plan["impls"]:
        how.setdefault(peers.adapter_class(n).notes, []).append(n)
    lines += ["", "How each implementation runs:", *(f"- {', '.join(ns)}: {note}" for note, ns in how.items()),
              "", *not_run]
    lines += ["", *sweep_markdown(report, image_names)]
    if report.get("notes"):
        lines += ["", "Notes:", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines).rstrip() + "\n"


def cpu_time_markdown(records: list[dict[str, Any]], width: int) -> list[str]:
    """CPU seconds (all threads) of a step: what other jobs on shared cores sway least."""
    rows = []
    floor_cpu = None
    for r in records:
        if r["d_sae"] != width or r.get("status") != "ok":
            continue
        op = "gemm" if r["impl"] == peers.FLOOR else "step"
        t = r["result"]["timings"].get(op) or {}
        if t.get("cpu_median_ms") is None:
            continue
        if r["impl"] == peers.FLOOR:
            floor_cpu = t["cpu_median_ms"]
        rows.append((r["impl"], op, t))
    if not rows:
        return []
    lines = ["CPU time of the same calls (process CPU seconds over all threads; less swayed by other "
             "jobs than wall time):", "", "| implementation | op | wall | CPU time | CPU × floor's |",
             "|---|---|---|---|---|"]
    for impl, op, t in rows:
        ratio = _times(t["cpu_median_ms"] / floor_cpu) if floor_cpu else ""
        lines.append(f"| {impl} | {op} | {_ms(t['median_ms'])} | {_ms(t['cpu_median_ms'])} | {ratio} |")
    return lines


def sweep_markdown(report: dict[str, Any], image_names: dict[str, str] | None) -> list[str]:
    plan, records = report["plan"], report["records"]
    if len(plan["widths"]) < 2:
        return []
    lines = [f"### Scaling with d_sae (d_in={plan['d_in']}, k={plan['k']}, batch={plan['batch']})", "",
             f"Training-step time (the GEMM's for the floor; median of {plan['sweep_repeats']} timed calls "
             "after the memory measurement's two steps) and peak step memory; the first failure of an "
             "implementation is marked and wider widths are not tried.", ""]
    head = ["implementation", *(f"{w:,}" for w in plan["widths"])]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    at = {(r["impl"], r["d_sae"]): r for r in records}
    for impl in plan["impls"]:
        if impl in plan["unavailable"]:
            continue
        cells = []
        for w in plan["widths"]:
            r = at.get((impl, w))
            if r is None:
                cells.append("")
            elif r["status"] in FAILED:
                cells.append(_failure(r))
            else:
                ms = step_ms(r)
                cells.append(("" if ms is None else _ms(ms)) + " · " + _mib(peak_bytes(r)))
        lines.append(f"| {impl} | " + " | ".join(cells) + " |")
    if image_names:
        lines += ["", f"![step time vs d_sae]({image_names['time_png']})",
                  f"![peak memory vs d_sae]({image_names['memory_png']})"]
    return lines
