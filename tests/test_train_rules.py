"""Training rules: bad input, schedules, init, constraints, tracking, the plot."""

import math

import pytest
import torch

import fastsae
from fastsae.constraints import normalize_rows_, remove_parallel_component_
from fastsae.errors import ConfigError, InputError
from fastsae.init import geometric_median, init_b_dec_, init_from_data_
from fastsae.schedules import lr_factor, sparsity_factor
from fastsae.toy.data import ToyData
from fastsae.trainer import TrainConfig, Trainer
from helpers import quiet_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp, **kw):
    base = dict(sae=dict(d_in=8, d_sae=32, architecture="topk", k=2), steps=6, batch_size=16, lr=1e-2, log_every=1,
                init_sample_rows=64)
    return quiet_config(tmp, **{**base, **kw})


def _batches(n=8, bad_at=(), value=math.nan):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        b = torch.randn(16, 8, generator=g)
        if i in bad_at:
            b[3, 2] = value
        out.append(b)
    return out


@pytest.mark.parametrize("opt", ["adam", "row_sparse_adam"])
def test_nonfinite_batch_raises_before_touching_weights(tmp_path, opt):
    tr = Trainer(_cfg(tmp_path, optimizer=opt, b_dec_init="zeros"), _batches(bad_at=(2,)))
    before = {}

    def snapshot():
        before.update({k: v.clone() for k, v in tr.sae.state_dict().items()})

    it = iter(tr.source)
    for _ in range(2):
        tr.train_step(next(it))
    snapshot()
    with pytest.raises(InputError, match=r"1 NaN/inf value\(s\).*nonfinite='skip'"):
        tr.train_step(next(it))
    assert all(torch.equal(v, before[k]) for k, v in tr.sae.state_dict().items())


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_batch_skipped_and_counted(tmp_path, value):
    data = _batches(n=8, bad_at=(0, 4), value=value)  # batch 0 is also in the b_dec init sample
    res = Trainer(_cfg(tmp_path, nonfinite="skip"), data).fit()
    assert res.steps == 6 and res.skipped_batches == 2
    assert res.last_metrics["skipped_batches"] == 2
    sae = fastsae.load(res.final_dir)
    assert all(bool(torch.isfinite(t).all()) for t in sae.state_dict().values())


def test_nonfinite_loss_from_finite_input_never_reaches_weights(tmp_path):
    huge = [torch.full((16, 8), 3e38)]
    tr = Trainer(_cfg(tmp_path, b_dec_init="zeros"), huge)
    before = {k: v.clone() for k, v in tr.sae.state_dict().items()}
    with pytest.raises(InputError, match="loss of step 0 is NaN/inf"):
        tr.train_step(huge[0])
    assert all(torch.equal(v, before[k]) for k, v in tr.sae.state_dict().items())


def test_wrong_dimension_names_both_sizes(tmp_path):
    with pytest.raises(InputError, match="dimension 6.*d_in=8"):
        Trainer(_cfg(tmp_path), torch.randn(64, 6))
    tr = Trainer(_cfg(tmp_path, b_dec_init="zeros"), [torch.randn(16, 8)])
    with pytest.raises(InputError, match="dimension 5.*d_in=8"):
        tr.train_step(torch.randn(16, 5))


def test_config_errors_say_what_to_use(tmp_path):
    with pytest.raises(ConfigError, match="only the sparse architectures"):
        _cfg(tmp_path, sae=dict(d_in=8, d_sae=32, architecture="standard"), optimizer="row_sparse_adam")
    with pytest.raises(ConfigError, match="use one of adam, row_sparse_adam, signum, row_sparse_signum"):
        _cfg(tmp_path, optimizer="sgd")
    with pytest.raises(ConfigError, match="unknown training option"):
        TrainConfig.from_dict({"sae": dict(d_in=8, d_sae=32, k=2), "learning_rate": 1})


