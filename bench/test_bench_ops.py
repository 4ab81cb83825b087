"""pytest-benchmark suites for the ops of every implementation (`pytest bench/`; the default
test run collects tests/ only). Benchmarks never assert times.

    pytest bench/ --benchmark-columns=median,iqr,rounds --benchmark-sort=name
    pytest bench/ -k "step and fastsae"          # one op, one library

Shape: CUDA d_in=768, d_sae=2^17, k=32, B=4096; CPU d_in=256, d_sae=2^14, k=32, B=1024.
A peer that cannot run here is skipped with its reason. Unlike `python -m bench`, everything
runs in this one process, so there are no peak-memory numbers here.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench import peers
from bench.timing import synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = (peers.Shape(768, 2**17, 32, 4096) if DEVICE.type == "cuda" else peers.Shape(256, 2**14, 32, 1024))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
IMPLS = [n for n in peers.names()]
OPS = ("gemm", "encode", "decode", "backward", "step", "step_row_sparse_adam")

_built: dict[str, tuple] = {}


def _ops_of(name: str):
    """The adapter's ops on SHAPE, built once per implementation for the whole session."""
    if name not in _built:
        why = peers.adapter_class(name).unavailable(DEVICE)
        if why:
            pytest.skip(why)
        adapter = peers.build(name, SHAPE, DEVICE, torch.float32)
        x = peers.make_batch(SHAPE, DEVICE, torch.float32)
        _built[name] = (adapter, adapter.ops(x))
    return _built[name][1]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", IMPLS)
def test_op(benchmark, impl, op):
    ops = _ops_of(impl)
    if op not in ops:
        pytest.skip(f"{impl} has no {op}")
    case = ops[op]
    benchmark.group = op
    benchmark.extra_info.update(SHAPE.to_dict(), device=str(DEVICE))
    if isinstance(case, tuple):
        setup, run = case

        def go(state):
            run(state)
            synchronize(DEVICE)
        benchmark.pedantic(go, setup=lambda: ((setup(),), {}), rounds=ROUNDS, warmup_rounds=1)
    else:
        def go():
            case()
            synchronize(DEVICE)
        benchmark.pedantic(go, rounds=ROUNDS, warmup_rounds=1)
