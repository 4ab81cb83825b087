"""The toy generator: reproducible, unit-norm features, the promised marginals and correlations."""

import pytest
import torch

from fastsae.errors import InputError
from fastsae.toy.data import ToyData

SMALL = dict(d=8, n_features=16, mean_active=3.0)


def test_same_seed_same_features_and_stream():
    a, b = ToyData(**SMALL, seed=3), ToyData(**SMALL, seed=3)
    assert torch.equal(a.features, b.features)
    assert torch.equal(a.sample(64), b.sample(64))
    assert torch.equal(a.sample(64), b.sample(64))  # the streams stay in step
    c = ToyData(**SMALL, seed=4)
    assert not torch.equal(a.features, c.features)


def test_stream_moves_on_and_reset_restarts_it():
    data = ToyData(**SMALL)
    first, second = data.sample(32), data.sample(32)
    assert not torch.equal(first, second)
    data.reset()
    assert torch.equal(data.sample(32), first)


def test_external_generator_does_not_advance_the_stream():
    a, b = ToyData(**SMALL), ToyData(**SMALL)
    a.sample(16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.sample(16), b.sample(16))


def test_features_are_unit_norm_and_x_is_codes_times_features():
    data = ToyData(**SMALL)
    torch.testing.assert_close(data.features.norm(dim=1), torch.ones(16))
    x, codes = data.sample(100, return_codes=True)
    torch.testing.assert_close(x, codes @ data.features)
    assert x.shape == (100, 8) and codes.shape == (100, 16)
    active = codes[codes > 0]
    assert float(active.min()) >= 0 and float(active.max()) < 1


def test_probabilities_decay_and_sum_to_mean_active():
    data = ToyData(d=16, n_features=64, mean_active=5.0, decay=0.95)
    p = data.probabilities.double()
    torch.testing.assert_close(p[1:] / p[:-1], torch.full((63,), 0.95, dtype=torch.float64), rtol=1e-5, atol=0)
    assert abs(float(p.sum()) - 5.0) < 1e-4


def test_clamped_probabilities_still_sum_to_mean_active():
    data = ToyData(d=8, n_features=20, mean_active=10.0, decay=0.7)  # the first ones hit p = 1
    assert float(data.probabilities.max()) == 1.0
    assert abs(float(data.probabilities.sum()) - 10.0) < 1e-4


@pytest.mark.parametrize("correlation", [0.0, 0.5])
def test_mean_active_and_marginals_match(correlation):
    # 20k samples: the standard error of the mean count is ~0.02 and of each marginal < 0.004,
    # so these tolerances (>8 standard errors) cannot flake; the seed fixes the draw anyway.
    data = ToyData(d=8, n_features=32, mean_active=4.0, decay=0.97, correlation=correlation, seed=1)
    _, codes = data.sample(20000, return_codes=True)
    active = (codes > 0).float()
    assert abs(float(active.sum(1).mean()) - 4.0) < 0.2
    assert float((active.mean(0) - data.probabilities).abs().max()) < 0.035


def test_correlation_present_when_asked_and_absent_otherwise():
    def indicator_corr(correlation):
        data = ToyData(d=8, n_features=12, mean_active=4.0, decay=1.0, correlation=correlation,
                       correlation_rank=2, seed=2)
        _, codes = data.sample(20000, return_codes=True)
        c = torch.corrcoef((codes > 0).float().t())
        off = ~torch.eye(12, dtype=torch.bool)
        return c[off], data.covariance[off]

    independent, cov0 = indicator_corr(0.0)
    assert float(cov0.abs().max()) == 0.0
    assert float(independent.abs().max()) < 0.05  # ~7 standard errors at n=20000
    correlated, cov = indicator_corr(0.8)
    assert float(correlated.abs().mean()) > 4 * float(independent.abs().mean())
    # the activity correlations follow the copula's covariance, sign and size
    assert float(torch.corrcoef(torch.stack([correlated, cov]))[0, 1]) > 0.9


def test_covariance_is_a_correlation_matrix():
    data = ToyData(**SMALL, correlation=0.6)
    cov = data.covariance.double()
    torch.testing.assert_close(cov.diagonal(), torch.ones(16, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(cov, cov.t())
    assert float(torch.linalg.eigvalsh(cov).min()) > 0


def test_config_and_ground_truth_are_exposed():
    data = ToyData(**SMALL, correlation=0.3, seed=7)
    cfg = data.config()
    assert cfg["n_features"] == 16 and cfg["correlation"] == 0.3 and cfg["dtype"] == "float32"
    assert ToyData(**cfg).features.equal(data.features)  # the config rebuilds the same data
    gt = data.ground_truth()
    assert gt["features"].shape == (16, 8) and gt["covariance"].shape == (16, 16)


def test_float64_dtype():
    data = ToyData(**SMALL, dtype=torch.float64)
    assert data.features.dtype == torch.float64 and data.sample(4).dtype == torch.float64


@pytest.mark.parametrize("bad", [dict(mean_active=0.0), dict(mean_active=16.0), dict(decay=1.5),
                                 dict(correlation=1.0), dict(d=0), dict(correlation_rank=0)])
def test_bad_parameters_are_rejected_with_a_message(bad):
    with pytest.raises(InputError, match="ToyData"):
        ToyData(**{**SMALL, **bad})


def test_bad_batch_is_rejected():
    with pytest.raises(InputError, match="batch"):
        ToyData(**SMALL).sample(0)


@pytest.mark.gpu
def test_streams_on_cuda():
    data = ToyData(**SMALL, device="cuda")
    x, codes = data.sample(64, return_codes=True)
    assert x.is_cuda and codes.is_cuda
    torch.testing.assert_close(x, codes @ data.features)
