"""save_pretrained / fastsae.load: round trips, atomicity, and clear errors on bad files."""

import json

import pytest
import torch

import fastsae
from fastsae import CheckpointError
from fastsae import checkpoint as ckpt
from fastsae.sae import sae_class

ARCHS = ["standard", "topk", "batchtopk", "jumprelu"]


def make(arch, **kw):
    torch.manual_seed(1)
    k = 3 if sae_class(arch).needs_k else None
    sae = fastsae.sae_class(arch)(d_in=6, d_sae=10, k=k, **kw)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return sae


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_every_class(tmp_path, arch):
    sae = make(arch, metadata={"hook_name": "blocks.3.hook_resid_post"})
    if arch == "batchtopk":
        sae.training_forward(torch.randn(8, 6))  # learn a threshold so the buffer matters
    sae.save_pretrained(tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    loaded = fastsae.load(tmp_path / "ck")
    assert type(loaded) is type(sae)
    assert loaded.cfg == sae.cfg
    for (n1, t1), (n2, t2) in zip(sae.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    x = torch.randn(4, 6)
    sae.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), sae(x))
    assert type(loaded).from_pretrained(tmp_path / "ck").cfg == sae.cfg


def test_load_with_dtype_override(tmp_path):
    make("topk").save_pretrained(tmp_path)
    sae = fastsae.load(tmp_path, dtype=torch.bfloat16)
    assert sae.W_enc.dtype == torch.bfloat16 and sae.cfg.dtype == "bfloat16"


def test_from_pretrained_wrong_class_says_which(tmp_path):
    make("topk").save_pretrained(tmp_path)
    with pytest.raises(fastsae.InputError, match="holds a TopKSAE.*fastsae.load"):
        fastsae.StandardSAE.from_pretrained(tmp_path)


def test_interrupted_save_leaves_old_checkpoint_intact(tmp_path, monkeypatch):
    old = make("topk")
    old.save_pretrained(tmp_path)
    new = make("topk")
    with torch.no_grad():
        new.W_enc.add_(1.0)

    def torn_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # half a file, then the "power cut"
            f.write(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", torn_write)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    torch.testing.assert_close(fastsae.load(tmp_path).W_enc, old.W_enc)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at .*does not exist"):
        fastsae.load(tmp_path / "nope")


def test_missing_cfg(tmp_path):
    with pytest.raises(CheckpointError, match="no cfg.json in .*save_pretrained"):
        fastsae.load(tmp_path)


def test_missing_weights(tmp_path):
    make("topk").save_pretrained(tmp_path)
    (tmp_path / "sae_weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no sae_weights.safetensors.*incomplete"):
        fastsae.load(tmp_path)


def test_corrupt_cfg(tmp_path):
    make("topk").save_pretrained(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cfg.json is not valid JSON"):
        fastsae.load(tmp_path)


def test_invalid_cfg_values(tmp_path):
    make("topk").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["k"] = 99
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="k=99 is out of range"):
        fastsae.load(tmp_path)


def test_corrupt_weights(tmp_path):
    make("topk").save_pretrained(tmp_path)
    (tmp_path / "sae_weights.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="sae_weights.safetensors is not a readable safetensors"):
        fastsae.load(tmp_path)


def test_cfg_disagreeing_with_weight_shapes(tmp_path):
    make("topk").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_sae"] = 12
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"W_enc has shape \(6, 10\).*implies \(6, 12\)"):
        fastsae.load(tmp_path)


def test_weights_of_another_architecture(tmp_path):
    make("jumprelu").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["architecture"] = "standard"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensors \['threshold'\].*architecture"):
        fastsae.load(tmp_path)


def test_save_onto_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        make("topk").save_pretrained(f)
