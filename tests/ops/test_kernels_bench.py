"""The bench scripts run: encoder_gpu.py --quick (CPU, interpreter) and the sm_90 compile check."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO


def test_encoder_bench_quick_mode_runs_and_agrees():
    path = REPO / "bench" / "encoder_gpu.py"
    spec = importlib.util.spec_from_file_location("encoder_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    text = bench.main(["--quick", "--dtype", "float32"])
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        fused, chunked = (float(a) for a in cells[-1].split("/"))
        assert fused == 1.0 and chunked == 1.0  # fp32: both strategies' index sets equal the fp32 top-k
        if not torch.cuda.is_available():
            assert cells[6] == "-"  # no peak-memory numbers off CUDA, rather than made-up ones


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter skips Triton's compiler; this compiles each kernel's lightest and heaviest
    variant for sm_90 (Triton's bundled ptxas) as a launch specialises them, bf16 at odd sizes
    (make test-triton36 does bf16 at aligned sizes), so a CPU-only CI catches GPU-only breakage."""
    script = REPO / "bench" / "kernels_sm90_compile.py"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--dtype", "bfloat16", "--shape", "odd"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAIL" not in proc.stdout
    assert "compiles passed for sm_90" in proc.stdout
