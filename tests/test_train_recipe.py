"""The Trainer's recipe: a dead window relative to the run, AuxK and resampling of dead latents,
the fine-tuning stage that undoes shrinkage, and the CLI flags for them."""

import argparse
import json

import pytest
import torch

import fastsae
from fastsae.config import DEAD_TOKENS_CAP
from fastsae.errors import ConfigError
from fastsae.toy.data import ToyData
from fastsae.trainer import TrainConfig, Trainer
from helpers import quiet_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp, **kw):
    base = dict(sae=dict(d_in=8, d_sae=64, architecture="topk", k=2), steps=40, batch_size=32, lr=1e-2, log_every=5,
                init_sample_rows=128)
    return quiet_config(tmp, **{**base, **kw})


def _toy(seed=0):
    return ToyData(d=8, n_features=16, mean_active=2, seed=seed)


def test_dead_window_is_relative_to_the_run():
    sae = dict(d_in=8, d_sae=64, architecture="topk", k=2)
    short = TrainConfig(sae=sae, steps=1000, batch_size=256)
    assert short.dead_window() == 1000 * 256 // 40  # a fortieth of a short run
    assert TrainConfig(sae=sae, steps=10**6, batch_size=4096).dead_window() == DEAD_TOKENS_CAP
    assert TrainConfig(sae=sae, steps=10**6, batch_size=4096, dead_tokens=77).dead_window() == 77
    assert TrainConfig(sae=sae, steps=3, batch_size=8).dead_window() == 8  # never below one batch
    assert short.resample_interval() == 25  # the dead window in steps
    assert short.dead_window(replicas=4) == 4 * short.dead_window()  # the global batch's tokens
    with pytest.raises(ConfigError, match="dead_tokens"):
        TrainConfig(sae=sae, dead_tokens=0)
    with pytest.raises(ConfigError, match="finetune_steps"):
        TrainConfig(sae=sae, finetune_steps=-1)


def test_dead_handling_defaults_per_architecture():
    assert not TrainConfig(sae=dict(d_in=8, d_sae=16, architecture="topk", k=2)).use_resampling  # AuxK
    assert TrainConfig(sae=dict(d_in=8, d_sae=16, architecture="standard")).use_resampling
    assert TrainConfig(sae=dict(d_in=8, d_sae=16, architecture="jumprelu")).use_resampling
    assert TrainConfig(sae=dict(d_in=8, d_sae=16, architecture="topk", k=2), resample_dead=True).use_resampling


def test_auxk_starts_in_a_short_run_without_settings(tmp_path):
    # 64 latents for 16 features, k=2: many latents stay silent; with the old fixed 10M-token
    # window AuxK never started in a run this short
    res = Trainer(_cfg(tmp_path), _toy().source(32)).fit()
    assert res.last_metrics["dead_fraction"] > 0
    log = [json.loads(line) for line in open(res.log_path)]
    assert max(r["auxk"] for r in log) > 0


@pytest.mark.parametrize("arch,opt,state", [("standard", "adam", "fp32"), ("topk", "adam", "fp32"),
                                            ("topk", "row_sparse_adam", "fp32"), ("jumprelu", "adam", "fp32"),
                                            ("standard", "adam", "int8"), ("topk", "row_sparse_adam", "bf16")])
def test_resampling_moves_dead_latents_only_and_resets_their_optimizer_state(tmp_path, arch, opt, state):
    extra = dict(k=2) if arch == "topk" else {}
    cfg = _cfg(tmp_path, sae=dict(d_in=8, d_sae=64, architecture=arch, **extra), optimizer=opt,
               optimizer_state=state, resample_dead=True, resample_every=10**6, dead_tokens=64)
    tr = Trainer(cfg, _toy().source(32))
    it = iter(tr.source)
    for _ in range(4):
        tr.train_step(next(it))
    dead = tr.tracker.dead_latents()
    if dead.numel() == 0:  # make some: silence latents by a large negative bias
        with torch.no_grad():
            tr.sae.b_enc[:8] = -100.0
        for _ in range(3):
            tr.train_step(next(it))
        dead = tr.tracker.dead_latents()
    assert dead.numel() > 0
    live = torch.ones(64, dtype=torch.bool)
    live[dead] = False
    before = {k: v.detach().clone() for k, v in tr.sae.state_dict().items()}
    assert tr.resample_dead_latents() == dead.numel()
    after = tr.sae.state_dict()
    assert torch.equal(after["W_dec"][live], before["W_dec"][live])
    assert torch.equal(after["W_enc"][:, live], before["W_enc"][:, live])
    assert not torch.equal(after["W_dec"][dead], before["W_dec"][dead])
    torch.testing.assert_close(after["W_dec"][dead].norm(dim=1), torch.ones(dead.numel()))
    assert bool((after["b_enc"][dead] == 0).all())
    assert tr.tracker.dead_latents().numel() == 0  # a fresh window
    if opt == "adam" and state == "fp32":  # torch's Adam
        moments = tr.opt.opt.state[tr.opt.master["W_dec"]]
        w_dec, w_enc = moments["exp_avg"], tr.opt.opt.state[tr.opt.master["W_enc"]]["exp_avg"]
    else:  # the latent-major row-sparse store, or the compact dense one ([d_in, d_sae] for W_enc)
        w_dec, w_enc = (tr.opt.moments[n][0].get(slice(None)) for n in ("W_dec", "W_enc"))
        w_enc = w_enc.t() if opt == "row_sparse_adam" else w_enc
    assert float(w_dec[dead].abs().max()) == 0 and float(w_enc[:, dead].abs().max()) == 0
    assert float(w_dec[live].abs().max()) > 0


