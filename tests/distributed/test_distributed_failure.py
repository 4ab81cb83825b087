"""A rank that dies or stalls mid-step makes the others stop with a clear error, not hang.

Collective timeouts are set short here (a few seconds); the launcher would kill any rank
still running long after, and the tests check that it did not need to for the survivors.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

import fastsae
from fastsae.distributed import ShardedSAE, build_layout, launch
from fastsae.errors import ConfigError


def _model_and_batch():
    layout = build_layout()  # every rank a shard of one replica
    cfg = fastsae.SAEConfig(d_in=8, d_sae=24, architecture="topk", k=4)
    torch.manual_seed(0)
    return ShardedSAE(cfg, layout, seed=0), torch.randn(16, 8), layout


def dying_worker(victim: int, where: str):
    """Rank `victim` exits abruptly in the middle of a training step (`where`: before the
    reconstruction all_reduce, or before the backward); the others carry on with the step."""
    sae, x, layout = _model_and_batch()
    if layout.rank == victim and where == "forward":
        sae.finish_decode = lambda partial: os._exit(17)  # dies between the gather and the sum
    out = sae.training_forward(x)
    if layout.rank == victim and where == "backward":
        os._exit(17)
    out.loss.backward()
    return "finished"


def stalling_worker(victim: int):
    sae, x, layout = _model_and_batch()
    if layout.rank == victim:
        time.sleep(120)  # alive but stuck: only the collective timeout can notice
    return float(sae.training_forward(x).loss)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_rank_dying_mid_step_stops_the_others_with_a_clear_error(where):
    results = launch(dying_worker, 3, (1, where), timeout_s=90, collective_timeout_s=20, grace_s=40)
    assert results[1].exitcode == 17
    for r in (results[0], results[2]):
        assert not r.killed, f"rank {r.rank} hung and had to be killed"
        assert r.exitcode == 1
        assert r.error.startswith(f"DistributedError: rank {r.rank}: "), r.error
        assert "Another rank has most likely exited or stalled" in r.error
        assert "restart from the last checkpoint" in r.error
    # at least one survivor names the collective it was in when the peer vanished
    what = "partial reconstructions" if where == "forward" else "encoder input's gradient"
    assert any(what in r.error for r in (results[0], results[2])), [r.error for r in results]


def test_stalled_rank_times_out_instead_of_hanging():
    results = launch(stalling_worker, 2, (1,), timeout_s=60, collective_timeout_s=1, grace_s=1)
    survivor, stuck = results
    assert not survivor.killed and survivor.exitcode == 1
    assert survivor.error.startswith("DistributedError: rank 0: all_gather of the top-k candidate values failed")
    assert "wait at most 1 s" in survivor.error
    assert stuck.killed  # the launcher, not the stuck rank, ended it


def test_layout_must_divide_the_ranks():
    from fastsae.distributed.groups import resolve_sizes

    assert resolve_sizes(8) == (1, 8)
    assert resolve_sizes(8, shards=2) == (4, 2)
    assert resolve_sizes(8, replicas=2) == (2, 4)
    with pytest.raises(ConfigError, match="shards=3 does not divide the 8 ranks"):
        resolve_sizes(8, shards=3)
    with pytest.raises(ConfigError, match=r"replicas=2 × shards=2 = 4, but 8 ranks"):
        resolve_sizes(8, shards=2, replicas=2)


def dying_trainer_worker(root: str):
    """Rank 1 exits in its third optimizer step of Trainer.fit (1 replica x 3 shards)."""
    from fastsae.trainer import TrainConfig, Trainer

    layout = build_layout()
    cfg = TrainConfig(sae=fastsae.SAEConfig(d_in=8, d_sae=24, architecture="topk", k=4), steps=10, batch_size=16,
                      b_dec_init="zeros", log_every=1, checkpoint_every=0, out_dir=root, progress=False,
                      console=False, plot=False)
    trainer = Trainer(cfg, torch.randn(96, 8, generator=torch.Generator().manual_seed(0)), layout=layout)
    if layout.rank == 1:
        step, calls = trainer.opt.step_row_sparse, []

        def dying_step(*args):
            calls.append(1)
            if len(calls) == 3:
                os._exit(17)
            step(*args)

        trainer.opt.step_row_sparse = dying_step
    trainer.fit()
    return "finished"


def test_rank_dying_mid_fit_stops_the_trainer_on_every_rank(tmp_path):
    results = launch(dying_trainer_worker, 3, (str(tmp_path),), timeout_s=90, collective_timeout_s=20, grace_s=40)
    assert results[1].exitcode == 17
    for r in (results[0], results[2]):
        assert not r.killed, f"rank {r.rank} hung and had to be killed"
        assert r.exitcode == 1 and r.error.startswith(f"DistributedError: rank {r.rank}: "), r.error
    assert not (tmp_path / "final").exists()
