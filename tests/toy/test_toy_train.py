"""Toy runs through the Trainer: data-sample init, dead-latent resampling, recovery on an easy problem."""

import pytest
import torch

from fastsae.errors import InputError
from fastsae.toy.data import ToyData
from fastsae.toy.train import evaluate, init_from_data, make_toy_sae, resample_dead_latents, train_toy

pytestmark = pytest.mark.usefixtures("one_thread")


EASY = dict(d=16, n_features=16, mean_active=1.5, decay=1.0, correlation=0.0)


def test_make_toy_sae_sizes_and_coefficients():
    data = ToyData(**EASY)
    relu = make_toy_sae("standard", data, 0.5, 0.3)
    assert relu.d_sae == 8 and relu.cfg.l1_coefficient == 0.3
    assert make_toy_sae("topk", data, 2, 3).cfg.k == 3
    with pytest.raises(InputError, match="integer"):
        make_toy_sae("topk", data, 2, 2.5)
    assert make_toy_sae("batchtopk", data, 2, 3).cfg.k == 3
    assert make_toy_sae("jumprelu", data, 2, 0.1).cfg.l0_coefficient == 0.1
    with pytest.raises(InputError, match="architecture"):
        make_toy_sae("gated", data, 2, 1)


def test_data_init_uses_normalised_samples_and_ties_the_encoder():
    data = ToyData(**EASY)
    sae = make_toy_sae("standard", data, 1, 0.1)
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(0))
    x[3] = 0  # an empty sample has no direction: it must not become an atom
    init_from_data(sae, x)
    atoms = torch.nn.functional.normalize(x, dim=1)
    cos = sae.W_dec.detach() @ atoms.t()
    assert float((cos.max(dim=1).values - 1).abs().max()) < 1e-5  # every atom is a sample
    assert len(set(cos.argmax(dim=1).tolist())) == 16 and 3 not in cos.argmax(dim=1).tolist()
    torch.testing.assert_close(sae.W_enc.data, sae.W_dec.data.t())
    with pytest.raises(InputError, match="data init"):
        init_from_data(sae, x[:16])  # 15 non-zero samples for 16 atoms


def test_resampling_moves_only_dead_latents_and_clears_their_adam_state():
    data = ToyData(**EASY)
    sae = make_toy_sae("standard", data, 1, 0.1)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae.training_forward(data.sample(32)).loss.backward()
    opt.step()
    before = sae.W_dec.detach().clone()
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[2, 7]] = True
    assert resample_dead_latents(sae, opt, dead, data.sample(64)) == 2
    assert torch.equal(sae.W_dec[~dead], before[~dead])
    assert not torch.equal(sae.W_dec[dead], before[dead])
    torch.testing.assert_close(sae.W_dec[dead].norm(dim=1), torch.ones(2))
    for buf in ("exp_avg", "exp_avg_sq"):
        assert float(opt.state[sae.W_dec][buf][dead].abs().max()) == 0
        assert float(opt.state[sae.W_enc][buf][:, dead].abs().max()) == 0
        assert float(opt.state[sae.W_dec][buf][~dead].abs().max()) > 0


@pytest.mark.parametrize("arch,coef,target", [("standard", 0.2, 0.9), ("topk", 2, 0.95)])
def test_learns_an_easy_dictionary(arch, coef, target):
    # 16 independent, equally likely features in 16 dimensions, 1.5 active per sample.
    data = ToyData(**EASY, seed=1)
    sae = make_toy_sae(arch, data, 2, coef, seed=1)
    before = evaluate(sae, data, n_samples=1024)
    result = train_toy(sae, data, 400, batch=64, lr=3e-3, track_every=100, resample_every=100,
                       lr_decay_fraction=0.25, eval_samples=1024, progress=False)
    m = result.metrics
    assert m["mmcs"] > target and m["mmcs"] > before["mmcs"] + 0.2
    assert m["fvu"] < 0.2 and m["fvu"] < 0.5 * before["fvu"]
    assert [h["step"] for h in result.history] == [0, 100, 200, 300, 400]
    assert result.history[-1]["mmcs"] == pytest.approx(m["mmcs"])
    if arch == "topk":  # the Trainer keeps TopK's decoder rows at unit norm (ReLU's L1 is norm-weighted)
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae))


def test_time_budget_stops_early():
    data = ToyData(**EASY)
    result = train_toy(make_toy_sae("topk", data, 1, 2), data, 10**9, batch=8, seconds=0.2,
                       eval_samples=64, progress=False)
    assert 0 < result.steps < 10**9


def test_bad_init_is_rejected():
    data = ToyData(**EASY)
    with pytest.raises(InputError, match="init"):
        train_toy(make_toy_sae("topk", data, 1, 2), data, 1, init="zeros")