def test_lr_and_sparsity_schedules():
    f = [lr_factor(s, 100, warmup_steps=10, decay_start=0.8, decay="linear", final_fraction=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in f[10:81])
    assert f[99] == pytest.approx(0.1 + 0.9 * (1 - 19 / 20))
    assert all(a >= b for a, b in zip(f[80:], f[81:]))
    c = [lr_factor(s, 100, decay="cosine", decay_start=0.0) for s in range(100)]
    assert c[0] == 1.0 and c[50] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert [sparsity_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_schedules_reach_the_optimizer_and_penalty(tmp_path):
    sae = dict(d_in=8, d_sae=32, architecture="standard", l1_coefficient=0.5)
    tr = Trainer(_cfg(tmp_path, sae=sae, warmup_steps=4, sparsity_warmup_steps=3, b_dec_init="zeros"),
                 _batches())
    lrs, sf = [], []
    for b in _batches()[:5]:
        s = tr.train_step(b)
        lrs.append(s["lr"])
        sf.append(s["sparsity_factor"])
        assert s["loss"] == pytest.approx(s["mse"] + s["sparsity"], rel=1e-5)
    assert lrs[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01]) and sf[:4] == pytest.approx([1 / 3, 2 / 3, 1, 1])


def test_l1_with_and_without_decoder_norm_weighting(tmp_path):
    sae = dict(d_in=8, d_sae=32, architecture="standard", l1_coefficient=0.5)
    w = Trainer(_cfg(tmp_path / "w", sae=sae, b_dec_init="zeros"), _batches())
    u = Trainer(_cfg(tmp_path / "u", sae=sae, b_dec_init="zeros", l1_decoder_norm=False), _batches())
    assert not w.cfg.use_unit_norm_decoder and u.cfg.use_unit_norm_decoder
    with torch.no_grad():
        u.sae.W_dec.mul_(3.0)  # off unit norm: the two penalties now differ by that factor
        w.sae.load_state_dict(u.sae.state_dict())
        x = _batches()[0]
        acts = w.sae.encode(x)
        l1 = float(acts.abs().sum(-1).mean())
    sw, su = w.train_step(x), u.train_step(x)
    assert su["sparsity"] == pytest.approx(0.5 * l1, rel=1e-5)
    assert sw["sparsity"] == pytest.approx(0.5 * 3.0 * l1, rel=1e-4)
    torch.testing.assert_close(u.sae.W_dec.norm(dim=1), torch.ones(32))  # the constraint held


def test_geometric_median_resists_outliers():
    pts = torch.randn(200, 4, dtype=torch.float64) * 0.1 + 1.0
    pts[:20] = 1000.0
    gm = geometric_median(pts)
    assert (gm - 1.0).abs().max() < 0.1
    assert (pts.mean(0) - 1.0).abs().max() > 50


def test_data_init_tied_and_unit_norm():
    sae = fastsae.TopKSAE(d_in=8, d_sae=16, k=2)
    x = torch.randn(40, 8) + 3.0
    init_b_dec_(sae, x, "geometric_median")
    n = init_from_data_(sae, x, fraction=0.5, generator=torch.Generator().manual_seed(0))
    assert n == 8
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16))
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    centred = torch.nn.functional.normalize(x - sae.b_dec.detach(), dim=1)
    hits = (sae.W_dec.detach() @ centred.t()).max(1).values
    assert int((hits > 1 - 1e-5).sum()) >= 8  # half the atoms are data samples


def test_parallel_component_removed_and_rows_normalised():
    w = torch.randn(6, 5)
    g = torch.randn(6, 5)
    remove_parallel_component_(g, w)
    torch.testing.assert_close((g * w).sum(1), torch.zeros(6), atol=1e-5, rtol=0)
    normalize_rows_(w, torch.tensor([1, 3]))
    assert torch.allclose(w[[1, 3]].norm(dim=1), torch.ones(2))


