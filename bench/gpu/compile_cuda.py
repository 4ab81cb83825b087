"""Compile csrc/*.cu for a GPU target with nvcc against the installed torch's headers, without a
GPU or a CUDA build of torch: catches CUDA-only compile errors of the C++ extension on a CPU
machine, and prints ptxas's registers and spills per kernel. Object files only (nothing links:
a CPU torch has no CUDA libraries).

    python -m bench.gpu.compile_cuda [--arch 90] [--out FILE]      # make cuda-compile-check

A CPU wheel of torch ships the c10/cuda headers but not the one CMake generates
(c10/cuda/impl/cuda_cmake_macros.h): a stand-in defining what a shared-library build defines
is written to a temporary include directory.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _demangle(symbol: str) -> str:
    """`fastsae::(anonymous)::kernel<T>` from the mangled name (c++filt where there is one)."""
    if shutil.which("c++filt"):
        name = subprocess.run(["c++filt", symbol], capture_output=True, text=True).stdout.strip()
        name = name.replace("fastsae::(anonymous namespace)::", "")
        return re.sub(r"\(.*\)$", "", name)  # drop the parameter list
    return symbol


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--out")
    a = p.parse_args(argv)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("nvcc not found: install the CUDA toolkit to compile csrc/*.cu", file=sys.stderr)
        return 2
    import torch.utils.cpp_extension as ext

    lines, failures = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        stub = Path(tmp) / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes = [f"-I{tmp}", *(f"-I{d}" for d in ext.include_paths()), f"-I{REPO / 'csrc'}"]
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
        lines.append(f"# nvcc {version}, sm_{a.arch}, object files only (no GPU, CPU torch headers)")
        for src in sorted((REPO / "csrc").glob("*.cu")):
            cmd = [nvcc, "-std=c++17", f"-arch=sm_{a.arch}", "-c", str(src), "-o", str(Path(tmp) / "o.o"),
                   *includes, "-DFASTSAE_WITH_CUDA=1", "-O3", "-diag-suppress", "3306", "-Xptxas", "-v"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            text = proc.stdout + proc.stderr
            errors = [ln for ln in text.splitlines() if " error" in ln or ln.startswith("error")]
            entry = None
            for ln in text.splitlines():
                m = re.search(r"Compiling entry function '(\S+)'", ln)
                if m:
                    entry = _demangle(m.group(1))
                m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ln)
                if m and entry:
                    lines.append(f"{src.name}: {entry}: stack {m.group(1)} B, spills {m.group(2)}/{m.group(3)} B")
                m = re.search(r"Used (\d+) registers", ln)
                if m and entry:
                    lines[-1] += f", {m.group(1)} registers"
                    entry = None
            ok = proc.returncode == 0
            failures += not ok
            why = "" if ok else ": " + " | ".join(errors[:5])
            lines.append(f"{src.name}: {'compiled' if ok else 'FAILED'}{why}")
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")
    return failures


if __name__ == "__main__":
    sys.exit(main())
