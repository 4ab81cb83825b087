"""Bad input raises an error that names the problem and the fix."""

import pytest
import torch

import fastsae
from fastsae import ConfigError, InputError


@pytest.fixture
def sae():
    return fastsae.TopKSAE(d_in=8, d_sae=16, k=2)


def test_wrong_last_dimension(sae):
    with pytest.raises(InputError, match=r"last dimension 5 .*d_in=8.*\[\.\.\., 8\]"):
        sae.encode(torch.randn(3, 5))
    with pytest.raises(InputError, match="a scalar"):
        sae(torch.tensor(1.0))


@pytest.mark.parametrize("k", [0, -1, 17])
def test_k_out_of_range(k):
    with pytest.raises(ConfigError, match=rf"k={k} is out of range.*1 <= k <= d_sae=16"):
        fastsae.TopKSAE(d_in=8, d_sae=16, k=k)


def test_k_missing_for_topk():
    with pytest.raises(ConfigError, match="needs k"):
        fastsae.BatchTopKSAE(d_in=8, d_sae=16)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input(sae, dtype):
    with pytest.raises(InputError, match=rf"dtype {dtype}.*floating-point.*x.to\(torch.float32\)"):
        sae(torch.zeros(2, 8, dtype=dtype))


def test_non_tensor_input(sae):
    with pytest.raises(InputError, match="must be a torch.Tensor, got list"):
        sae([[0.0] * 8])


def test_device_mismatch(sae):
    x = torch.empty(2, 8, device="meta")  # any device other than the SAE's
    with pytest.raises(InputError, match=r"x is on meta but the SAE is on cpu.*x.to\('cpu'\)"):
        sae.encode(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_detected(sae, bad):
    x = torch.randn(4, 8)
    x[2, 3] = bad
    with pytest.raises(InputError, match=r"1 NaN/inf value\(s\) out of 32.*check_finite=False"):
        sae(x)
    with pytest.raises(InputError, match="NaN/inf"):
        sae.training_forward(x)


def test_check_finite_can_be_disabled():
    sae = fastsae.StandardSAE(d_in=8, d_sae=16, check_finite=False)
    x = torch.randn(4, 8)
    x[0, 0] = float("nan")
    assert torch.isnan(sae(x)[0]).any()  # documented: no check, NaN propagates


def test_bad_config_values():
    with pytest.raises(ConfigError, match="unknown architecture 'abstopk'"):
        fastsae.SAEConfig(d_in=8, d_sae=16, architecture="abstopk")
    with pytest.raises(ConfigError, match="d_sae must be a positive integer"):
        fastsae.StandardSAE(d_in=8, d_sae=0)
    with pytest.raises(ConfigError, match="not a floating torch dtype"):
        fastsae.StandardSAE(d_in=8, d_sae=16, dtype="int8")
    with pytest.raises(ConfigError, match="backend 'cuda' is unknown"):
        fastsae.StandardSAE(d_in=8, d_sae=16, backend="cuda")


def test_unavailable_backend_is_explained(monkeypatch):
    fastsae.ops.available_backends()  # load the backends, then hide triton from the CPU
    monkeypatch.setitem(fastsae.ops._devices, "triton", {"cuda"})
    sae = fastsae.TopKSAE(d_in=8, d_sae=16, k=2, backend="triton")
    with pytest.raises(ConfigError, match="backend 'triton' is not available on cpu.*backend='reference'"):
        sae(torch.randn(2, 8))


def test_decode_wrong_width(sae):
    with pytest.raises(InputError, match=r"dense tensor \[\.\.\., d_sae=16\], got \(2, 15\)"):
        sae.decode(torch.randn(2, 15))


@pytest.mark.parametrize("bad", [16, -1])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_decode_latent_id_out_of_range(backend, bad):
    """Checked before any backend runs: the GPU kernels would read outside W_dec."""
    if backend not in fastsae.ops.available_backends(torch.device("cpu")):
        pytest.skip(f"backend {backend} is not built here")
    sae = fastsae.TopKSAE(d_in=8, d_sae=16, k=2, backend=backend)
    acts = fastsae.SparseActs(torch.ones(3, 2), torch.tensor([[0, 1], [2, bad], [4, 5]]), 16)
    with pytest.raises(InputError, match=rf"latent ids from {min(bad, 0)} to {max(bad, 5)}.*latents are 0\.\.15"):
        sae.decode(acts)


def test_architecture_mismatch_between_class_and_config():
    cfg = fastsae.SAEConfig(d_in=8, d_sae=16, architecture="standard")
    with pytest.raises(InputError, match="TopKSAE needs architecture='topk'.*sae_class"):
        fastsae.TopKSAE(cfg)
