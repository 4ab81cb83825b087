"""bench/encoder_gpu.py runs end to end (its --quick mode; on CPU under the interpreter)."""

import importlib.util
from pathlib import Path

import torch


def test_encoder_bench_quick_mode_runs_and_agrees():
    path = Path(__file__).resolve().parents[1] / "bench" / "encoder_gpu.py"
    spec = importlib.util.spec_from_file_location("encoder_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    text = bench.main(["--quick", "--dtype", "float32"])
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[-1]) == 1.0  # fp32: the fused index sets equal the fp32 top-k
        if not torch.cuda.is_available():
            assert cells[6] == "-"  # no peak-memory numbers off CUDA, rather than made-up ones
