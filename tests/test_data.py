"""Activation sources: tensors, iterables, on-disk shards with a shuffle buffer."""

import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastsae.data import IterableSource, ShardSource, TensorSource, as_source, fingerprint_changes
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


def test_tensor_source_order_is_its_seeded_permutation_across_epochs():
    # the order a run's checkpoint resumes in: a change here would make a resumed run repeat or
    # skip rows of its epoch
    from fastsae.data import _generator
    x = _rows(30)
    got = torch.cat(_take(TensorSource(x, batch_size=7, seed=3), 9))[:, 0].long()  # 63 rows: 2 epochs + 3
    want = [torch.randperm(30, generator=_generator(3, e))[:28] for e in (0, 1)]  # 4 whole batches each
    want.append(torch.randperm(30, generator=_generator(3, 2))[:7])
    assert torch.equal(got, torch.cat(want))


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


# ------------------------------------------------------------------ manifests and bad shards
def _manifest(directory, shards, **extra):
    (directory / "manifest.json").write_text(json.dumps({"shards": shards, **extra}))


def test_manifest_without_a_shard_list_reads_every_shard(tmp_path):
    _write_shards(tmp_path, _rows(1000), "npy")
    (tmp_path / "manifest.json").write_text(json.dumps({"model": "tiny"}))  # metadata only
    src = ShardSource(tmp_path, batch_size=50)
    assert src.n_rows == 1000 and src.manifest == {"model": "tiny"}


def test_manifest_limits_the_shards_read(tmp_path):
    _write_shards(tmp_path, _rows(1000), "npy")  # shard_0..2, 300 + 450 + 250 rows
    np.save(tmp_path / "other_hook.npy", np.full((500, 8), -1.0, np.float32))  # another hook's shard
    _manifest(tmp_path, [{"file": "shard_0.npy", "rows": 300}, {"file": "shard_2.npy", "rows": 250}], d_in=8)
    with pytest.warns(UserWarning, match="ignoring 2 other shard file"):
        src = ShardSource(tmp_path, batch_size=50, shuffle=False)
    assert src.n_rows == 550 and [s.path.name for s in src.shards] == ["shard_0.npy", "shard_2.npy"]
    seen = torch.cat(_take(src, 11))[:, 0]
    assert seen.min() >= 0 and sorted(seen.long().tolist()) == list(range(300)) + list(range(750, 1000))
    assert src.manifest["d_in"] == 8


@pytest.mark.filterwarnings("ignore:.*ignoring .* other shard file")
def test_manifest_disagreeing_with_its_shards(tmp_path):
    _write_shards(tmp_path, _rows(1000), "npy")
    _manifest(tmp_path, [{"file": "shard_0.npy", "rows": 300}, {"file": "shard_1.npy", "rows": 999}])
    with pytest.raises(InputError, match=r"shard_1.npy holds 450 rows but .*manifest.json says 999"):
        ShardSource(tmp_path, batch_size=4)
    _manifest(tmp_path, [{"file": "shard_0.npy", "rows": 300}, {"file": "gone.npy", "rows": 10}])
    with pytest.raises(InputError, match=r"shard .*gone.npy does not exist"):
        ShardSource(tmp_path, batch_size=4)
    _manifest(tmp_path, [{"file": "shard_0.npy", "rows": 300}], d_in=16)
    with pytest.raises(InputError, match="dimension 8 but .*manifest.json says d_in=16"):
        ShardSource(tmp_path, batch_size=4)


@pytest.mark.parametrize("text", ['{"shards": [{"file": "a.npy"', '[1, 2]', '{"shards": "a.npy"}',
                                  '{"shards": [{"file": "../../etc/x.npy"}]}'])
def test_corrupt_manifest_names_the_file(tmp_path, text):
    _write_shards(tmp_path, _rows(100), "npy", sizes=(100,))
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(InputError, match=r"manifest.json .*(not valid JSON|does not list|outside|JSON object)"):
        ShardSource(tmp_path, batch_size=4)


