"""Download the cp312 wheels the GPU machine needs beyond what it has (python 3.12, torch 2.11,
triton 3.6, transformers 5.x and their dependencies): the peers of the step benchmark
(eai-sparsify, sae-lens) and whatever they need that is missing. Checks that the wheels fit
in the 55 MiB carried to the machine, or says which peer to leave out.

    python -m bench.gpu.wheels --out wheels          # make gpu-wheels

Resolution: pip's own resolver (`pip install --dry-run --report`) for Python 3.12 on
manylinux x86_64, with the machine's torch/triton/transformers pinned, then every resolved
distribution the machine does not already have is downloaded without dependencies.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BUDGET_MIB = 55.0
PEERS = {"sparsify": "eai-sparsify", "SAELens": "sae-lens"}
# On the GPU machine already (with their own dependencies): pinned during resolution, never downloaded.
MACHINE = ["torch==2.11.0", "triton==3.6.0", "transformers>=5,<6"]
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64", "--only-binary=:all:"]


def _resolve(reqs: list[str]) -> list[dict]:
    """pip's resolution of `reqs` for the GPU machine: [{name, version, url}]."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--target", str(Path(tmp) / "t"), "--report", str(report), *PLATFORM, *reqs]
        subprocess.run(cmd, check=True)
        items = json.loads(report.read_text())["install"]
    return [{"name": i["metadata"]["name"].lower().replace("_", "-"), "version": i["metadata"]["version"],
             "url": i["download_info"]["url"]} for i in items]


def _machine_has() -> set[str]:
    """Distributions the machine has: the pinned ones and everything they pull in."""
    return {d["name"] for d in _resolve(MACHINE)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="wheels")
    p.add_argument("--budget-mib", type=float, default=BUDGET_MIB)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    have = _machine_has()
    sizes: dict[str, dict[str, float]] = {}
    for peer, dist in PEERS.items():
        need = [d for d in _resolve([*MACHINE, dist]) if d["name"] not in have]
        sizes[peer] = {}
        for d in need:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(out),
                            *PLATFORM, f"{d['name']}=={d['version']}"], check=True)
            wheel = next(out.glob(f"{d['name'].replace('-', '_')}-{d['version']}-*.whl"), None) or \
                next(out.glob(f"{d['name']}-{d['version']}-*.whl"), None)
            sizes[peer][d["name"]] = wheel.stat().st_size / 2**20 if wheel else float("nan")
    total = sum(f.stat().st_size for f in out.glob("*.whl")) / 2**20
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
