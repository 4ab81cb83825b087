"""Build driver: setuptools packages the Python code, CMakeLists.txt builds fastsae._C.

The extension must link against the torch installed in the target environment. With
`pip install --no-build-isolation .` that torch is importable here; with plain
`pip install .` pip hides it behind an isolated build environment, so we ask the
target interpreter itself (sys.executable, without pip's path overlay) where it is.
"""

import json
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


_TORCH_PROBE = (
    "import json, torch, torch.utils; "
    "print(json.dumps({'cmake_prefix_path': torch.utils.cmake_prefix_path, "
    "'cuda': torch.version.cuda, 'version': torch.__version__}))"
)


def _installed_torch() -> dict:
    """cmake path and CUDA version of the torch that fastsae will run with."""
    try:
        import torch
        import torch.utils

        return {"cmake_prefix_path": torch.utils.cmake_prefix_path, "cuda": torch.version.cuda,
                "version": torch.__version__}
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    probe = subprocess.run([sys.executable, "-c", _TORCH_PROBE], env=env, capture_output=True, text=True)
    if probe.returncode == 0:
        return json.loads(probe.stdout.strip().splitlines()[-1])
    raise SystemExit(
        "fastsae builds a C++ extension against the installed torch, but no torch was found "
        f"for {sys.executable}. Install torch first, then fastsae:\n"
        "    pip install torch\n    pip install --no-build-isolation .\n"
        f"(probe said: {probe.stderr.strip()[-500:]})"
    )


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        torch_info = _installed_torch()
        import pybind11

        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(build_dir, exist_ok=True)

        with_cuda = bool(torch_info["cuda"]) and shutil.which("nvcc") is not None
        if os.environ.get("FASTSAE_NO_CUDA") == "1":
            with_cuda = False
        kind = "CPU + CUDA" if with_cuda else "CPU only"
        print(f"fastsae: building _C ({kind}) against torch {torch_info['version']}", flush=True)

        cfg = [
            f"-DCMAKE_PREFIX_PATH={torch_info['cmake_prefix_path']};{pybind11.get_cmake_dir()}",
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