def test_resampling_runs_on_schedule_and_stops_when_the_lr_decays(tmp_path):
    sae = dict(d_in=8, d_sae=64, architecture="standard", l1_coefficient=0.5)
    tr = Trainer(_cfg(tmp_path, sae=sae, steps=40, resample_every=5, dead_tokens=32), _toy().source(32))
    seen = []
    tr.fit(callback=lambda t, s: seen.append((t.step, s.get("resampled"))) and False)
    steps = [s for s, r in seen if r is not None]
    assert steps == [5, 10, 15, 20, 25, 30, 35]  # not from step 36 on, where the decay starts
    assert tr.resampled > 0


@pytest.mark.parametrize("mode", ["scale", "decoder"])
def test_finetune_stage_freezes_the_encoder_and_undoes_shrinkage(tmp_path, mode):
    data = ToyData(d=8, n_features=16, mean_active=2, seed=0)
    sae = dict(d_in=8, d_sae=32, architecture="standard", l1_coefficient=1.0)
    cfg = _cfg(tmp_path, sae=sae, steps=150, finetune_steps=100, finetune=mode, lr=1e-2, log_every=10)
    tr = Trainer(cfg, data.source(64))
    tr.fit(max_steps=150)
    enc = {k: tr.sae.state_dict()[k].clone() for k in ("W_enc", "b_enc", "b_dec")}
    directions = torch.nn.functional.normalize(tr.sae.W_dec.detach().clone(), dim=1)
    x = data.sample(2048, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = fastsae.metrics.shrinkage(x, tr.sae(x)), fastsae.metrics.fvu(x, tr.sae(x))
    res = tr.fit()
    assert res.steps == 250
    for k, v in enc.items():  # the encoder, and so which latents fire, did not move
        assert torch.equal(tr.sae.state_dict()[k], v), k
    with torch.no_grad():
        after = fastsae.metrics.shrinkage(x, tr.sae(x)), fastsae.metrics.fvu(x, tr.sae(x))
    assert before[0] < 0.95 and abs(after[0] - 1) < abs(before[0] - 1) / 2  # γ moved toward 1
    assert after[1] < before[1]
    log = [json.loads(line) for line in open(res.log_path)]
    assert log[-1]["sparsity"] == 0 and log[-1]["step"] == 250
    assert fastsae.load(res.final_dir).W_dec.norm(dim=1).max() > 1.0  # rows grew to absorb shrinkage
    moved = (torch.nn.functional.normalize(tr.sae.W_dec.detach(), dim=1) - directions).abs().max()
    assert (moved < 1e-5) if mode == "scale" else (moved > 1e-3)  # "scale" keeps the learned directions


def test_finetune_stage_resumes(tmp_path):
    data = ToyData(d=8, n_features=16, mean_active=2, seed=0)
    cfg = _cfg(tmp_path / "a", steps=10, finetune_steps=10, checkpoint_every=15)
    Trainer(cfg, data.source(32)).fit(max_steps=15)
    resumed = Trainer.resume(tmp_path / "a", data.source(32))
    assert resumed.finetune_opt is not None and resumed.step == 15
    assert resumed.fit().steps == 20
    straight = Trainer(cfg.replace(out_dir=str(tmp_path / "b")), data.source(32))
    straight.fit()
    torch.testing.assert_close(resumed.sae.W_dec, straight.sae.W_dec)  # the same run, interrupted or not


def test_toy_source_resumes_where_it_stopped():
    src = _toy().source(4)
    it = iter(src)
    next(it)
    state = src.state_dict()
    want = next(it)
    src2 = _toy().source(4)
    src2.load_state_dict(state)
    assert torch.equal(next(iter(src2)), want)


def test_train_cli_flags_all_have_help_and_reach_the_config():
    from fastsae import train_cli

    p = argparse.ArgumentParser()
    train_cli.add_arguments(p)
    missing = [a.dest for a in p._actions if not a.help and a.dest != "help"]
    assert missing == []
    args = p.parse_args(["--data", "x", "--finetune-steps", "7", "--finetune", "decoder", "--resample-dead",
                         "--resample-every", "3"])
    train, _ = train_cli.build(args)
    assert (train["finetune_steps"], train["finetune"], train["resample_dead"], train["resample_every"]) == \
        (7, "decoder", True, 3)


def test_data_decoder_init_leaves_the_encoder_random(tmp_path):
    x = ToyData(d=8, n_features=16, mean_active=2, seed=0).sample(512)
    sae = dict(d_in=8, d_sae=16, architecture="standard")
    rand = Trainer(_cfg(tmp_path / "r", sae=sae, init="tied"), x)
    data = Trainer(_cfg(tmp_path / "d", sae=sae, init="data_decoder"), x)
    tied = Trainer(_cfg(tmp_path / "t", sae=sae, init="data"), x)
    assert torch.equal(data.sae.W_enc, rand.sae.W_enc)  # the same seed's random encoder, untouched
    assert torch.equal(data.sae.W_dec, tied.sae.W_dec)  # the same sample atoms as the tied data init
    assert torch.equal(tied.sae.W_enc, tied.sae.W_dec.t())
    with pytest.raises(ConfigError, match="data_decoder"):
        _cfg(tmp_path, init="samples")
