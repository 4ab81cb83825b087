"""`python -m bench.eval_cost` keeps working: structure only, on the tiny model, never a time asserted."""

import json
import sys

from helpers import REPO, require

require("transformers", "compat")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import eval_cost  # noqa: E402


def test_eval_cost_writes_json_and_markdown(tmp_path, capsys):
    assert eval_cost.main(["--models", "tiny", "--tokens", "512", "--repeats", "1", "--threads", "1",
                           "--out-dir", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("eval_cost-*.json")
    rep = json.loads(js.read_text())
    (row,) = rep["records"]
    assert row["model"] == "tiny" and row["tokens"] == 512 and row["hook"] == "transformer.h.1"
    for key in ("forward_s_per_mtok", "eval_s_per_mtok", "eval_recon_only_s_per_mtok", "eval_over_forward"):
        assert row[key] > 0
    assert "| tiny |" in js.with_suffix(".md").read_text() and "eval ÷ forward" in capsys.readouterr().out
