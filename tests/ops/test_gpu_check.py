"""bench/gpu_check.sh --tiny: the whole one-shot GPU check as a dry run on CPU (Triton
interpreter, toy sizes), so the script that gets a few precious GPU minutes never rots."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import REPO

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for CPU machines")


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_tiny_dry_run_writes_every_phase(tmp_path):
    out = tmp_path / "gpu"
    # fastsae's step only: each peer costs a fresh process; the peers' adapters are tested with the
    # bench suites, and the step phase's code is the same for every peer
    env = {**os.environ, "FASTSAE_GPU_CHECK_PEERS": "fastsae", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--tiny", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + log[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert {"summary.md", "results.json", "junit.xml", "gpu_check.log"} <= set(files)
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"env", "kernels", "encoder", "step", "widest"}
    counts = results["kernels"]["counts"]
    assert counts["failed"] == 0 and counts["passed"] >= 10, counts
    assert results["env"]["implementations"]["topk_encode"]["cuda"] == "triton"
    # bf16, as on the GPU: near-ties may swap within the rounding
    assert len(results["encoder"]) == 2 and all(r["agree_chunked"] >= 0.9 for r in results["encoder"])
    steps = {r["peer"]: r for r in results["step"]["rows"]}
    assert steps["fastsae"].get("tokens_per_s", 0) > 0, steps["fastsae"]
    assert results["widest"]["widest_d_sae"] == 64, results["widest"]
    summary = (out / "summary.md").read_text()
    for section in ("(b) kernels", "(c) TopK encoder", "(d) training step", "(e) widest", "## Run"):
        assert section in summary
