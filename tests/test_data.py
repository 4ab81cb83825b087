"""Activation sources: tensors, iterables, on-disk shards with a shuffle buffer."""

import itertools

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastsae.data import IterableSource, ShardSource, TensorSource, as_source
from fastsae.errors import InputError


def _take(source, n):
    return [b.clone() for b in itertools.islice(iter(source), n)]


def _rows(n=1000, d=8):
    # row i is filled with the value i, so a batch says which rows it holds
    return torch.arange(n, dtype=torch.float32).unsqueeze(1).expand(n, d).contiguous()


def _write_shards(tmp_path, x, kind, sizes=(300, 450, 250)):
    start = 0
    for i, s in enumerate(sizes):
        part = x[start:start + s]
        if kind == "npy":
            np.save(tmp_path / f"shard_{i}.npy", part.numpy())
        else:
            save_file({"activations": part}, str(tmp_path / f"shard_{i}.safetensors"))
        start += s


def test_tensor_source_epochs_are_permutations_and_resume():
    x = _rows(100)
    src = TensorSource(x, batch_size=10, seed=1)
    first = torch.cat(_take(src, 10))[:, 0]
    assert sorted(first.tolist()) == list(range(100))
    assert first.tolist() != list(range(100))
    state = src.state_dict()
    after = _take(src, 7)
    again = TensorSource(x, batch_size=10, seed=1)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(after, _take(again, 7)))


@pytest.mark.parametrize("kind", ["npy", "safetensors"])
def test_shard_source_covers_every_row_once_per_epoch(tmp_path, kind):
    x = _rows(1000)
    _write_shards(tmp_path, x, kind)
    src = ShardSource(tmp_path, batch_size=50, buffer_rows=256, chunk_rows=64, seed=0)
    assert src.d_in == 8 and src.n_rows == 1000
    seen = torch.cat(_take(src, 20))[:, 0]  # exactly one epoch
    assert sorted(seen.long().tolist()) == list(range(1000))
    assert seen.tolist() != sorted(seen.tolist())  # shuffled
    ordered = ShardSource(tmp_path, batch_size=50, shuffle=False)
    assert torch.equal(torch.cat(_take(ordered, 20)), x)


def test_shard_source_resumes_mid_buffer(tmp_path):
    _write_shards(tmp_path, _rows(1000), "npy")
    src = ShardSource(tmp_path, batch_size=48, buffer_rows=200, chunk_rows=50, seed=7)
    ref = _take(src, 60)  # crosses buffers and epochs
    for cut in (1, 4, 21, 33):
        a = ShardSource(tmp_path, batch_size=48, buffer_rows=200, chunk_rows=50, seed=7)
        _take(a, cut)
        b = ShardSource(tmp_path, batch_size=48, buffer_rows=200, chunk_rows=50, seed=7)
        b.load_state_dict(a.state_dict())
        rest = _take(b, 60 - cut)
        assert all(torch.equal(p, q) for p, q in zip(ref[cut:], rest)), cut


def test_shard_source_reads_only_a_buffer(tmp_path, monkeypatch):
    _write_shards(tmp_path, _rows(1000), "npy")
    src = ShardSource(tmp_path, batch_size=10, buffer_rows=100, chunk_rows=50)
    reads = []
    for shard in src.shards:
        orig = shard.read
        monkeypatch.setattr(shard, "read", lambda a, b, orig=orig: reads.append(b - a) or orig(a, b))
    _take(src, 3)
    assert sum(reads) == 100  # one buffer, not the dataset


def test_shard_errors_name_the_problem(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((10, 8), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((10, 6), np.float32))
    with pytest.raises(InputError, match="a.npy: 8, b.npy: 6"):
        ShardSource(tmp_path, batch_size=4)
    with pytest.raises(InputError, match="no .npy or .safetensors"):
        ShardSource(_empty(tmp_path), batch_size=4)


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_iterable_source_flattens_checks_and_resumes():
    batches = [torch.full((2, 3, 4), float(i)) for i in range(5)]
    src = IterableSource(batches, d_in=4)
    got = _take(src, 2)
    assert got[0].shape == (6, 4)
    resumed = IterableSource(batches, d_in=4)
    resumed.load_state_dict(src.state_dict())
    assert float(next(iter(resumed))[0, 0]) == 2.0
    with pytest.raises(InputError, match="dimension 4.*d_in=5"):
        next(iter(IterableSource(batches, d_in=5)))
    gen_src = IterableSource(lambda: (b for b in batches))
    assert len(list(gen_src)) == 5


def test_as_source_and_sample_keeps_position(tmp_path):
    x = _rows(100)
    src = as_source(x, batch_size=10)
    assert isinstance(src, TensorSource)
    state = src.state_dict()
    assert src.sample(25).shape == (25, 8)
    assert src.state_dict() == state
    _write_shards(tmp_path, _rows(1000), "npy")
    assert isinstance(as_source(str(tmp_path), batch_size=10), ShardSource)
    assert isinstance(as_source([x[:10]], batch_size=10), IterableSource)
