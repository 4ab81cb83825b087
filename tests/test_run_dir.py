"""A run's folder can be trusted: resume keeps the run's settings (and says which may change),
an extended run does not restart its lr decay, a torn log or a corrupt newest checkpoint does
not stop a resume, leftovers of killed saves are cleaned, two processes never share a folder,
and a fresh run never silently replaces an old one."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fastsae.cli import main
from fastsae.config import TrainConfig
from fastsae.errors import CheckpointError, ConfigError
from fastsae.run_dir import RunDir, list_checkpoints
from fastsae.schedules import lr_factor
from fastsae.toy.data import ToyData
from fastsae.tracking import read_log
from fastsae.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out, **kw):
    base = dict(sae=dict(d_in=16, d_sae=48, architecture="topk", k=3), steps=12, batch_size=32, lr=3e-3,
                log_every=1, checkpoint_every=4, out_dir=str(out), progress=False, console=False, plot=False,
                b_dec_init="zeros")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def x():
    return ToyData(d=16, n_features=32, seed=0).sample(2048)


@pytest.fixture
def shards(tmp_path):
    d = tmp_path / "acts"
    d.mkdir()
    np.save(d / "0.npy", ToyData(d=16, n_features=32, seed=0).sample(1200).numpy())
    return d


def test_readme_resume_command_keeps_the_runs_settings(shards, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--data", str(shards), "--out-dir", str(out), "--no-progress", "--set", "plot=false"]
    assert main([*base, "--expansion", "3", "--k", "3", "--steps", "8", "--batch-size", "48",
                 "--checkpoint-every", "4", "--log-every", "2"]) == 0
    # the README's command: no width flags; the batch size stays 48; nonfinite may change and is recorded
    assert main([*base, "--resume", "--steps", "12", "--nonfinite", "skip"]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["steps"] == 12 and saved["batch_size"] == 48 and saved["nonfinite"] == "skip"
    assert saved["resumes"][-1]["step"] == 8 and saved["resumes"][-1]["changed"]["steps"] == 12
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [2, 4, 6, 8, 10, 12]
    # what would change the run is refused, naming what it was
    with pytest.raises(ConfigError, match=r"batch_size=48.*keeps them"):
        main([*base, "--resume", "--steps", "16", "--batch-size", "64"])
    with pytest.raises(ConfigError, match=r"k=3: a resumed run keeps its SAE; drop --k"):
        main([*base, "--resume", "--steps", "16", "--k", "5"])
    with pytest.raises(ConfigError, match="pick one"):
        main([*base, "--resume", "--overwrite"])


def test_extending_steps_continues_the_decay_instead_of_restarting_it(tmp_path, x):
    Trainer(_cfg(tmp_path, steps=12, decay_start=0.5), x).fit()  # decays over steps 6..12 to 0
    t = Trainer.resume(tmp_path, x, steps=20)
    assert t.cfg.lr_anchor is not None and t.cfg.lr_anchor[0] == 12
    f = [lr_factor(s, 20, decay_start=0.5, anchor=t.cfg.lr_anchor) for s in range(12, 20)]
    assert f[0] == pytest.approx(lr_factor(12, 12, decay_start=0.5), abs=1e-12)  # where it was: 0
    assert all(v <= f[0] + 1e-12 for v in f)  # never back up to the top
    t.fit()
    lrs = [r["lr"] for r in read_log(tmp_path / "log.jsonl")]
    assert max(lrs[12:]) <= lrs[11] + 1e-12
    # before the decay began, the flat phase simply lasts longer
    Trainer(_cfg(tmp_path / "early", steps=12, decay_start=0.9), x).fit(max_steps=4)
    assert Trainer.resume(tmp_path / "early", x, steps=30).cfg.lr_anchor is None


def test_torn_last_log_line_is_dropped_on_resume(tmp_path, x):
    Trainer(_cfg(tmp_path), x).fit(max_steps=8)
    with open(tmp_path / "log.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 9, "loss": 0.')  # a disk filled up mid-line
    t = Trainer.resume(tmp_path, x)
    assert [r["step"] for r in t.tracker.history] == list(range(1, 9))
    t.fit()
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == list(range(1, 13))
    (tmp_path / "log.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(CheckpointError, match="line 2 is not JSON"):
        read_log(tmp_path / "log.jsonl")


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, x):
    Trainer(_cfg(tmp_path), x).fit(max_steps=8)
    newest = tmp_path / "checkpoints" / "step_00000008"
    (newest / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="resuming from step_00000004"):
        t = Trainer.resume(tmp_path, x)
    assert t.step == 4
    t.run.unlock()
    with pytest.raises(CheckpointError, match="unreadable"):
        Trainer.resume(tmp_path, x, checkpoint=newest)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        Trainer.resume(tmp_path, x, checkpoint=tmp_path / "checkpoints" / "step_00000099")


def test_leftovers_of_killed_saves_are_removed(tmp_path, x):
    Trainer(_cfg(tmp_path), x).fit(max_steps=4)
    ck = tmp_path / "checkpoints"
    (ck / ".tmp-step_00000006").mkdir()  # killed mid-write
    (ck / "step_00000002").mkdir()  # killed mid-prune: incomplete, never listed
    (ck / "step_00000002" / "cfg.json").write_text("{}")
    Trainer.resume(tmp_path, x).fit()
    left = sorted(p.name for p in ck.iterdir())
    assert left == ["LATEST", "step_00000004", "step_00000008", "step_00000012"], left
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000008", "step_00000012"]


def test_fresh_run_refuses_a_folder_holding_a_run(tmp_path, x):
    Trainer(_cfg(tmp_path), x).fit(max_steps=4)
    with pytest.raises(ConfigError, match=r"already holds a run \(train_config.json, log.jsonl, 1 checkpoint"):
        Trainer(_cfg(tmp_path), x).fit()
    assert len(read_log(tmp_path / "log.jsonl")) == 4  # nothing was lost
    Trainer(_cfg(tmp_path, overwrite=True, steps=6), x).fit()
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == list(range(1, 7))


def test_two_processes_cannot_train_into_one_folder(tmp_path, x):
    run = RunDir(tmp_path, Trainer(_cfg(tmp_path), x).layout)
    run.lock()  # this process is "training" there
    code = textwrap.dedent(f"""
        import torch, fastsae
        from fastsae.errors import ConfigError
        cfg = fastsae.TrainConfig(sae=dict(d_in=4, d_sae=8, architecture="topk", k=2), steps=2, batch_size=4,
                                  out_dir={str(tmp_path)!r}, progress=False, console=False, plot=False,
                                  b_dec_init="zeros")
        try:
            fastsae.Trainer(cfg, torch.randn(16, 4)).fit()
        except ConfigError as e:
            print("REFUSED", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "REFUSED" in out.stdout and "in use by process" in out.stdout, out.stdout + out.stderr
    assert not (tmp_path / "log.jsonl").exists()
    run.unlock()


def test_train_help_gives_every_flag_help_and_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "(default: 1000)" in text and "(default: 0.0002)" in text and "(default: topk)" in text
    import argparse

    from fastsae import train_cli

    p = argparse.ArgumentParser()
    train_cli.add_arguments(p)
    for action in p._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_toml_sae_table_typo_names_the_known_fields(shards, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'steps = 2\nout_dir = "{tmp_path / "run"}"\n[sae]\nd_sae = 32\nk = 2\narchitcture = "topk"\n')
    with pytest.raises(ConfigError, match=r"unknown \[sae\] field\(s\) \['architcture'\].*known ones are"):
        main(["train", "--config", str(cfg), "--data", str(shards)])


def test_empty_and_one_row_batches_are_defined(tmp_path):
    import fastsae

    sae = fastsae.TopKSAE(d_in=6, d_sae=12, k=2)
    out = sae.training_forward(torch.randn(1, 6))
    assert torch.isfinite(out.loss) and torch.isnan(out.fvu)  # no variance in one row: FVU undefined
    out = sae.training_forward(torch.randn(0, 6))
    assert float(out.loss.detach()) == 0.0 and float(out.l0) == 0.0
    # the Trainer trains on 1-row batches and skips empty ones
    data = [torch.randn(1, 6) for _ in range(3)] + [torch.randn(0, 6)] + [torch.randn(1, 6)]
    cfg = TrainConfig(sae=sae.cfg, steps=4, batch_size=1, out_dir=str(tmp_path), progress=False, console=False,
                      plot=False, b_dec_init="zeros", log_every=1)
    res = Trainer(cfg, data).fit()
    assert res.steps == 4 and all(np.isfinite(r["loss"]) for r in read_log(res.log_path))


def test_resume_on_other_data_is_refused_unless_allowed(tmp_path, x):
    Trainer(_cfg(tmp_path), x).fit(max_steps=4)
    other = ToyData(d=16, n_features=32, seed=1).sample(2048)
    with pytest.raises(ConfigError, match="the data differ from what .* was trained on"):
        Trainer.resume(tmp_path, other)
    t = Trainer.resume(tmp_path, other, allow_new_data=True)
    t.fit()
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert saved["resumes"][-1]["changed"]["data"]  # the change is recorded
    Trainer.resume(tmp_path, other, steps=14).run.unlock()  # the same data as last time: no complaint
