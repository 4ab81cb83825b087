"""`fastsae train`: flags, a TOML config, resume, and where the results went."""

import json

import numpy as np
import pytest

import fastsae
from fastsae.cli import main
from fastsae.errors import ConfigError
from fastsae.toy.data import ToyData

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def shards(tmp_path):
    d = tmp_path / "acts"
    d.mkdir()
    x = ToyData(d=16, n_features=32, seed=0).sample(1200).numpy()
    np.save(d / "0.npy", x[:600])
    np.save(d / "1.npy", x[600:])
    (d / "manifest.json").write_text(json.dumps({"model": "tiny", "hook": "h.0"}))
    return d


def _last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def test_train_with_flags_prints_where_results_went(shards, tmp_path, capsys):
    out_dir = tmp_path / "run"
    rc = main(["train", "--data", str(shards), "--expansion", "4", "--k", "4", "--steps", "12",
               "--batch-size", "32", "--log-every", "4", "--checkpoint-every", "5", "--out-dir", str(out_dir),
               "--optimizer", "row_sparse_adam", "--set", "plot=false", "--no-progress"])
    assert rc == 0
    res = _last_json(capsys.readouterr().out)
    sae = fastsae.load(res["final"])
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == (16, 64, 4)
    assert sae.cfg.metadata["hook"] == "h.0"
    assert res["log"].endswith("log.jsonl") and res["checkpoint"].endswith("step_00000012")
    assert len([json.loads(line) for line in open(res["log"])]) == 3


def test_train_with_toml_config_and_resume(shards, tmp_path, capsys):
    out_dir = tmp_path / "run"
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"""
steps = 8
batch_size = 32
lr = 0.003
log_every = 1
checkpoint_every = 4
plot = false
out_dir = "{out_dir}"

[sae]
d_sae = 48
architecture = "batchtopk"
k = 3

[data]
path = "{shards}"
buffer_rows = 256
chunk_rows = 64
""")
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    first = _last_json(capsys.readouterr().out)
    assert fastsae.load(first["final"]).cfg.architecture == "batchtopk"
    # ask for more steps: the run continues from its last checkpoint
    assert main(["train", "--config", str(cfg), "--resume", "--steps", "12", "--no-progress"]) == 0
    steps = [json.loads(line)["step"] for line in open(out_dir / "log.jsonl")]
    assert steps == list(range(1, 13))


def test_train_cli_errors_say_what_to_do(shards, tmp_path):
    with pytest.raises(ConfigError, match="--data"):
        main(["train", "--d-sae", "8"])
    with pytest.raises(ConfigError, match="--d-sae N or --expansion"):
        main(["train", "--data", str(shards), "--k", "2"])
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        main(["train", "--config", str(bad)])
    with pytest.raises(ConfigError, match="start it with torchrun --nproc-per-node N"):
        main(["train", "--data", str(shards), "--d-sae", "8", "--shards", "2"])


def test_train_a_transcoder_and_a_matryoshka_sae_from_the_command_line(tmp_path, capsys):
    """--targets pairs two shard folders row for row (a transcoder), --matryoshka-widths nests."""
    toy = ToyData(d=16, n_features=32, seed=0, d_out=12)
    x, y = toy.sample_pair(600)
    for name, t in (("in", x), ("out", y)):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "0.npy", t.numpy())
    out = tmp_path / "tc"
    assert main(["train", "--data", str(tmp_path / "in"), "--targets", str(tmp_path / "out"), "--d-sae", "48",
                 "--k", "3", "--steps", "6", "--batch-size", "32", "--skip-connection", "--out-dir", str(out),
                 "--no-progress", "--set", "plot=false"]) == 0
    sae = fastsae.load(_last_json(capsys.readouterr().out)["final"])
    assert sae.cfg.transcoder and (sae.cfg.d_in, sae.cfg.d_out) == (16, 12) and sae.cfg.skip_connection
    assert main(["train", "--data", str(tmp_path / "in"), "--architecture", "matryoshka_batchtopk",
                 "--matryoshka-widths", "8,24,48", "--d-sae", "48", "--k", "3", "--steps", "4", "--batch-size", "32",
                 "--out-dir", str(tmp_path / "m"), "--no-progress", "--set", "plot=false"]) == 0
    sae = fastsae.load(_last_json(capsys.readouterr().out)["final"])
    assert sae.cfg.architecture == "matryoshka_batchtopk" and sae.cfg.matryoshka_widths == [8, 24, 48]
    with pytest.raises(ConfigError, match="matryoshka-widths 'a,b'"):
        main(["train", "--data", str(tmp_path / "in"), "--matryoshka-widths", "a,b", "--d-sae", "48"])
