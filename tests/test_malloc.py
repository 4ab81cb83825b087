"""fastsae.keep_freed_memory: where glibc's malloc is in use, a loop that keeps freeing and
reallocating a few MB no longer page-faults every iteration; elsewhere, and when turned off,
nothing changes."""

import os
import subprocess
import sys

import pytest

import fastsae
from fastsae import malloc

# Two 1.5 MB tensors alive at once, freed, reallocated: glibc, left to adapt its thresholds,
# usually returns the memory to the OS every iteration and faults it back (whether it does
# depends on the process's history). "unkept" pins the thresholds where it always does.
LOOP = """
import ctypes, resource, sys, torch
import fastsae
applied = None
if sys.argv[1] == "keep":
    applied = fastsae.keep_freed_memory()
elif sys.argv[1] == "unkept":
    libc = ctypes.CDLL(None)
    assert libc.mallopt(-3, 128 << 10) == 1 and libc.mallopt(-1, 0) == 1
x, y = torch.randn(1024, 384), torch.randn(1024, 384)
def step():
    a = x - y
    b = a * 2.0
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))
for _ in range(20):
    step()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 200)
"""


def run_loop(mode: str, **env) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()
    return applied, float(faults)


needs_glibc = pytest.mark.skipif(malloc._glibc() is None, reason="glibc's malloc only (Linux with glibc)")


@needs_glibc
def test_kept_memory_ends_the_per_step_page_faults():
    applied, faults = run_loop("keep")
    assert applied == "True" and faults < 10
    # the loop does show faults where freed memory goes back to the OS
    assert run_loop("unkept")[1] > 100


@needs_glibc
def test_turned_off_by_the_environment_variable():
    assert run_loop("keep", FASTSAE_KEEP_FREED_MEMORY="0")[0] == "False"


def test_does_nothing_without_glibc(monkeypatch):
    monkeypatch.setattr(malloc, "_applied", None)
    monkeypatch.setattr(malloc, "_glibc", lambda: None)
    assert fastsae.keep_freed_memory() is False


def test_the_trainer_keeps_freed_memory(tmp_path, monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr("fastsae.trainer.keep_freed_memory", lambda: calls.append(1))
    cfg = fastsae.TrainConfig(sae=fastsae.SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2), steps=1,
                              batch_size=4, out_dir=str(tmp_path), progress=False, console=False, plot=False)
    fastsae.Trainer(cfg, torch.randn(16, 8))
    assert calls == [1]