def test_tracking_dead_dense_shrinkage_and_plot(tmp_path):
    x = ToyData(d=8, n_features=16, seed=0).sample(1024)
    res = Trainer(_cfg(tmp_path, steps=20, log_every=5, dead_tokens=48, plot=True,
                       sae=dict(d_in=8, d_sae=64, architecture="topk", k=2)), x).fit()
    rec = res.last_metrics
    for key in ("l0", "mse", "fvu", "dead_fraction", "dense_fraction", "shrinkage", "tokens_per_s"):
        assert key in rec and math.isfinite(rec[key]), key
    assert rec["l0"] <= 2.0 and 0.0 <= rec["dead_fraction"] <= 1.0
    assert res.plot_path.stat().st_size > 1000
    tr = Trainer(_cfg(tmp_path / "b", dead_tokens=32, b_dec_init="zeros"), [torch.randn(16, 8)])
    tr.tracker.record(torch.tensor([3, 3, 5]), 16, {"loss": 1.0}, torch.ones(2, 2), torch.ones(2, 2))
    tr.tracker.record(torch.tensor([5]), 16, {"loss": 1.0}, torch.ones(2, 2), torch.ones(2, 2))
    since = tr.tracker.tokens_since_fired
    assert since[5] == 0 and since[3] == 16 and since[0] == 32
    assert 3 not in tr.tracker.dead_latents().tolist() and 0 in tr.tracker.dead_latents().tolist()


@pytest.mark.parametrize("n_dead", [5, 100])  # gather path and masked-scan path
def test_top_dead_latents_matches_dense_topk(n_dead):
    from fastsae.losses import top_dead_latents

    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(7, 8, generator=g), torch.randn(8, 120, generator=g), torch.randn(120, generator=g)
    dead = torch.randperm(120, generator=g)[:n_dead].sort().values
    pre = (x @ W + b)[:, dead]
    want = dead[pre.topk(4, dim=1).indices].sort(1).values
    assert torch.equal(top_dead_latents(x, W, b, dead, k_aux=4, chunk=16).sort(1).values, want)
    for backend in fastsae.ops.available_backends("cpu"):  # the scan through each encode op
        op = fastsae.ops.get("topk_encode", backend)
        got = top_dead_latents(x, W, b, dead, k_aux=4, chunk=16, topk_encode=op)
        assert torch.equal(got.sort(1).values, want), backend


def test_batchtopk_training_learns_its_inference_threshold(tmp_path):
    x = ToyData(d=8, n_features=16, seed=0).sample(1024)
    sae = dict(d_in=8, d_sae=32, architecture="batchtopk", k=2)
    tr = Trainer(_cfg(tmp_path, sae=sae, steps=10, optimizer="row_sparse_adam"), x)
    assert float(tr.sae.threshold) < 0
    tr.fit()
    th = float(tr.sae.threshold)
    assert th > 0
    loaded = fastsae.load(tmp_path / "final").eval()
    assert float(loaded.threshold) == th
    acts = loaded.encode(x[:64])  # inference: a JumpReLU at the learned threshold
    assert bool((acts.values[acts.values > 0] > th).all())


def test_trainer_data_init_centres_the_samples_whatever_b_dec_starts_at(tmp_path):
    """init="data" takes samples centred at their geometric median, also with b_dec at zero
    (the default): uncentred samples of data far from the origin would all point the same way."""
    g = torch.Generator().manual_seed(0)
    offset = torch.zeros(8)
    offset[0] = 20.0
    x = torch.randn(512, 8, generator=g) + offset
    for b_dec_init in ("zeros", "geometric_median"):
        cfg = _cfg(tmp_path / b_dec_init, init="data", b_dec_init=b_dec_init, steps=1)
        tr = Trainer(cfg, x)
        assert torch.count_nonzero(tr.sae.b_dec) == (0 if b_dec_init == "zeros" else 8)
        along_offset = tr.sae.W_dec.detach()[:, 0].abs().mean()
        assert along_offset < 0.6, (b_dec_init, float(along_offset))  # uncentred: ~1.0
