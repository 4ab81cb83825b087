"""The native extension is built and its ops are registered."""

import torch

import fastsae


def test_extension_imports_and_reports_cuda():
    from fastsae import _C

    assert isinstance(_C.cuda_built(), bool)
    if not torch.version.cuda:
        assert _C.cuda_built() is False  # CUDA sources are skipped on a CPU-only torch


def test_cpp_backend_is_the_cpu_default():
    assert "cpp" in fastsae.ops.available_backends("cpu"), fastsae.ops.load_errors()
    assert fastsae.ops.resolve_backend("auto", "cpu") == "cpp"
    assert hasattr(torch.ops.fastsae, "sparse_decode")


def test_kernels_package_installed_as_fastsae_kernels():
    import fastsae.kernels

    assert fastsae.kernels.__file__.replace("\\", "/").endswith("kernels/__init__.py")
