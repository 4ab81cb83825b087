"""The benchmark CLI keeps working: `python -m bench` on a tiny shape, structure only.
Never asserts a time. Also the pieces whose failure would silently corrupt results: peak
memory, the fresh-process runner's failure statuses, and the marking of failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import memory, peers, report, sweep  # noqa: E402
from bench.timing import measure  # noqa: E402

IMPLS = ["torch.mm (floor)", "fastsae[cpp]", "fastsae[reference]", "torch dense"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--d-in", "16", "--k", "4",
           "--batch", "32", "--min-log2", "6", "--max-log2", "7", "--impl", "fastsae-cpp",
           "--impl", "fastsae-reference", "--impl", "torch-dense", "--impl", "fastsae-triton", "--warmup", "0",
           "--repeats", "2", "--sweep-repeats", "1", "--threads", "1", "--no-progress", "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_cli_writes_json_markdown_and_plots(cli_run):
    out, stdout = cli_run
    (js,) = out.glob("*.json")
    rep = json.loads(js.read_text())
    assert js.name.startswith(rep["device"]["slug"]) and rep["device"]["type"] == "cpu"
    assert rep["versions"]["torch"] and "commit" in rep["git"] and rep["machine"]["logical_cpus"] >= 1
    plan = rep["plan"]
    assert plan["widths"] == [64, 128] and plan["table_width"] == 64
    # the Triton backend is not timed on CPU, and the report says why instead of dropping it
    assert "interpreter" in plan["unavailable"]["fastsae[triton]"]
    ran = {(r["impl"], r["d_sae"]): r for r in rep["records"]}
    assert set(ran) == {(n, w) for n in IMPLS for w in (64, 128)}
    for (impl, width), r in ran.items():
        assert r["status"] == "ok", r.get("error")
        res = r["result"]
        want = {"gemm"} if impl == peers.FLOOR else (
            {"encode", "decode", "backward", "step"} if width == 64 else {"step"})
        assert want <= set(res["timings"])
        for t in res["timings"].values():
            assert t["repeats"] == (2 if width == 64 else 1) and t["min_ms"] <= t["median_ms"] <= t["max_ms"]
        assert res[("peak_gemm_bytes" if impl == peers.FLOOR else "peak_step_bytes")] >= 0
    # every implementation reconstructs the probe like the reference: they time the same SAE
    agree = rep["agreement"]
    assert agree["reference"] == "fastsae[reference]"
    assert set(agree["rel_err"]) == set(IMPLS[1:]) and max(agree["rel_err"].values()) < 1e-4
    md = (out / js.name.replace(".json", ".md")).read_text()
    assert md in stdout
    for name in IMPLS + ["fastsae[triton]"]:
        assert f"| {name} |" in md
    for png in ("-step-time.png", "-peak-memory.png"):
        assert (out / js.name.replace(".json", png)).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_rewrites_markdown_from_json(cli_run):
    from bench.__main__ import main

    out, _ = cli_run
    (js,) = out.glob("*.json")
    md = out / js.name.replace(".json", ".md")
    before = md.read_text()
    md.unlink()
    assert main(["--render", str(js)]) == 0
    assert md.read_text() == before


def test_failures_are_marked_where_they_happened(tmp_path):
    ok = {"timings": {"step": {"median_ms": 2.0, "spread_pct": 1.0}}, "peak_step_bytes": 2**20}
    records = [
        {"impl": peers.FLOOR, "d_sae": 64, "status": "ok",
         "result": {"timings": {"gemm": {"median_ms": 1.0, "spread_pct": 1.0}}, "peak_gemm_bytes": 10}},
        {"impl": "torch dense", "d_sae": 64, "status": "ok", "result": ok},
        {"impl": "torch dense", "d_sae": 128, "status": "oom", "error": "OutOfMemoryError: CUDA out of memory"},
    ]
    plan = sweep.Plan(impls=[peers.FLOOR, "torch dense"], d_in=8, k=2, batch=4, widths=[64, 128, 256],
                      table_width=64, device="cpu", dtype="float32", warmup=0, repeats=1, sweep_repeats=1,
                      timeout_s=1, peak_mm_n=0)
    rep = {"plan": plan.__dict__, "records": records, "device": {"type": "cpu", "name": "x"},
           "machine": {"cpu": "x", "logical_cpus": 1, "torch_threads": 1}, "versions": dict.fromkeys(
               report.DISTRIBUTIONS, "0"), "git": {"commit": None}, "started_utc": "2000-01-01T00:00:00Z",
           "agreement": {"reference": None, "rel_err": {}}}
    md = report.markdown(rep)
    row = next(line for line in md.splitlines() if line.startswith("| torch dense |") and "**oom**" in line)
    assert row.split(" | ")[2] == "**oom**"  # the 128 column of the sweep table; 256 was not tried
    assert sweep.step_ms(records[2]) is None and sweep.peak_bytes(records[2]) is None
    sweep.plot(records, "t", tmp_path / "a.png", tmp_path / "b.png")
    assert (tmp_path / "a.png").stat().st_size > 0


def test_peak_memory_sees_an_allocation():
    pm = memory.PeakMemory("cpu")
    pm.start()
    t = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del t
    assert pm.stop() >= 60 * 2**20


def test_measure_reports_the_spread_of_its_samples():
    t = measure(lambda: sum(range(100)), "cpu", warmup=1, repeats=4, min_sample_s=0)
    assert t.repeats == len(t.samples_ms) == 4 and t.number == 1
    assert t.min_ms <= t.median_ms <= t.max_ms and t.iqr_ms >= 0
    calls = []
    measure(lambda s: calls.append(s), "cpu", warmup=0, repeats=3, setup=lambda: "state", min_sample_s=0)
    assert calls == ["state"] * 4  # one calibrating warm-up call, then the repeats; setup feeds each


def _return(x):
    return x * 2


def _raise(_):
    raise ValueError("bad shape")


def _sleep(_):
    time.sleep(60)


def _die(_):
    os.kill(os.getpid(), signal.SIGKILL)


def test_run_isolated_reports_every_way_a_child_ends():
    memory.start_server(["torch"])
    assert memory.run_isolated(_return, 21, 120) == ("ok", 42)
    status, msg = memory.run_isolated(_raise, None, 120)
    assert status == "error" and "bad shape" in msg
    assert memory.run_isolated(_die, None, 120)[0] == "oom"  # SIGKILL: what the OOM killer sends
    assert memory.run_isolated(_sleep, None, 2)[0] == "timeout"


def test_distributed_step_bench_writes_its_table(tmp_path):
    """bench.distributed_step on a tiny shape: three layouts timed, one table row per width."""
    from bench import distributed_step

    out = tmp_path / "dist.md"
    assert distributed_step.main(["--d-in", "8", "--d-sae", "64", "--k", "2", "--batch", "16", "--warmup", "1",
                                  "--repeats", "1", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 64 |")]
    assert len(rows) == 1 and rows[0].count(" ms") == 3, out.read_text()


def test_cpu_step_preset_is_one_shape_with_every_training_path():
    """--preset cpu-step: the table at d=256, d_sae=16384, k=32, B=2048 and no sweep, with the
    Trainer step, the module's autograd loop and the peers (each peer's step is bench/peers.py's)."""
    import argparse

    from bench.__main__ import add_arguments, make_plan

    p = argparse.ArgumentParser()
    add_arguments(p)
    plan, notes = make_plan(p.parse_args(["--preset", "cpu-step"]))
    assert (plan.d_in, plan.k, plan.batch, plan.widths, plan.table_width) == (256, 32, 2048, [16384], 16384)
    assert plan.device == "cpu" and notes[0] == "preset cpu-step"
    assert {"torch.mm (floor)", "fastsae[cpp]", "fastsae[cpp] module loop", "torch dense", "SAELens",
            "sparsify"} <= set(plan.impls)


def test_module_loop_adapter_takes_a_real_step():
    """The drop-in autograd loop adapter trains: its weights move, and it reconstructs like the others."""
    shape = peers.Shape(d_in=8, d_sae=32, k=4, batch=16)
    a = peers.build("fastsae[cpp] module loop", shape, "cpu", torch.float32)
    x = peers.make_batch(shape, "cpu", torch.float32)
    before = a.sae.W_enc.detach().clone()
    a.step(x)
    assert not torch.equal(before, a.sae.W_enc.detach())
    b = peers.build("fastsae[reference]", shape, "cpu", torch.float32)
    torch.testing.assert_close(peers.build("fastsae[cpp] module loop", shape, "cpu", torch.float32).reconstruct(x),
                               b.reconstruct(x), rtol=1e-5, atol=1e-5)
    # the harness asks each adapter class whether it can run: the module loop's answer is its
    # own backend's (it once read the Trainer adapter's empty backend and was never run)
    assert type(a).unavailable(torch.device("cpu")) is None
