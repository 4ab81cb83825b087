"""Sharded checkpoints: written by 2 ranks, loaded on 1 (inference, converters) and on 4."""

from __future__ import annotations

import json

import pytest
import torch

import fastsae
from fastsae.distributed import (
    ParallelLayout,
    ShardedSAE,
    build_layout,
    consolidate,
    launch,
    load_full,
    load_sharded,
    read_manifest,
    save_sharded,
)
from fastsae.errors import CheckpointError
from fastsae.sae import latent_slice, sae_class

ARCHS = ("topk", "jumprelu", "batchtopk")


def full_sae(arch: str, seed: int = 0) -> fastsae.BaseSAE:
    torch.manual_seed(seed)
    kw = {"k": 3} if sae_class(arch).needs_k else {}
    sae = fastsae.build_sae(fastsae.SAEConfig(d_in=6, d_sae=21, architecture=arch, **kw))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        if arch == "jumprelu":
            sae.threshold.uniform_(0.0, 0.1)
        if arch == "batchtopk":
            sae.threshold.fill_(0.25)
    return sae


def save_worker(root: str):
    layout = build_layout(shards=2)
    for arch in ARCHS:
        save_sharded(ShardedSAE.from_full(full_sae(arch), layout), f"{root}/{arch}")
    return layout.shard


def load_worker(root: str, x: torch.Tensor):
    """4 ranks (4 shards of a 2-shard checkpoint): this rank's tensors and the group's output."""
    layout = build_layout(shards=4)
    out = {}
    for arch in ARCHS:
        sae = load_sharded(f"{root}/{arch}", layout)
        sae.eval()
        with torch.no_grad():
            out[arch] = {"range": (sae.shard_start, sae.shard_end), "forward": sae(x),
                         "state": {k: v.clone() for k, v in sae.state_dict().items()}}
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    results = launch(save_worker, 2, (str(root),), timeout_s=60, collective_timeout_s=30)
    assert all(r.ok for r in results), [(r.error, r.traceback) for r in results]
    return root


def test_two_rank_checkpoint_layout(saved):
    manifest = read_manifest(saved / "topk")
    assert [(s["start"], s["end"]) for s in manifest["shards"]] == [(0, 11), (11, 21)]
    files = sorted(p.name for p in (saved / "topk").iterdir())
    assert files == sorted(["manifest.json"] + [s["file"] for s in manifest["shards"]])


@pytest.mark.parametrize("arch", ARCHS)
def test_two_rank_checkpoint_loads_on_one_process(saved, arch, tmp_path):
    want = full_sae(arch)
    got = load_full(saved / arch)
    assert type(got) is type(want)
    for name, t in want.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], t, atol=0, rtol=0)
    assert fastsae.formats.detect_format(saved / arch) == "fastsae-sharded"
    via_load = fastsae.load(saved / arch)  # the one entry point reads sharded runs too
    for name, t in want.state_dict().items():
        torch.testing.assert_close(via_load.state_dict()[name], t, atol=0, rtol=0)
    # the converters' input: a plain single-process checkpoint
    consolidate(saved / arch, tmp_path / "plain")
    plain = fastsae.load(tmp_path / "plain")
    x = torch.randn(5, 6)
    plain.eval(), want.eval()
    torch.testing.assert_close(plain(x), want(x), atol=0, rtol=0)


def test_two_rank_checkpoint_loads_on_four_ranks(saved):
    x = torch.randn(5, 6)
    results = launch(load_worker, 4, (str(saved), x), timeout_s=60, collective_timeout_s=30)
    assert all(r.ok for r in results), [(r.error, r.traceback) for r in results]
    for arch in ARCHS:
        want = full_sae(arch).eval()
        ranges = [r.value[arch]["range"] for r in results]
        assert ranges == [(0, 6), (6, 11), (11, 16), (16, 21)]
        for r in results:
            start, end = r.value[arch]["range"]
            for name, t in r.value[arch]["state"].items():
                exp = latent_slice(name, want.state_dict()[name], start, end, arch)
                torch.testing.assert_close(t, exp, atol=0, rtol=0)
            with torch.no_grad():
                torch.testing.assert_close(r.value[arch]["forward"], want(x), atol=1e-6, rtol=1e-5)


def test_single_process_save_and_reshard(tmp_path):
    """Without torch.distributed: a 1-shard save reads back as any shard of 3."""
    want = full_sae("topk")
    save_sharded(want, tmp_path / "one")  # a whole SAE written as one shard
    for shard in range(3):
        part = load_sharded(tmp_path / "one", ParallelLayout(replicas=1, shards=3, rank=shard))
        start, end = part.shard_start, part.shard_end
        torch.testing.assert_close(part.W_enc, want.W_enc[:, start:end], atol=0, rtol=0)
        torch.testing.assert_close(part.W_dec, want.W_dec[start:end], atol=0, rtol=0)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path):
    first = full_sae("topk", seed=0)
    save_sharded(ShardedSAE.from_full(first), tmp_path)
    # a later save that died after writing its shard file but before the manifest
    stray = tmp_path / "shard-00000-of-00001.deadbeef.safetensors"
    stray.write_bytes(b"half a file")
    torch.testing.assert_close(load_full(tmp_path).W_dec, first.W_dec, atol=0, rtol=0)
    second = full_sae("topk", seed=1)
    save_sharded(ShardedSAE.from_full(second), tmp_path)  # the next save cleans up
    assert not stray.exists()
    torch.testing.assert_close(load_full(tmp_path).W_dec, second.W_dec, atol=0, rtol=0)


def test_broken_checkpoints_say_what_is_wrong(tmp_path):
    save_sharded(ShardedSAE.from_full(full_sae("topk")), tmp_path / "ok")
    with pytest.raises(CheckpointError, match="not a sharded fastsae checkpoint"):
        load_full(tmp_path / "missing")
    fastsae.TopKSAE(d_in=4, d_sae=8, k=2).save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="load it with fastsae.load"):
        load_full(tmp_path / "plain")
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    (tmp_path / "ok" / manifest["shards"][0]["file"]).unlink()
    with pytest.raises(CheckpointError, match="is missing: the checkpoint .* is incomplete"):
        load_full(tmp_path / "ok")
