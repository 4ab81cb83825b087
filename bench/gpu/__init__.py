"""The one-shot GPU check (bench/gpu_check.sh): its phases and the files they write.

Every phase records into OUT_DIR/results.json (one key per phase) and appends its section to
OUT_DIR/summary.md as soon as it has something, so a phase killed by its timeout leaves what
it measured before. `--tiny` runs the same code on CPU at toy sizes (Triton interpreter).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def tiny() -> bool:
    """The dry run: toy sizes, CPU, TRITON_INTERPRET=1 (set by gpu_check.sh --tiny)."""
    return os.environ.get("FASTSAE_GPU_CHECK_TINY", "0") == "1"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"


def record(out_dir: str | Path, phase: str, data, section: str | None = None) -> None:
    """results.json[phase] = data (merged into the file, rewritten whole: a reader never sees
    half a file), and `section` appended to summary.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[phase] = data
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, path)
    if section:
        with open(out / "summary.md", "a") as f:
            f.write(section.rstrip() + "\n\n")


def md_table(rows: list[dict], cols: list[str]) -> str:
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else "" if v is None else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
