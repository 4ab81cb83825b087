"""The "triton" backend as the modules see it: registration, autograd against the reference
backend, the reference override, opcheck and a torch.compile smoke test."""

import pytest
import torch

import fastsae
from fastsae import ops
from fastsae.ops import reference
from fastsae.ops import triton as triton_ops
from helpers import sae_weights

pytestmark = pytest.mark.skipif(
    "triton" not in ops.available_backends("cuda" if torch.cuda.is_available() else "cpu"),
    reason=f"triton backend unavailable: {ops.load_errors().get('triton')}",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _pair(arch, D=20, N=70, k=5, seed=0):
    """The same SAE twice: one on the triton backend, one on the reference."""
    torch.manual_seed(seed)
    sae = fastsae.sae_class(arch)(d_in=D, d_sae=N, k=k, backend="triton", device=DEV)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    ref = fastsae.sae_class(arch)(d_in=D, d_sae=N, k=k, backend="reference", device=DEV)
    ref.load_state_dict(sae.state_dict())
    return sae, ref


def test_backend_registers_every_kernel_op():
    table = ops.implementation_table()
    for op in ("topk_encode", "batchtopk_encode", "threshold_encode", "sparse_decode"):
        assert table[op]["cuda"] == "triton", op
        assert ops.provider(op, "triton", DEV) == "triton", op
        assert ops.get(op, "triton") is not getattr(reference, op)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_training_step_matches_reference_backend(arch):
    sae, ref = _pair(arch)
    assert sae.backend == "triton" and ref.backend == "reference"
    x = torch.randn(11, 20, device=DEV)
    out, exp = sae.training_forward(x), ref.training_forward(x)
    torch.testing.assert_close(out.loss, exp.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.x_hat, exp.x_hat, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    exp.loss.backward()
    for (name, p), q in zip(sae.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_input_gradient_and_no_b_dec_on_input():
    torch.manual_seed(1)
    sae = fastsae.TopKSAE(d_in=12, d_sae=40, k=3, backend="triton", apply_b_dec_to_input=False, device=DEV)
    ref = fastsae.TopKSAE(d_in=12, d_sae=40, k=3, backend="reference", apply_b_dec_to_input=False, device=DEV)
    ref.load_state_dict(sae.state_dict())
    x = torch.randn(6, 12, device=DEV, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    sae(x).pow(2).sum().backward()
    ref(xr).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)


def test_batchtopk_inference_threshold_path():
    sae, ref = _pair("batchtopk", seed=2)
    x = torch.randn(9, 20, device=DEV)
    sae.training_forward(x)  # learns the threshold
    ref.threshold.copy_(sae.threshold)
    sae.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x, dense=True), ref.encode(x, dense=True), rtol=1e-5, atol=1e-5)


def test_reference_override(monkeypatch):
    monkeypatch.setenv("FASTSAE_BACKEND", "reference")
    sae = fastsae.TopKSAE(d_in=8, d_sae=16, k=2, device=DEV)  # backend "auto"
    assert sae.backend == "reference"


def test_float64_goes_to_the_next_backend():
    """The kernels accumulate in fp32: float64 is handed on along the device's chain."""
    x, W_enc, b_enc, b_dec, _ = sae_weights(4, 6, 20, dtype=torch.float64)
    v, i = triton_ops.topk_encode(x, W_enc, b_enc, b_dec, 3)
    rv, ri = reference.topk_encode(x, W_enc, b_enc, b_dec, 3)
    assert v.dtype == torch.float64 and torch.equal(i, ri)
    torch.testing.assert_close(v, rv)


def test_fire_counts_and_fused_relu_forward():
    x, W_enc, b_enc, b_dec, W_dec = sae_weights(8, 10, 30, seed=3)
    v, i, counts = triton_ops.topk_encode_with_counts(x, W_enc, b_enc, b_dec, 4)
    assert torch.equal(counts, torch.bincount(i[v > 0], minlength=30))
    r = triton_ops.relu_forward(x, W_enc, b_enc, b_dec, W_dec, b_dec)
    acts = reference.relu_encode(x, W_enc, b_enc, b_dec)
    torch.testing.assert_close(r.x_hat, reference.dense_decode(acts, W_dec, b_dec), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r.l1, (acts * W_dec.norm(dim=1)).sum(1), rtol=1e-4, atol=1e-4)
    th = torch.rand(30) * 2
    r = triton_ops.jumprelu_forward(x, W_enc, b_enc, b_dec, th, W_dec, b_dec)
    acts = reference.jumprelu_encode(x, W_enc, b_enc, b_dec, th, 1e-3)
    torch.testing.assert_close(r.x_hat, reference.dense_decode(acts, W_dec, b_dec), rtol=1e-4, atol=1e-4)


def test_opcheck_custom_ops():
    x, W_enc, b_enc, b_dec, W_dec = sae_weights(5, 16, 40, seed=4)
    W_enc.requires_grad_()
    torch.library.opcheck(torch.ops.fastsae_triton.topk_encode, (x, W_enc, b_enc, b_dec, 3))
    v = torch.randn(5, 3, requires_grad=True)
    i = torch.randint(0, 40, (5, 3))
    torch.library.opcheck(torch.ops.fastsae_triton.sparse_decode, (v, i, W_dec.requires_grad_(), b_dec))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])  # batchtopk: a data-dependent output width
def test_torch_compile_smoke(arch):
    sae, _ = _pair(arch, seed=5)
    x = torch.randn(7, 20, device=DEV)
    compiled = torch.compile(sae.training_forward, backend="aot_eager")
    out = compiled(x)
    out.loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(out.x_hat, sae(x), rtol=1e-5, atol=1e-5)
    assert sae.W_enc.grad is not None and bool(sae.W_enc.grad.abs().sum() > 0)
