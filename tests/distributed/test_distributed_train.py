"""The one Trainer, run on every rank of a replicas x shards layout, against itself on one process.

Same data, same initial weights: after 6 steps the shards hold the single-process weights
(float64; 1e-6 absolute, the losses are accumulated in float32 in both). AuxK is on where
the layout has one replica; with replicas it is normalised by each replica's residual
variance, so the data-parallel cases switch it off to compare exactly. shards = 1 with
2 replicas trains the plain (unsharded) module data-parallel.
"""

from __future__ import annotations

import json

import pytest
import torch

import fastsae
from fastsae.data import TensorSource
from fastsae.distributed import ShardedSAE, build_layout, launch
from fastsae.errors import ConfigError
from fastsae.sae import latent_slice, sae_class
from fastsae.trainer import TrainConfig, Trainer

TOL = 1e-6
# (architecture, optimizer, shards, world size, AuxK coefficient)
CASES = [("topk", "adam", 2, 2, 1 / 32), ("topk", "row_sparse_adam", 2, 2, 1 / 32),
         ("batchtopk", "adam", 2, 2, 1 / 32), ("jumprelu", "adam", 2, 2, 0.0)]
DP_CASES = [("topk", "row_sparse_adam", 2, 4, 0.0), ("standard", "adam", 2, 4, 0.0),
            ("topk", "adam", 1, 4, 0.0)]


def train_config(arch, opt, aux, out, batch_size=16, steps=6):
    kw = {"k": 3} if sae_class(arch).needs_k else {}
    sae = fastsae.SAEConfig(d_in=6, d_sae=20, architecture=arch, dtype="float64", **kw)
    return TrainConfig(sae=sae, steps=steps, batch_size=batch_size, lr=1e-2, optimizer=opt, b_dec_init="zeros",
                       auxk_coefficient=aux, dead_tokens=16, k_aux=4, log_every=2, checkpoint_every=3,
                       out_dir=str(out), progress=False, console=False, plot=False)