def test_missing_path_says_it_does_not_exist(tmp_path):
    with pytest.raises(InputError, match=r"nonexistent does not exist"):
        ShardSource(tmp_path / "nonexistent", batch_size=4)
    with pytest.raises(InputError, match=r"nonexistent does not exist"):
        as_source(str(tmp_path / "nonexistent") + "/", batch_size=4)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64, np.uint8])
def test_non_float_npy_shards_are_refused(tmp_path, dtype):
    np.save(tmp_path / "bad.npy", np.ones((10, 8), dtype))
    with pytest.raises(InputError, match=r"bad.npy holds .* values; activation shards must be floating point"):
        ShardSource(tmp_path, batch_size=4)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64, torch.int8])
def test_non_float_safetensors_shards_are_refused(tmp_path, dtype):
    save_file({"activations": torch.ones(10, 8).to(dtype)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(InputError, match=r"bad.safetensors holds .* values; activation shards must be floating"):
        ShardSource(tmp_path, batch_size=4)


def test_truncated_empty_and_big_endian_shards_name_the_file(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((100, 8), np.float32))
    data = (tmp_path / "a.npy").read_bytes()
    cases = {
        "truncated.npy": data[:-40],
        "headless.npy": data[:20],
        "empty.npy": b"",
        "empty.safetensors": b"",
    }
    save_file({"activations": torch.ones(100, 8)}, str(tmp_path / "s.safetensors"))
    cases["truncated.safetensors"] = (tmp_path / "s.safetensors").read_bytes()[:-40]
    for name, content in cases.items():
        bad = tmp_path / "bad" / name
        bad.parent.mkdir(exist_ok=True)
        bad.write_bytes(content)
        with pytest.raises(InputError, match=rf"{name} (is empty|is not a readable)"):
            ShardSource(bad, batch_size=4)
    np.save(tmp_path / "bad" / "big.npy", np.ones((10, 8), ">f4"))
    with pytest.raises(InputError, match=r"big.npy is stored .*big-endian"):
        ShardSource(tmp_path / "bad" / "big.npy", batch_size=4)


# ------------------------------------------------------------------ fingerprints
def test_shard_fingerprint_tells_changed_data(tmp_path):
    _write_shards(tmp_path, _rows(1000), "npy")
    fp = ShardSource(tmp_path, batch_size=10).fingerprint()
    assert json.loads(json.dumps(fp)) == fp  # saved with a checkpoint as JSON
    assert fingerprint_changes(fp, ShardSource(tmp_path, batch_size=10, seed=5).fingerprint()) == []
    np.save(tmp_path / "shard_1.npy", _rows(450).numpy() + 1)  # same size and shape, other rows
    changed = ShardSource(tmp_path, batch_size=10).fingerprint()
    assert fingerprint_changes(fp, changed) == ["shard_1.npy: its rows differ"]
    np.save(tmp_path / "shard_3.npy", _rows(10).numpy())
    np.save(tmp_path / "shard_2.npy", _rows(200).numpy())
    changes = fingerprint_changes(fp, ShardSource(tmp_path, batch_size=10).fingerprint())
    assert "shards added: shard_3.npy" in changes and any(c.startswith("shard_2.npy: shape [250, 8] -> [200, 8]")
                                                          for c in changes)
    _manifest(tmp_path, [{"file": "shard_0.npy", "rows": 300}])
    with pytest.warns(UserWarning):
        changes = fingerprint_changes(fp, ShardSource(tmp_path, batch_size=10).fingerprint())
    assert "manifest.json changed" in changes and any(c.startswith("shards gone") for c in changes)


def test_tensor_and_iterable_fingerprints():
    x = _rows(100)
    fp = TensorSource(x, batch_size=10).fingerprint()
    assert fingerprint_changes(fp, TensorSource(x.clone(), batch_size=20, seed=3).fingerprint()) == []
    assert fingerprint_changes(fp, TensorSource(x + 1, batch_size=10).fingerprint()) == ["the sampled rows differ"]
    assert fingerprint_changes(fp, TensorSource(x[:90], batch_size=10).fingerprint())[0].startswith("shape")
    it = IterableSource([x], d_in=8).fingerprint()
    assert fingerprint_changes(fp, it) == ["the kind of source changed: tensor -> iterable"]
