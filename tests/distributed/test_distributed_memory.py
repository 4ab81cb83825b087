"""The memory model's static part (parameters, gradients, optimizer state, fp32 masters) is
the byte count of the real tensors after a training step; widest_d_sae inverts it."""

from __future__ import annotations

import pytest
import torch

import fastsae
from fastsae.distributed import ParallelLayout, ShardedSAE
from fastsae.distributed.memory import estimate, table, widest_d_sae
from fastsae.optim import DenseAdam, RowSparseAdam


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return _nbytes(v for st in opt.state.values() for name, v in st.items() if name != "step")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_dense_adam_bytes_match_the_model(dtype, arch):
    kw = {"k": 4} if arch == "topk" else {}
    cfg = fastsae.SAEConfig(d_in=12, d_sae=50, architecture=arch, dtype=dtype, **kw)
    sae = ShardedSAE(cfg, ParallelLayout(replicas=1, shards=3, rank=0))  # the widest shard: 17 latents
    opt = DenseAdam(dict(sae.named_parameters()), lr=1e-3)
    sae.training_forward(torch.randn(8, 12).to(sae.dtype)).loss.backward()
    opt.step()  # leaves the masters' fp32 gradients in place, as at the peak
    est = estimate(12, 50, dtype, "adam", shards=3, architecture=arch, fused_encode=False)  # the autograd path
    masters = [m for n, m in opt.master.items() if m is not opt.params[n]]
    assert _nbytes(sae.parameters()) == est.parameters
    assert _nbytes(p.grad for p in sae.parameters()) + _nbytes(m.grad for m in masters) == est.gradients
    assert _state_bytes(opt.opt) == est.optimizer
    assert _nbytes(masters) == est.masters


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_row_sparse_adam_bytes_match_the_model(dtype):
    cfg = fastsae.SAEConfig(d_in=12, d_sae=50, architecture="topk", k=4, dtype=dtype)
    sae = ShardedSAE(cfg, ParallelLayout(replicas=1, shards=3, rank=0))
    opt = RowSparseAdam(sae.local_view(), lr=1e-3)
    est = estimate(12, 50, dtype, "row_sparse_adam", shards=3)
    assert _nbytes(sae.parameters()) == est.parameters
    assert opt.state_nbytes() == {"moments": est.optimizer, "masters": est.masters}


def test_widest_d_sae_is_the_largest_that_fits():
    n = widest_d_sae(4096, 80, gpus=8, dtype="bfloat16", optimizer="adam")
    budget = (80 - 4) * 2**30
    assert n % (1024 * 8) == 0 and n > 0
    assert estimate(4096, n, "bfloat16", "adam", shards=8).total <= budget
    assert estimate(4096, n + 1024 * 8, "bfloat16", "adam", shards=8).total > budget
    # sharding over more GPUs fits proportionally more latents; row-sparse Adam saves the gradients
    assert widest_d_sae(4096, 80, gpus=64, dtype="bfloat16") > 7 * n
    assert widest_d_sae(4096, 80, gpus=8, dtype="bfloat16", optimizer="row_sparse_adam") > n
    assert "| 4096 | bfloat16 | adam | fp32 | fp32 |" in table(d_ins=(4096,))
