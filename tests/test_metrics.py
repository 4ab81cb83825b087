"""Metrics on constructed cases whose answers are known exactly."""

import math

import pytest
import torch

from fastsae import metrics as M
from fastsae.errors import InputError
from fastsae.sparse import SparseActs


def random_dictionary(n=12, d=6, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_identical_dictionaries_have_mmcs_one():
    w = random_dictionary()
    assert M.mmcs(w, w) == pytest.approx(1.0, abs=1e-6)
    assert M.fraction_recovered(w, w, threshold=0.99) == 1.0


def test_permuted_and_rescaled_atoms_still_recover_everything():
    w = random_dictionary()
    learned = w[torch.randperm(12, generator=torch.Generator().manual_seed(1))] * 3.7
    assert M.mmcs(w, learned) == pytest.approx(1.0, abs=1e-6)


def test_sign_flipped_atoms_do_not_count_as_recovered():
    basis = torch.eye(4)
    assert M.mmcs(basis, -basis) == pytest.approx(0.0, abs=1e-7)  # best is an orthogonal atom
    assert M.fraction_recovered(basis, -basis) == 0.0


def test_orthogonal_dictionaries_have_mmcs_zero():
    eye = torch.eye(6)
    assert M.mmcs(eye[:3], eye[3:]) == pytest.approx(0.0, abs=1e-7)


def test_known_angle_and_partial_recovery():
    truth = torch.eye(3)
    learned = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 5.0]])  # 45° from e1 and e2, exactly e3
    cos = M.max_cosine_similarities(truth, learned)
    torch.testing.assert_close(cos, torch.tensor([1 / math.sqrt(2), 1 / math.sqrt(2), 1.0]))
    assert M.fraction_recovered(truth, learned, threshold=0.99) == pytest.approx(1 / 3)
    assert M.fraction_recovered(truth, learned, threshold=0.7) == 1.0


def test_chunked_max_matches_unchunked():
    truth, learned = random_dictionary(50, 8, 2), random_dictionary(30, 8, 3)
    torch.testing.assert_close(M.max_cosine_similarities(truth, learned, chunk=7),
                               M.max_cosine_similarities(truth, learned))


def test_dictionary_mmcs_goes_from_smaller_into_larger():
    large = random_dictionary(20, 6, 4)
    small = large[:5]
    assert M.dictionary_mmcs(small, large) == pytest.approx(1.0, abs=1e-6)
    assert M.dictionary_mmcs(large, small) == pytest.approx(1.0, abs=1e-6)
    assert M.mmcs(large, small) < 0.99  # the other direction would punish the larger one


def test_mismatched_spaces_are_rejected():
    with pytest.raises(InputError, match="d="):
        M.mmcs(torch.eye(4), torch.eye(5))


def test_fire_counts_dead_latents_and_l0_dense_and_sparse():
    dense = torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, 3.0, 0.0, 0.0]])
    counts = M.latent_fire_counts(dense)
    assert counts.tolist() == [0, 2, 0, 1]
    assert M.dead_latents(counts) == 2
    assert M.l0(dense) == pytest.approx(1.5)
    sparse = SparseActs(torch.tensor([[2.0, 1.0], [3.0, 0.0]]), torch.tensor([[1, 3], [1, 2]]), 4)
    assert M.latent_fire_counts(sparse).tolist() == [0, 2, 0, 1]  # a zero value is not a firing
    assert M.l0(sparse) == pytest.approx(1.5)


@pytest.mark.parametrize("zeros", [0, 1, 5])
@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 4), (1, 1), (0, 4), (5, 0)])
def test_fired_latents_match_the_masked_ids_and_the_mean_count(shape, zeros):
    g = torch.Generator().manual_seed(len(shape) * 10 + zeros)
    values = torch.rand(shape, generator=g) + 0.1
    flat = values.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:zeros]] = 0.0  # no firing, whatever the slot
    if flat.numel() > 1:
        flat[-1] = -1.0 if zeros else flat[-1]
    indices = torch.randint(0, 9, shape, generator=g)
    before = (values.clone(), indices.clone())
    fired, l0 = M.fired_latents(SparseActs(values, indices, 9))
    assert torch.equal(fired, indices[values > 0])  # the same ids in the same (row) order
    rows = math.prod(shape[:-1])
    if rows == 0:
        assert math.isnan(l0)
    else:
        assert l0 == pytest.approx(float((values > 0).sum(-1).float().mean()))
    assert torch.equal(values, before[0]) and torch.equal(indices, before[1])
    dense = torch.zeros(*shape[:-1], 9).scatter_(-1, indices, values.clamp_min(0)) if shape[-1] else torch.zeros(
        *shape[:-1], 9)
    fired_dense, l0_dense = M.fired_latents(dense)
    assert torch.equal(fired_dense, torch.nonzero(dense.reshape(-1, 9))[:, 1])
    assert math.isnan(l0_dense) if rows == 0 else l0_dense == pytest.approx(float((dense != 0).sum(-1).float().mean()))


def test_fvu_perfect_mean_and_zero():
    x = random_dictionary(32, 5, 5)
    assert M.fvu(x, x) == 0.0
    assert M.fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0, rel=1e-5)
    expected = float(x.pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert M.fvu(x, torch.zeros_like(x)) == pytest.approx(expected, rel=1e-5)


def test_shrinkage_measures_the_scale_of_reconstructions():
    x = random_dictionary(32, 5, 6)
    assert M.shrinkage(x, x) == pytest.approx(1.0, rel=1e-6)
    assert M.shrinkage(x, 0.6 * x) == pytest.approx(0.6, rel=1e-6)
    # noise orthogonal in expectation barely moves γ; the scale does
    noise = 0.01 * random_dictionary(32, 5, 7)
    assert M.shrinkage(x, 0.8 * x + noise) == pytest.approx(0.8, rel=0.05)
    with pytest.raises(InputError, match="shrinkage"):
        M.shrinkage(x, -x)
    with pytest.raises(InputError, match="same shape"):
        M.fvu(x, x[:3])
