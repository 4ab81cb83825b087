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


def test_cuda_sources_compile_with_nvcc(tmp_path):
    """The CUDA half of the extension (csrc/*.cu, and the C++ files with FASTSAE_WITH_CUDA on)
    compiles for sm_90 against this torch's headers, where nvcc is installed, even though a
    CPU-only torch does not build it: a type error there would otherwise first show on a GPU
    machine. A compile check only: the kernels run in the GPU suite. The one header a CPU
    wheel lacks (CMake-generated build macros) is stubbed."""
    import shutil
    import subprocess
    import sysconfig
    from pathlib import Path

    import pytest

    nvcc = shutil.which("nvcc")
    include = Path(torch.__file__).parent / "include"
    if nvcc is None or not (include / "c10" / "cuda" / "CUDAGuard.h").exists():
        pytest.skip("needs nvcc and torch's c10/cuda headers")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    csrc = Path(__file__).resolve().parents[2] / "csrc"
    flags = ["-std=c++17", f"-I{tmp_path}", f"-I{include}", f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
             f"-I{sysconfig.get_paths()['include']}", f"-I{csrc}", "-DFASTSAE_WITH_CUDA=1",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    sources = sorted(csrc.glob("*.cu")) + [csrc / "module.cpp", csrc / "sparse_ops.cpp"]
    assert len(sources) >= 3
    for src in sources:
        cmd = [nvcc, *flags, "-c", str(src), "-o", str(tmp_path / (src.name + ".o"))]
        if src.suffix == ".cu":
            cmd[1:1] = ["-arch=sm_90"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"{src.name}:\n{out.stderr[-3000:]}"
