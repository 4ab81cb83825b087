"""save_pretrained / fastsae.load: round trips, atomicity, integrity checks, portability, and
clear errors on bad files."""

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

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


def _without_embedded_config(path):
    """Rewrite the weights as a tool other than fastsae would: no config, no checksum inside."""
    w = path / "sae_weights.safetensors"
    save_file(load_file(str(w)), str(w))


def test_cfg_disagreeing_with_weight_shapes(tmp_path):
    make("topk").save_pretrained(tmp_path)
    _without_embedded_config(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_sae"] = 12
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"W_enc has shape \(6, 10\).*implies \(6, 12\)"):
        fastsae.load(tmp_path)


def test_weights_of_another_architecture(tmp_path):
    make("jumprelu").save_pretrained(tmp_path)
    _without_embedded_config(tmp_path)
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


# ------------------------------------------------------------------ the cfg.json + weights pair
def _sae(k, d_sae=10, shift=0.0, seed=1):
    torch.manual_seed(seed)
    sae = fastsae.TopKSAE(d_in=6, d_sae=d_sae, k=k)
    with torch.no_grad():
        sae.W_enc.add_(shift)
    return sae


def _interrupt_rename(monkeypatch, which):
    """Make the `which`-th os.replace of a save (1: the first file committed) die like a kill."""
    calls = []
    real = os.replace

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == which:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("which", [1, 2])
@pytest.mark.parametrize("new_shape", ["same shapes", "other d_sae"])
def test_interrupted_save_over_another_sae_never_mixes_the_two(tmp_path, monkeypatch, which, new_shape):
    old = _sae(k=3)
    old.save_pretrained(tmp_path)
    new = _sae(k=5, d_sae=10 if new_shape == "same shapes" else 12, shift=1.0, seed=2)
    _interrupt_rename(monkeypatch, which)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ckpt.CheckpointWarning)
        loaded = fastsae.load(tmp_path)
    # the previous checkpoint, whole: its weights with its own k
    assert loaded.cfg == old.cfg
    torch.testing.assert_close(loaded.W_enc, old.W_enc)
    new.save_pretrained(tmp_path)  # a save that completes replaces it whole
    loaded = fastsae.load(tmp_path)
    assert loaded.cfg == new.cfg
    torch.testing.assert_close(loaded.W_enc, new.W_enc)


def test_edited_cfg_json_is_overruled_by_the_weights_with_a_warning(tmp_path):
    _sae(k=3).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["k"] = 4
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.warns(ckpt.CheckpointWarning, match="disagrees with the config saved inside .* on k"):
        assert fastsae.load(tmp_path).cfg.k == 3


# ------------------------------------------------------------------ integrity
def _data_offset(path, name):
    """Byte offset of tensor `name`'s data in a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return 8 + n + json.loads(raw[8:8 + n])[name]["data_offsets"][0]


def test_nan_bytes_in_the_weights_are_caught(tmp_path):
    _sae(k=3).save_pretrained(tmp_path)
    w = tmp_path / "sae_weights.safetensors"
    raw = bytearray(w.read_bytes())
    at = _data_offset(w, "W_enc")
    raw[at:at + 4] = torch.tensor([float("nan")]).numpy().tobytes()
    w.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match the checksum it was saved with"):
        fastsae.load(tmp_path)
    _without_embedded_config(tmp_path)  # no checksum to catch it: the finiteness check does
    with pytest.raises(CheckpointError, match=r"W_enc holds 1 NaN/inf value"):
        fastsae.load(tmp_path)


def test_a_flipped_byte_fails_the_checksum(tmp_path):
    _sae(k=3).save_pretrained(tmp_path)
    w = tmp_path / "sae_weights.safetensors"
    raw = bytearray(w.read_bytes())
    raw[_data_offset(w, "W_dec") + 5] ^= 0x01  # still a finite float
    w.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        fastsae.load(tmp_path)
    meta = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    assert len(meta["fastsae_sha256"]) == 64


def test_non_finite_weights_saved_with_a_valid_checksum_are_refused(tmp_path):
    sae = _sae(k=3)
    state = sae.state_dict()
    state["b_dec"] = state["b_dec"].clone()
    state["b_dec"][2] = float("inf")
    ckpt.write_checkpoint(tmp_path, sae.cfg, state)
    with pytest.raises(CheckpointError, match=r"b_dec holds 1 NaN/inf value"):
        fastsae.load(tmp_path)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_non_float_tensor_is_a_checkpoint_error(tmp_path, dtype):
    sae = _sae(k=3)
    state = sae.state_dict()
    state["W_enc"] = state["W_enc"].to(dtype)
    ckpt.write_checkpoint(tmp_path, sae.cfg, state)
    with pytest.raises(CheckpointError, match=r"W_enc is .*floating point"):
        fastsae.load(tmp_path)


# ------------------------------------------------------------------ portability
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        _sae(k=3).save_pretrained(tmp_path / "ck")
    finally:
        os.umask(old)
    for f in (tmp_path / "ck").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


def test_a_cuda_checkpoint_loads_on_a_cpu_only_machine(tmp_path, monkeypatch):
    sae = _sae(k=3)
    ckpt.write_checkpoint(tmp_path, sae.cfg.replace(device="cuda:0"), sae.state_dict())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(ckpt.CheckpointWarning, match="saved on cuda:0, which this machine does not have") as seen:
        loaded = fastsae.load(tmp_path)
    assert len([w for w in seen if issubclass(w.category, ckpt.CheckpointWarning)]) == 1
    assert loaded.device == torch.device("cpu") and loaded.cfg.device == "cpu"
    torch.testing.assert_close(loaded.W_enc, sae.W_enc)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for the CPU: nothing to say
        cfg, _ = ckpt.read_checkpoint(tmp_path, device="cpu")
    assert cfg.device == "cuda:0"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_the_saved_config_follows_the_module_dtype(tmp_path, dtype):
    sae = _sae(k=3).to(dtype)
    sae.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    loaded = fastsae.load(tmp_path)
    assert loaded.W_enc.dtype == dtype and loaded.cfg.torch_dtype == dtype
    torch.testing.assert_close(loaded.W_dec, sae.W_dec)


def test_a_config_with_a_bad_device_name_is_a_checkpoint_error(tmp_path):
    sae = _sae(k=3)
    ckpt.write_checkpoint(tmp_path, sae.cfg.replace(device="gpu0"), sae.state_dict())
    with pytest.raises(CheckpointError, match="device 'gpu0' in its config is not a device name"):
        fastsae.load(tmp_path)
