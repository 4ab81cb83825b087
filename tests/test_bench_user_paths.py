"""The user-path benchmarks keep working on tiny shapes (structure only, never a time)."""

from __future__ import annotations

import json
import sys

import pytest

from helpers import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import shrinkage, step_profile  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_step_profile_reports_every_path_against_the_gemm(tmp_path):
    assert step_profile.main(["--shape", "8,64,2,16", "--repeats", "1", "--out", str(tmp_path), "--name", "t"]) == 0
    rep = json.loads((tmp_path / "t.json").read_text())
    ratios = rep["results"][0]["x_gemm"]
    assert ratios["gemm"] == 1.0
    for path in ("module loop", "trainer", "trainer+auxk", "AuxK's loss and gradients, given the selection"):
        assert ratios[path] > 0
    assert "AuxK's share" in (tmp_path / "t.md").read_text()


def test_shrinkage_bench_scores_before_and_after(tmp_path):
    assert shrinkage.main(["--d", "8", "--features", "16", "--l1", "0.5", "--k", "--steps", "20",
                           "--finetune-steps", "10", "--batch", "32", "--out", str(tmp_path), "--name", "t"]) == 0
    row = json.loads((tmp_path / "shrinkage-t.json").read_text())["rows"][0]
    assert set(row["before"]) == set(row["after"]) == set(shrinkage.KEYS)


def test_dropin_quality_runs_the_trainer_with_settings(tmp_path):
    """The drop-in bench's Trainer row with TrainConfig settings: named after them, scored."""
    from bench import dropin_quality

    args = ["--toy", "--d-sae", "16", "--k", "2", "--steps", "4", "--batch", "8", "--seeds", "0", "--max-rows", "64",
            "--only", "--trainer-settings", "b_dec_init=zeros", "decay_start=0.5", "--out", str(tmp_path),
            "--name", "t"]
    assert dropin_quality.main(args) == 0
    runs = json.loads((tmp_path / "dropin-t.json").read_text())["runs"]
    assert [r["row"] for r in runs] == ["fastsae Trainer (b_dec_init=zeros, decay_start=0.5)"]
    assert 0 < runs[0]["heldout_fvu"] < 10
    with pytest.raises(SystemExit):
        dropin_quality.main(["--toy", "--trainer-settings", "no_equals_sign"])


def test_optim_step_bench_prints_every_row(capsys):
    from bench import optim_step

    # 16 x 32: Adam fed the rows; 4 x 32 (b_dec of 4 entries): the buffered step in both columns
    optim_step.main(["--shape", "16,32,5", "--shape", "4,32,5", "--rounds", "1"])
    table = capsys.readouterr().out
    assert "| 16 | 32 | 5 |" in table and "| 4 | 32 | 5 |" in table and table.count("x)") == 10


def test_row_bandwidth_bench_prints_a_rate_per_working_set(capsys):
    from bench import row_bandwidth

    row_bandwidth.main(["--batch", "256", "--k", "16", "--d", "64", "--latents", "16", "64", "--rounds", "3"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 16 |") or
            line.startswith("| 64 |")]
    assert len(rows) == 2 and all(float(r.split("|")[3]) > 0 for r in rows)
    with pytest.raises(SystemExit):
        row_bandwidth.main(["--k", "5", "--latents", "4"])


def test_fit_loop_bench_reports_both_allocator_settings(tmp_path):
    from bench import fit_loop

    assert fit_loop.main(["--shape", "8,64,2,16", "--rounds", "1", "--steps", "12", "--out", str(tmp_path),
                          "--name", "t"]) == 0
    rep = json.loads((tmp_path / "t.json").read_text())
    median = rep["results"][0]["median"]
    for loop in fit_loop.LOOPS:
        for setting in fit_loop.SETTINGS:
            m = median[loop][setting]
            assert m["cpu_ms"] > 0 and m["gemm_ms"] > 0 and m["faults"] >= 0
    assert "| module loop | freed memory kept |" in (tmp_path / "t.md").read_text()