def activations():
    return torch.randn(96, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def initial_sae(cfg):
    torch.manual_seed(0)
    return fastsae.build_sae(cfg.sae)


def sharded_run(cases, root):
    """Every rank: train each case; return this shard's weights and rank 0's log."""
    results = []
    for arch, opt, shards, world, aux in cases:
        layout = build_layout(shards=shards)
        out = f"{root}/{arch}-{opt}-{world}"
        cfg = train_config(arch, opt, aux, out, batch_size=16 // layout.replicas)
        # every rank passes the same whole SAE; the trainer keeps this rank's slice
        trainer = Trainer(cfg, TensorSource(activations(), cfg.batch_size, shuffle=False), initial_sae(cfg),
                          layout=layout)
        assert isinstance(trainer.sae, ShardedSAE) == (shards > 1)
        trainer.fit()
        sae = trainer.sae
        span = (sae.shard_start, sae.shard_end) if shards > 1 else (0, sae.d_sae)
        results.append({"state": {k: v.clone() for k, v in sae.state_dict().items()}, "range": span, "out": out})
    return results


def _check(case, per_rank, tmp_path):
    arch, opt, shards, world, aux = case
    cfg = train_config(arch, opt, aux, tmp_path / f"ref-{arch}-{opt}-{world}")
    ref = Trainer(cfg, TensorSource(activations(), cfg.batch_size, shuffle=False), sae=initial_sae(cfg))
    ref.fit()
    want = ref.sae.state_dict()
    for res in per_rank:
        start, end = res["range"]
        for name, t in res["state"].items():
            torch.testing.assert_close(t, latent_slice(name, want[name], start, end, arch), atol=TOL, rtol=0,
                                       msg=f"{case}: {name}")
    log = [json.loads(line) for line in open(f"{per_rank[0]['out']}/log.jsonl")]
    assert [r["step"] for r in log] == [2, 4, 6]  # written once (rank 0), not once per rank
    for got, exp in zip(log, ref.tracker.history):
        assert got["loss"] == pytest.approx(exp["loss"], rel=1e-6)
        assert got["tokens"] == exp["tokens"]
        assert got["dead_fraction"] == exp["dead_fraction"]
    final = fastsae.load(f"{per_rank[0]['out']}/final")  # consolidated for single-process use
    torch.testing.assert_close(final.W_dec, want["W_dec"], atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-train")
    results = launch(sharded_run, 2, (CASES, str(root)), timeout_s=120, collective_timeout_s=30)
    assert all(r.ok for r in results), [(r.error, r.traceback) for r in results]
    return [r.value for r in results]


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_sharded_trainer_matches_trainer(two_ranks, i, tmp_path):
    _check(CASES[i], [rank[i] for rank in two_ranks], tmp_path)


def test_data_parallel_trainer_matches_trainer(tmp_path):
    results = launch(sharded_run, 4, (DP_CASES, str(tmp_path)), timeout_s=120, collective_timeout_s=30)
    assert all(r.ok for r in results), [(r.error, r.traceback) for r in results]
    for i, case in enumerate(DP_CASES):
        _check(case, [r.value[i] for r in results], tmp_path)


def interrupted_run(root):
    """Stop after 3 steps, resume from the checkpoint, finish; and a mismatched resume."""
    layout = build_layout(shards=2)
    cfg = train_config("topk", "row_sparse_adam", 1 / 32, f"{root}/run")
    data = TensorSource(activations(), cfg.batch_size, shuffle=True, seed=3)
    trainer = Trainer(cfg, data, ShardedSAE.from_full(initial_sae(cfg), layout), layout=layout)
    trainer.fit(max_steps=3)
    resumed = Trainer.resume(f"{root}/run", TensorSource(activations(), 16, shuffle=True, seed=3), layout=layout)
    resumed.fit()
    other = build_layout(shards=1)  # 2 replicas x 1 shard: the optimizer state does not fit
    try:
        Trainer.resume(f"{root}/run", TensorSource(activations(), 16), layout=other)
        mismatch = None
    except ConfigError as e:
        mismatch = str(e)
    return {"state": {k: v.clone() for k, v in resumed.sae.state_dict().items()},
            "range": (resumed.sae.shard_start, resumed.sae.shard_end), "mismatch": mismatch}


def test_resumed_sharded_run_equals_the_uninterrupted_one(tmp_path):
    results = launch(interrupted_run, 2, (str(tmp_path),), timeout_s=120, collective_timeout_s=30)
    assert all(r.ok for r in results), [(r.error, r.traceback) for r in results]
    cfg = train_config("topk", "row_sparse_adam", 1 / 32, tmp_path / "ref")
    ref = Trainer(cfg, TensorSource(activations(), 16, shuffle=True, seed=3), sae=initial_sae(cfg))
    ref.fit()
    for r in results:
        start, end = r.value["range"]
        for name, t in r.value["state"].items():
            torch.testing.assert_close(t, latent_slice(name, ref.sae.state_dict()[name], start, end, "topk"),
                                       atol=TOL, rtol=0)
        assert "saved by 1 replica(s) x 2 shard(s), this job is 2 x 1" in r.value["mismatch"]


def test_train_runs_under_torchrun(tmp_path):
    """`torchrun -m fastsae train --shards 2`: one progress bar and one log (rank 0), a sharded
    and a consolidated final SAE, and a resume with the same layout. --standalone picks a
    free port; the timeouts keep CI from hanging."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    (tmp_path / "acts").mkdir()
    np.save(tmp_path / "acts" / "s0.npy", np.random.default_rng(0).standard_normal((256, 8)).astype("float32"))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "fastsae", "train", "--shards", "2",
           "--data", str(tmp_path / "acts"), "--d-sae", "24", "--architecture", "topk", "--k", "3", "--steps", "4",
           "--batch-size", "32", "--log-every", "2", "--checkpoint-every", "0", "--init", "data",
           "--out-dir", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTSAE_DIST_TIMEOUT": "60"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("step       2  loss") == 1 and out.count('"layout": "1x2"') == 1, out[-3000:]
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2
    sae = fastsae.load(tmp_path / "run" / "final")
    assert sae.d_sae == 24
    from fastsae.distributed import load_full

    torch.testing.assert_close(load_full(tmp_path / "run" / "final_sharded").W_dec, sae.W_dec, atol=0, rtol=0)

    more = subprocess.run([*cmd[:cmd.index("--steps") + 1], "6", *cmd[cmd.index("--steps") + 2:], "--resume"],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6] and log[-1]["tokens"] == 6 * 32
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "step_00000006").glob("trainer_state*")) == \
        ["trainer_state.rank0.pt", "trainer_state.rank1.pt"]


def nonfinite_run(root, mode):
    """2 replicas; only replica 1's first batch holds a NaN."""
    layout = build_layout(shards=1)
    x = activations()
    x[20, 2] = float("nan")  # rows 16..31 are the 2nd batch of 16: replica 1's first
    cfg = train_config("topk", "row_sparse_adam", 0.0, f"{root}/{mode}").replace(nonfinite=mode, steps=3)
    trainer = Trainer(cfg, TensorSource(x, 16, shuffle=False), initial_sae(cfg), layout=layout)
    try:
        trainer.fit()
    except fastsae.errors.InputError as e:
        return {"error": str(e)}
    return {"steps": trainer.step, "skipped": trainer.tracker.skipped_batches, "W_dec": trainer.sae.W_dec.detach()}


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_a_nonfinite_batch_on_one_replica_is_handled_on_every_rank(tmp_path, mode):
    """Every rank takes the same branch (skip the step, or raise), so none waits in a collective."""
    results = launch(nonfinite_run, 2, (str(tmp_path), mode), timeout_s=120, collective_timeout_s=30)
    assert all(r.ok for r in results), [(r.error, r.traceback) for r in results]
    a, b = (r.value for r in results)
    if mode == "raise":
        assert "holds NaN/inf on another replica" in a["error"]
        assert "contains 1 NaN/inf value(s)" in b["error"]
        return
    # 6 batches of 16 = 3 pairs, the source cycles: pairs 0 (skipped), 1, 2, 0 (skipped), 1
    assert a["steps"] == b["steps"] == 3 and a["skipped"] == b["skipped"] == 2
    torch.testing.assert_close(a["W_dec"], b["W_dec"], atol=0, rtol=0)


def batchtopk_replicas_run(root):
    layout = build_layout(shards=1)
    cfg = train_config("batchtopk", "adam", 1 / 32, f"{root}/btk", batch_size=8)
    trainer = Trainer(cfg, TensorSource(activations(), 8, shuffle=False), initial_sae(cfg), layout=layout)
    trainer.fit()
    return {k: v.clone() for k, v in trainer.sae.state_dict().items()}


def test_batchtopk_replicas_stay_identical(tmp_path):
    """Each replica's BatchTopK threshold EMA sees its own batches; the trainer averages it every
    step, so the replicas (and what any one of them saves) stay the same SAE."""
    results = launch(batchtopk_replicas_run, 2, (str(tmp_path),), timeout_s=120, collective_timeout_s=30)
    assert all(r.ok for r in results), [(r.error, r.traceback) for r in results]
    a, b = (r.value for r in results)
    assert float(a["threshold"]) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)
