"""The toy generator's feature hierarchy and paired mode, and the absorption metric on SAEs
built to be clean or to absorb."""

import pytest
import torch

from fastsae import SAEConfig, build_sae
from fastsae.errors import InputError
from fastsae.toy import sweep
from fastsae.toy.data import ToyData


def hierarchy_data(**kw):
    return ToyData(**{**dict(d=32, n_features=24, parents=4, children=2, child_probability=0.6, mean_active=3,
                             correlation=0.3, seed=1), **kw})


def test_children_fire_only_with_their_parent_and_one_at_a_time():
    data = hierarchy_data()
    codes = data.sample_codes(20000)
    on = codes > 0
    for p, kids in data.hierarchy():
        assert not bool((on[:, kids].any(1) & ~on[:, p]).any()), "a child fired without its parent"
        assert int(on[:, kids].sum(1).max()) <= 1, "two children of one parent fired together"
        # given its parent, one of its children fires with child_probability
        share = float(on[:, kids].any(1)[on[:, p]].float().mean())
        assert share == pytest.approx(0.6, abs=0.03)
    # every marginal is the generator's own probability, and the mean count is mean_active
    torch.testing.assert_close(on.float().mean(0), data.probabilities, atol=0.015, rtol=0)
    assert float(on.sum(1).float().mean()) == pytest.approx(3.0, rel=0.03)


def test_paired_mode_target_is_the_codes_through_the_output_features():
    data = ToyData(d=8, n_features=12, mean_active=2, d_out=5, target_linear=0.5, seed=2)
    x, y, codes = data.sample_pair(64, return_codes=True)
    torch.testing.assert_close(x, codes @ data.features)
    torch.testing.assert_close(y, codes @ data.output_features + x @ data.linear.t())
    assert data.ground_truth()["output_features"].shape == (12, 5)
    with pytest.raises(InputError, match="paired mode"):
        ToyData(d=8, n_features=12, mean_active=2).sample_pair(4)


@pytest.mark.parametrize("kw,match", [
    (dict(parents=2), "needs both"),
    (dict(parents=9, children=2), "raise n_features"),
    (dict(child_probability=1.5), r"\[0, 1\]"),
    (dict(target_linear=1.0), "paired mode"),
    (dict(parents=4, children=2, mean_active=23.0), "lower mean_active"),
])
def test_bad_generator_settings(kw, match):
    base = dict(d=8, n_features=12, mean_active=2)
    if "mean_active" in kw:
        base["n_features"] = 24
    with pytest.raises(InputError, match=match):
        ToyData(**{**base, **kw})


def orthonormal(data):
    """Exactly orthonormal features (d >= G), so a tied ReLU SAE reads the codes off exactly."""
    q, _ = torch.linalg.qr(torch.randn(data.d, data.n_features, generator=torch.Generator().manual_seed(0)))
    data.features = q.t().contiguous()
    return data


def relu_sae(data, W_enc, W_dec):
    sae = build_sae(SAEConfig(d_in=data.d, d_sae=data.n_features, architecture="standard"))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_absorption_is_zero_for_the_true_features_and_high_for_an_absorbing_sae():
    data = orthonormal(hierarchy_data())
    F = data.features
    clean = sweep.absorption(relu_sae(data, F.t(), F), data, n_samples=8192)
    assert clean["absorption"] == 0.0
    assert clean["parent_recall_with_child"] == 1.0 and clean["parent_recall_alone"] == 1.0
    assert clean["child_parent_cos"] == pytest.approx(0.0, abs=1e-5)
    assert clean["mmcs_parents"] == pytest.approx(1.0) and clean["mmcs_children"] == pytest.approx(1.0)
    # the absorbing SAE: each child's latent carries its parent (decoder f_p + f_c) and the
    # parent's latent is switched off by any child (encoder f_p - 10 Σ f_c)
    W_enc, W_dec = F.t().clone(), F.clone()
    for p, kids in data.hierarchy():
        W_enc[:, p] -= 10 * F[kids].sum(0)
        for c in kids:
            W_dec[c] = (F[p] + F[c]) / 2 ** 0.5
    absorbed = sweep.absorption(relu_sae(data, W_enc, W_dec), data, n_samples=8192)
    # the parent's latent still fires where c_p > 10·c_c (about 1 in 20 draws)
    assert absorbed["absorption"] == pytest.approx(0.95, abs=0.03)
    assert absorbed["parent_recall_with_child"] == pytest.approx(0.05, abs=0.03)
    assert absorbed["parent_recall_alone"] == 1.0
    assert absorbed["child_parent_cos"] == pytest.approx(2 ** -0.5, abs=1e-5)
    assert sweep.absorption(relu_sae(data, F.t(), F), hierarchy_data(parents=0, children=0)) == {}


def test_sweep_cells_for_the_new_architectures(tmp_path):
    """One tiny cell each: a Matryoshka SAE scored for absorption, and a skip transcoder on
    paired data (the CLI path the docs' tables come from)."""
    import argparse

    p = argparse.ArgumentParser()
    sweep.add_arguments(p)
    args = p.parse_args(["--out", str(tmp_path / "a"), "--arch", "matryoshka_batchtopk", "--ratios", "1", "--k", "2",
                         "--d", "16", "--features", "24", "--parents", "4", "--children", "2", "--mean-active", "2",
                         "--steps", "5", "--batch", "32", "--eval-samples", "256", "--no-plots"])
    assert sweep.run(args) == 0
    table = (tmp_path / "a" / "results.md").read_text()
    assert "Matryoshka BatchTopK" in table and "absorption" in table
    args = p.parse_args(["--out", str(tmp_path / "t"), "--arch", "topk", "--ratios", "1", "--k", "2", "--d", "16",
                         "--features", "24", "--mean-active", "2", "--d-out", "8", "--target-linear", "0.5",
                         "--skip", "off", "on", "--steps", "5", "--batch", "32", "--eval-samples", "256", "--no-plots"])
    assert sweep.run(args) == 0
    table = (tmp_path / "t" / "results.md").read_text()
    assert "TopK + skip" in table and "transcoders to d_out=8" in table
