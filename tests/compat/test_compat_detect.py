"""Format detection and bad input: every error names the file, the format it looked like and
what that format needs. Files are written by hand (no peer library needed)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fastsae
from fastsae import CheckpointError, InputError
from fastsae.compat import convert
from fastsae.compat.formats import detect_format

D, N = 8, 32


def saelens_dir(path, arch="standard", d_sae=N, drop=(), **cfg):
    path.mkdir(parents=True, exist_ok=True)
    t = {"W_enc": torch.randn(D, N), "b_enc": torch.zeros(N), "W_dec": torch.randn(N, D), "b_dec": torch.zeros(D)}
    save_file({k: v for k, v in t.items() if k not in drop}, str(path / "sae_weights.safetensors"))
    c = {"architecture": arch, "d_in": D, "d_sae": d_sae, "dtype": "float32",
         "metadata": {"sae_lens_version": "6.5.0"}, **cfg}
    (path / "cfg.json").write_text(json.dumps(c))
    return path


def test_native_and_saelens_are_told_apart(tmp_path):
    sae = fastsae.TopKSAE(d_in=D, d_sae=N, k=3, normalize_activations="layer_norm")
    sae.save_pretrained(tmp_path / "ours")
    assert detect_format(tmp_path / "ours") == "fastsae"
    assert detect_format(saelens_dir(tmp_path / "theirs")) == "saelens"
    # Naming one of the files means its directory.
    assert detect_format(tmp_path / "ours" / "cfg.json") == "fastsae"
    assert fastsae.load(tmp_path / "ours").cfg.normalize_activations == "layer_norm"
    assert type(fastsae.load(tmp_path / "theirs", format="saelens")).__name__ == "StandardSAE"


def test_unknown_directory_lists_what_it_holds_and_every_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError) as e:
        fastsae.load(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "notes.txt" in msg
    for name in ("SAELens", "sparsify", "dictionary_learning", "Gemma Scope", "OpenAI"):
        assert name in msg


def test_missing_tensor_names_file_format_and_expected_keys(tmp_path):
    saelens_dir(tmp_path, arch="jumprelu", drop=("W_dec",))
    with pytest.raises(CheckpointError) as e:
        fastsae.load(tmp_path)
    msg = str(e.value)
    assert "sae_weights.safetensors looks like a SAELens jumprelu checkpoint but lacks ['W_dec', 'threshold']" in msg
    assert "needs ['W_dec', 'W_enc', 'b_dec', 'b_enc', 'threshold']" in msg


def test_cfg_disagreeing_with_weight_shapes_says_so(tmp_path):
    saelens_dir(tmp_path, d_sae=N * 2)
    with pytest.raises(CheckpointError, match=r"W_enc has shape \(8, 32\), but the config \(d_in=8, "
                                              r"d_sae=64\) implies \(8, 64\); the config and the weights disagree"):
        fastsae.load(tmp_path)


def test_corrupt_files_are_named(tmp_path):
    saelens_dir(tmp_path / "st")
    (tmp_path / "st" / "sae_weights.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"sae_weights.safetensors \(the weights of a SAELens checkpoint\) "
                                              "is not a readable safetensors file"):
        fastsae.load(tmp_path / "st")
    saelens_dir(tmp_path / "js")
    (tmp_path / "js" / "cfg.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"cfg.json \(a SAELens config\) is not valid JSON"):
        fastsae.load(tmp_path / "js")
    (tmp_path / "params.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=r"params.npz \(a Gemma Scope params file\) is not a readable .npz"):
        fastsae.load(tmp_path / "params.npz")
    (tmp_path / "broken.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"broken.pt could not be read by torch.load"):
        fastsae.load(tmp_path / "broken.pt")


def test_state_dict_of_unknown_keys_lists_them(tmp_path):
    torch.save({"weight": torch.zeros(2, 2)}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"keys \['weight'\], which match no format fastsae reads: an OpenAI "
                                              r"sparse_autoencoder one needs \['pre_bias'"):
        fastsae.load(tmp_path / "model.pt")


def test_gemma_scope_missing_threshold(tmp_path):
    np.savez(tmp_path / "params.npz", W_enc=np.zeros((D, N), np.float32), W_dec=np.zeros((N, D), np.float32),
             b_enc=np.zeros(N, np.float32), b_dec=np.zeros(D, np.float32))
    msg = r"params.npz looks like a Gemma Scope checkpoint but lacks \['threshold'\]"
    with pytest.raises(CheckpointError, match=msg):
        fastsae.load(tmp_path)


def test_incomplete_two_file_checkpoints(tmp_path):
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "cfg.json").write_text(json.dumps({"d_in": D, "num_latents": N, "k": 4}))
    msg = "has cfg.json but no sae.safetensors: it looks like a sparsify checkpoint"
    with pytest.raises(CheckpointError, match=msg):
        fastsae.load(tmp_path / "sp")
    saelens_dir(tmp_path / "sl")
    (tmp_path / "sl" / "cfg.json").unlink()
    with pytest.raises(CheckpointError, match="looks like a fastsae or SAELens checkpoint, which needs cfg.json"):
        fastsae.load(tmp_path / "sl")


def test_unsupported_saelens_architecture_and_normalisation(tmp_path):
    saelens_dir(tmp_path / "abstopk", arch="abstopk")
    with pytest.raises(CheckpointError, match="SAELens architecture 'abstopk' is not supported"):
        fastsae.load(tmp_path / "abstopk")
    saelens_dir(tmp_path / "white", normalize_activations="covariance_whitening")
    with pytest.raises(CheckpointError, match="covariance_whitening.*fold_activation_whitening"):
        fastsae.load(tmp_path / "white")


def test_bad_arguments(tmp_path):
    saelens_dir(tmp_path)
    with pytest.raises(InputError, match="format 'hdf5' is unknown"):
        fastsae.load(tmp_path, format="hdf5")
    with pytest.raises(InputError, match=r"takes no option\(s\) \['hookpoint'\]"):
        fastsae.load(tmp_path, hookpoint="layers.0")
    with pytest.raises(InputError, match="cannot save as 'openai'"):
        fastsae.formats.save(fastsae.StandardSAE(d_in=D, d_sae=N), tmp_path / "x", format="openai")
    with pytest.raises(InputError, match="cannot convert torch.nn.modules.linear.Linear"):
        convert.from_module(torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="does not exist"):
        fastsae.load(tmp_path / "nope")


def test_dtype_and_device_options(tmp_path):
    saelens_dir(tmp_path)
    sae = fastsae.load(tmp_path, dtype="float64", device="cpu")
    assert sae.W_enc.dtype == torch.float64 and sae.cfg.dtype == "float64"
    assert not sae.training  # foreign checkpoints are inference exports


def test_convert_command_line(tmp_path, capsys):
    from fastsae.cli import main

    np.savez(tmp_path / "params.npz", W_enc=np.random.randn(D, N).astype(np.float32),
             W_dec=np.random.randn(N, D).astype(np.float32), b_enc=np.zeros(N, np.float32),
             b_dec=np.ones(D, np.float32), threshold=np.full(N, 0.1, np.float32))
    assert main(["convert", str(tmp_path / "params.npz"), str(tmp_path / "out"), "--to", "saelens"]) == 0
    printed = capsys.readouterr().out
    assert "gemma_scope jumprelu SAE, d_in=8 d_sae=32" in printed and "as saelens" in printed
    x = torch.randn(5, D)
    torch.testing.assert_close(fastsae.load(tmp_path / "out")(x), fastsae.load(tmp_path)(x))
    assert detect_format(tmp_path / "out") == "saelens"
