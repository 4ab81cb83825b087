"""Download the cp312 wheels the GPU machine needs beyond what it has (python 3.12, torch 2.11,
triton 3.6, transformers 5.x and their dependencies): the peers of the step benchmark
(eai-sparsify, sae-lens) and whatever they need that is missing. Checks that the wheels fit
in the 55 MiB carried to the machine, or says which peer to leave out.

    python -m bench.gpu.wheels --out wheels          # make gpu-wheels

Resolution: breadth first from each peer, one wheel at a time (`pip download --no-deps` of the
newest release matching the requirement for Python 3.12 on manylinux x86_64, then its
Requires-Dist), skipping what the machine has (MACHINE_HAS: torch, triton, transformers 5 and
their dependencies). Not a full resolver: a conflict between two requirements is not looked for.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

BUDGET_MIB = 55.0
PEERS = {"sparsify": "eai-sparsify", "SAELens": "sae-lens"}
# On the GPU machine already: torch 2.11, triton 3.6, transformers 5.x and what they pull in.
MACHINE_HAS = {
    "torch", "triton", "transformers", "huggingface-hub", "tokenizers", "safetensors", "numpy", "pyyaml",
    "regex", "requests", "tqdm", "filelock", "fsspec", "packaging", "typing-extensions", "jinja2", "markupsafe",
    "networkx", "sympy", "mpmath", "setuptools", "certifi", "charset-normalizer", "idna", "urllib3", "hf-xet",
    "typer", "click", "shellingham", "rich", "markdown-it-py", "mdurl", "pygments", "httpx", "httpcore", "h11",
    "anyio", "sniffio",
}
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64", "--platform", "any", "--only-binary=:all:"]
ENV = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _fetch(req: str, out: Path) -> Path | None:
    """The wheel pip picks for `req` (no dependencies), downloaded into `out`; None when there
    is no wheel for the machine (sdist only: it cannot be built there without network)."""
    before = set(out.glob("*.whl"))
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(out),
                           *PLATFORM, req], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    new = set(out.glob("*.whl")) - before
    if new:
        return new.pop()
    name = _norm(Requirement(req).name).replace("-", "_")
    return next(w for w in out.glob("*.whl") if _norm(w.name.split("-")[0]) == _norm(name))  # already there


def _requires(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines()
            if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(ENV)]


def closure(dist: str, out: Path, missing: list[str]) -> dict[str, float]:
    """name -> MiB of every wheel `dist` needs beyond MACHINE_HAS; requirements without a
    wheel for the machine are appended to `missing`."""
    sizes: dict[str, float] = {}
    todo = [Requirement(dist)]
    while todo:
        req = todo.pop(0)
        name = _norm(req.name)
        if name in MACHINE_HAS or name in sizes or str(req) in missing:
            continue
        wheel = _fetch(str(req).split(";")[0], out)
        if wheel is None:
            missing.append(str(req))
            continue
        sizes[name] = wheel.stat().st_size / 2**20
        todo += _requires(wheel)
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="wheels")
    p.add_argument("--budget-mib", type=float, default=BUDGET_MIB)
    p.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    missing: dict[str, list[str]] = {peer: [] for peer in a.peers}
    sizes = {peer: closure(PEERS[peer], out, missing[peer]) for peer in a.peers}
    for peer, reqs in missing.items():
        if reqs:
            print(f"{peer}: no cp312 wheel for {', '.join(reqs)} (sdist only or absent): "
                  "install fails offline unless the peer works without it")
    total = sum({k: v for d in sizes.values() for k, v in d.items()}.values())  # shared wheels once
    for peer, dists in sizes.items():
        print(f"{peer}: {sum(dists.values()):.1f} MiB for " + ", ".join(f"{k} {v:.1f}" for k, v in dists.items()))
    print(f"total: {total:.1f} MiB of {a.budget_mib:.0f} MiB in {out}/")
    if total <= a.budget_mib:
        return 0
    # which peer to leave out: the one whose own wheels (not shared with the other) weigh most
    own = {peer: sum(v for k, v in d.items() if all(k not in o for q, o in sizes.items() if q != peer))
           for peer, d in sizes.items()}
    drop = max(own, key=own.get)
    print(f"over budget: leave out {drop} ({own[drop]:.1f} MiB of its own), "
          f"which leaves {total - own[drop]:.1f} MiB")
    return 1


if __name__ == "__main__":
    sys.exit(main())
