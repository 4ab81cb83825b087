"""fastsae.ops dispatch: per-device fallback chains (CUDA: triton -> cpp -> reference; CPU:
cpp -> reference), checked on CPU with fake registrations where a backend is not built here."""

import pytest
import torch

from fastsae import ops
from fastsae.errors import ConfigError
from fastsae.ops import reference


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry: fake registrations vanish after the test."""
    ops.available_backends()  # load the real backends first
    monkeypatch.setattr(ops, "_impls", {op: dict(impls) for op, impls in ops._impls.items()})
    monkeypatch.setattr(ops, "_op_devices", {key: set(devs) for key, devs in ops._op_devices.items()})
    monkeypatch.setattr(ops, "_devices", {b: set(devs) for b, devs in ops._devices.items()})
    return ops


def _fake(name):
    def fn(*args, **kwargs):
        return name
    fn.__name__ = name
    return fn


def _clear(registry, backend):
    """Forget everything `backend` registered (as if it were not built)."""
    for op in registry._impls:
        registry._impls[op].pop(backend, None)
        registry._op_devices.pop((op, backend), None)
    registry._devices.pop(backend, None)


def test_chains_per_device():
    assert ops.chain("cuda") == ("triton", "cpp", "reference")
    assert ops.chain("cpu") == ("cpp", "reference")
    assert ops.chain("cuda", "cpp") == ("cpp", "reference")
    assert ops.chain("cpu", "triton") == ("triton", "cpp", "reference")  # the interpreter on CPU
    assert ops.chain("cuda", "reference") == ("reference",)
    assert ops.chain("meta") == ("reference",)
    with pytest.raises(ConfigError, match="backend 'cuda' is unknown"):
        ops.chain("cpu", "cuda")


def test_missing_op_falls_to_the_next_backend_not_the_reference(registry):
    """The default CUDA step: Triton encoder + the C++ backward, even with triton first."""
    _clear(registry, "triton")
    _clear(registry, "cpp")
    registry.register("topk_encode", "triton", devices=("cuda",))(_fake("triton_encode"))
    registry.register("sparse_decode", "triton", devices=("cuda",))(_fake("triton_decode"))
    registry.register("topk_sae_backward", "cpp", devices=("cpu", "cuda"))(_fake("cpp_backward"))
    registry.register("topk_encode", "cpp", devices=("cpu",))(_fake("cpp_encode"))
    assert registry.get("topk_sae_backward", "triton", "cuda")() == "cpp_backward"
    assert registry.get("topk_sae_backward", "triton")() == "cpp_backward"  # as modules call it today
    assert registry.get("topk_encode", "triton", "cuda")() == "triton_encode"
    # cpp has no CUDA encoder: on CUDA its chain continues to the reference
    assert registry.get("topk_encode", "cpp", "cuda") is reference.topk_encode
    assert registry.get("topk_encode", "cpp", "cpu")() == "cpp_encode"
    assert registry.get("relu_encode", "triton", "cuda") is reference.relu_encode
    table = registry.implementation_table()
    assert table["topk_sae_backward"] == {"cuda": "cpp", "cpu": "cpp"}
    assert table["topk_encode"] == {"cuda": "triton", "cpu": "cpp"}
    assert table["sparse_decode"] == {"cuda": "triton", "cpu": "reference"}
    assert table["relu_encode"] == {"cuda": "reference", "cpu": "reference"}
    assert registry.implementation_table("cpp")["topk_encode"] == {"cuda": "reference", "cpu": "cpp"}
    assert registry.implementation_table("reference")["topk_sae_backward"] == {"cuda": "reference",
                                                                               "cpu": "reference"}
    assert "| topk_sae_backward | cpp | cpp |" in registry.format_implementation_table()


def test_without_cpp_the_cuda_backward_is_the_reference(registry):
    _clear(registry, "cpp")
    assert registry.provider("topk_sae_backward", "triton", "cuda") == "reference"
    assert registry.get("topk_sae_backward", "triton") is reference.topk_sae_backward


def test_next_impl_is_the_next_backend_of_the_device_chain(registry):
    _clear(registry, "cpp")
    registry.register("topk_encode", "cpp", devices=("cpu",))(_fake("cpp_encode"))
    assert registry.next_impl("topk_encode", "triton", "cpu")() == "cpp_encode"
    assert registry.next_impl("topk_encode", "triton", "cuda") is reference.topk_encode
    assert registry.next_impl("topk_encode", "cpp", "cpu") is reference.topk_encode
    assert registry.next_impl("topk_encode", "reference", "cpu") is reference.topk_encode


def test_auto_resolution_follows_the_chain(registry, monkeypatch):
    monkeypatch.delenv("FASTSAE_BACKEND", raising=False)
    _clear(registry, "cpp")
    _clear(registry, "triton")
    assert registry.resolve_backend("auto", "cpu") == "reference"
    assert registry.resolve_backend(None, "cuda") == "reference"
    registry.register("sparse_decode", "cpp", devices=("cpu", "cuda"))(_fake("cpp_decode"))
    assert registry.resolve_backend("auto", "cuda") == "cpp"
    registry.register("topk_encode", "triton", devices=("cuda",))(_fake("triton_encode"))
    assert registry.resolve_backend("auto", "cuda") == "triton"
    assert registry.resolve_backend("auto", "cpu") == "cpp"
    assert registry.available_backends("cuda") == ["reference", "cpp", "triton"]
    with pytest.raises(ConfigError, match="backend 'triton' is not available on cpu"):
        registry.resolve_backend("triton", "cpu")


def test_real_registrations_on_this_machine():
    """What this build resolves to: CPU uses cpp where built; the CUDA column follows what is
    registered (a CPU-only build of fastsae._C has no CUDA kernels, so the CUDA backward
    shows the reference here and the cpp backend on a CUDA build)."""
    table = ops.implementation_table()
    cpp_ok = "cpp" in ops.available_backends("cpu")
    assert table["topk_sae_backward"]["cpu"] == ("cpp" if cpp_ok else "reference")
    if "triton" not in ops.load_errors():
        assert table["topk_encode"]["cuda"] == "triton"
        assert table["sparse_decode"]["cuda"] == "triton"
        from fastsae import _C
        want = "cpp" if _C.cuda_built() else "reference"
        assert table["topk_sae_backward"]["cuda"] == want


def test_triton_hands_unsupported_dtypes_to_the_next_backend():
    """float64 (the kernels accumulate in fp32): triton's op hands it on along the CPU chain."""
    if "triton" not in ops.available_backends("cpu"):
        pytest.skip("the triton backend runs on CPU only under TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(0)
    x, W, b = (torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(8, 20, generator=g,
               dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64))
    v, i = ops.get("topk_encode", "triton")(x, W, b, None, 4)
    rv, ri = reference.topk_encode(x, W, b, None, 4)
    assert v.dtype == torch.float64
    torch.testing.assert_close(v, rv)
    assert torch.equal(i.sort(1).values, ri.sort(1).values)
