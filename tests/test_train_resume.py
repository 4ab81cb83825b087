"""Checkpoints: resume continues the same run exactly; keep-last-N; failing writes."""

import json

import pytest
import torch

import fastsae
from fastsae.errors import CheckpointError
from fastsae.sae import sae_class
from fastsae.toy.data import ToyData
from fastsae.tracking import read_log
from fastsae.trainer import TrainConfig, Trainer, latest_checkpoint, list_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=2048, d=16, seed=0):
    return ToyData(d=d, n_features=48, mean_active=3.0, seed=seed).sample(n)


def _cfg(tmp, arch="topk", **kw):
    sae = dict(d_in=16, d_sae=64, architecture=arch)
    if sae_class(arch).needs_k:
        sae["k"] = 4
    base = dict(sae=sae, steps=20, batch_size=32, lr=3e-3, warmup_steps=3, decay_start=0.5,
                sparsity_warmup_steps=4, log_every=1, checkpoint_every=5, dead_tokens=64,
                out_dir=str(tmp), progress=False, console=False, plot=False, init_sample_rows=256)
    base.update(kw)
    return TrainConfig(**base)


def _losses(out_dir):
    return [(r["step"], r["loss"], r["mse"], r["auxk"]) for r in read_log(out_dir / "log.jsonl")]


@pytest.mark.parametrize("arch,opt", [("topk", "row_sparse_adam"), ("topk", "adam"),
                                      ("batchtopk", "row_sparse_adam"), ("standard", "adam"),
                                      ("jumprelu", "adam")])
def test_resume_equals_uninterrupted_run(tmp_path, arch, opt):
    x = _data()
    full = Trainer(_cfg(tmp_path / "full", arch, optimizer=opt), x).fit()
    # the interrupted run stops at 12 (a checkpoint at 10 and one at the stop) ...
    Trainer(_cfg(tmp_path / "cut", arch, optimizer=opt), x).fit(max_steps=12)
    # ... and is resumed from step 10, as after a crash between the two
    cut = Trainer.resume(tmp_path / "cut", x, checkpoint=tmp_path / "cut/checkpoints/step_00000010").fit()
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert [r[0] for r in b] == list(range(1, 21))
    assert a == b  # exact equality on CPU, loss by loss
    if sae_class(arch).needs_k:
        assert any(r[3] > 0 for r in a), "AuxK never ran, so its state was not exercised"
    sa, sb = fastsae.load(full.final_dir).state_dict(), fastsae.load(cut.final_dir).state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_with_shard_source_and_bf16(tmp_path):
    import numpy as np

    x = _data(1000)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        np.save(shards / f"{i}.npy", x[i * 333:(i + 1) * 333].numpy())
    from fastsae.data import ShardSource

    def src():
        return ShardSource(shards, batch_size=32, buffer_rows=128, chunk_rows=64, seed=3)

    sae = dict(d_in=16, d_sae=64, architecture="topk", k=4, dtype="bfloat16")
    Trainer(_cfg(tmp_path / "full", sae=sae, optimizer="row_sparse_adam"), src()).fit()
    Trainer(_cfg(tmp_path / "cut", sae=sae, optimizer="row_sparse_adam"), src()).fit(max_steps=7)
    Trainer.resume(tmp_path / "cut", src()).fit()
    assert _losses(tmp_path / "full") == _losses(tmp_path / "cut")


def test_keep_last_n_and_latest(tmp_path):
    Trainer(_cfg(tmp_path, steps=10, checkpoint_every=2, keep_checkpoints=2), _data()).fit()
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_00000008", "step_00000010"]
    assert latest_checkpoint(tmp_path).name == "step_00000010"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    cfg = json.loads((tmp_path / "train_config.json").read_text())
    assert cfg["sae"]["d_sae"] == 64


def test_failing_checkpoint_write_keeps_previous_loadable(tmp_path, monkeypatch):
    x = _data()
    trainer = Trainer(_cfg(tmp_path, steps=10, checkpoint_every=5), x)
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-way through its files
            with open(f, "wb") as fh:
                fh.write(b"torn")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(CheckpointError, match="step_00000005 is intact"):
        trainer.fit()
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step_00000005"
    assert not (tmp_path / "checkpoints/step_00000010").exists()
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    fastsae.load(ckpt)  # the SAE loads
    resumed = Trainer.resume(tmp_path, x)
    assert resumed.step == 5
    resumed.fit()
    assert latest_checkpoint(tmp_path).name == "step_00000010"


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="train_config.json"):
        Trainer.resume(tmp_path, _data())
