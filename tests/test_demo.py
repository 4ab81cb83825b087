"""`fastsae demo` end to end on a 2-second budget."""

import re

import pytest

from fastsae.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_smoke(capsys):
    assert main(["demo", "--seconds", "2", "--d", "16", "--features", "32", "--eval-samples", "512"]) == 0
    out = capsys.readouterr().out
    for line in ("MMCS", "L0", "FVU", "dead latents", "recovered"):
        assert line in out


def test_demo_standard_random_init(capsys):
    assert main(["demo", "--seconds", "2", "--max-steps", "20", "--arch", "standard", "--init", "random",
                 "--d", "16", "--features", "32", "--eval-samples", "512"]) == 0
    assert "trained 20 steps" in capsys.readouterr().out


def test_demo_resamples_dead_latents(capsys):
    # 10 steps of 8 rows cannot make all 128 latents fire: the unfired ones are resampled
    assert main(["demo", "--seconds", "2", "--max-steps", "30", "--resample-every", "10", "--batch", "8",
                 "--init", "random", "--ratio", "4", "--k", "2", "--d", "16", "--features", "32",
                 "--eval-samples", "512"]) == 0
    resampled = re.search(r"\((\d+) resampled in training\)", capsys.readouterr().out)
    assert resampled and int(resampled.group(1)) > 0
