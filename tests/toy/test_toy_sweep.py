"""The toy-sweep CLI on a 2×2 tiny grid: JSON table, heatmaps, resume, init comparison."""

import json

import pytest

from fastsae.cli import main
from fastsae.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ["--d", "8", "--features", "16", "--mean-active", "2", "--steps", "8", "--batch", "32",
        "--eval-samples", "64", "--arch", "standard", "--l1", "0.01,0.1"]


def sweep(out, *extra):
    return main(["toy-sweep", "--out", str(out), *TINY, *extra])


def test_grid_writes_table_and_heatmaps(tmp_path):
    assert sweep(tmp_path, "--ratios", "0.5,1") == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(results["cells"]) == [
        "standard/ratio=0.5/coef=0.01", "standard/ratio=0.5/coef=0.1",
        "standard/ratio=1/coef=0.01", "standard/ratio=1/coef=0.1",
    ]
    cell = results["cells"]["standard/ratio=0.5/coef=0.1"]
    assert cell["d_sae"] == 8 and cell["steps"] == 8
    for metric in ("mmcs", "recovered", "dead_latents", "l0", "fvu", "shrinkage"):
        assert metric in cell["metrics"]
    assert 0 <= cell["metrics"]["mmcs"] <= 1
    assert results["settings"]["data"]["n_features"] == 16
    for metric in ("mmcs", "recovered", "dead_fraction", "shrinkage"):
        assert (tmp_path / f"standard_{metric}.png").stat().st_size > 0


def test_rerun_skips_finished_cells_and_extends_the_grid(tmp_path, capsys):
    sweep(tmp_path, "--ratios", "0.5", "--no-plots")
    first = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert len(first) == 2
    capsys.readouterr()
    sweep(tmp_path, "--ratios", "0.5,1", "--no-plots")
    assert "(2 already in" in capsys.readouterr().out
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert len(cells) == 4
    for key, cell in first.items():  # untouched, not retrained
        assert cells[key] == cell


def test_resume_under_other_settings_is_refused(tmp_path):
    sweep(tmp_path, "--ratios", "0.5", "--no-plots")
    with pytest.raises(InputError, match="different settings"):
        sweep(tmp_path, "--ratios", "0.5", "--no-plots", "--lr", "0.01")


def test_init_comparison_tracks_mmcs_for_both_inits(tmp_path):
    sweep(tmp_path, "--ratios", "1", "--l1", "0.1", "--compare-init", "--init-ratio", "1",
          "--track-every", "4")
    comparison = json.loads((tmp_path / "results.json").read_text())["init_comparison"]
    assert comparison["cell"] == "standard/ratio=1/coef=0.1"
    for init in ("random", "data"):
        assert [p["step"] for p in comparison[init]["history"]] == [0, 4, 8]
    assert (tmp_path / "init_comparison.png").stat().st_size > 0


def test_tracked_cells_save_progress_and_plot_it(tmp_path):
    sweep(tmp_path, "--ratios", "1", "--l1", "0.1", "--track-cells", "--track-every", "4")
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert [p["step"] for p in progress["standard/ratio=1/coef=0.1"]] == [0, 4, 8]
    assert (tmp_path / "progress.png").stat().st_size > 0


def test_topk_cells_take_k(tmp_path):
    main(["toy-sweep", "--out", str(tmp_path), *TINY[:-4], "--arch", "topk", "--k", "2",
          "--ratios", "1", "--no-plots"])
    cell = json.loads((tmp_path / "results.json").read_text())["cells"]["topk/ratio=1/coef=2"]
    assert cell["metrics"]["l0"] <= 2.0
