"""Build driver: setuptools packages the Python code, CMakeLists.txt builds fastsae._C.

The extension links against the torch that is installed, so build without isolation:
    pip install --no-build-isolation .
"""

import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _torch_or_explain():
    try:
        import torch  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only on a broken install
        raise SystemExit(
            "fastsae builds a C++ extension against the installed torch, but torch is not "
            "importable here. Install torch first, then build without isolation:\n"
            "    pip install torch\n    pip install --no-build-isolation .\n"
            f"(import error: {e})"
        )
    return torch


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        torch = _torch_or_explain()
        import pybind11

        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(build_dir, exist_ok=True)

        with_cuda = bool(torch.version.cuda) and shutil.which("nvcc") is not None
        if os.environ.get("FASTSAE_NO_CUDA") == "1":
            with_cuda = False
        print(f"fastsae: building _C ({'CPU + CUDA' if with_cuda else 'CPU only'})", flush=True)

        cfg = [
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DFASTSAE_OUTPUT_DIR={out_dir}",
            f"-DFASTSAE_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            cfg.append("-GNinja")
        subprocess.check_call(["cmake", ROOT, *cfg], cwd=build_dir)
        jobs = str(os.cpu_count() or 2)
        subprocess.check_call(["cmake", "--build", build_dir, "--parallel", jobs], cwd=build_dir)


setup(
    ext_modules=[CMakeExtension("fastsae._C")],
    cmdclass={"build_ext": CMakeBuild},
)
