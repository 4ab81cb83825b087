"""`fastsae harvest` on a tiny randomly initialised GPT-2 built from a config (no downloads)."""

import json

import numpy as np
import pytest
import torch

from helpers import TINY_TEXT, require, tiny_lm, tiny_tokenizer

transformers = require("transformers", "compat")
tokenizers = require("tokenizers", "compat")

from fastsae.cli import main  # noqa: E402
from fastsae.data import ShardSource  # noqa: E402
from fastsae.errors import ConfigError, InputError  # noqa: E402
from fastsae.harvest import harvest  # noqa: E402

TEXT = TINY_TEXT


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gpt2")
    tiny_tokenizer(TEXT).save_pretrained(path)
    tiny_lm("gpt2", len(tiny_tokenizer(TEXT)), head=False).save_pretrained(path)
    (path / "docs.txt").write_text("\n".join(TEXT) + "\n")
    return path


def _expected_rows(path, layer):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    rows = []
    with torch.no_grad():
        for line in TEXT:
            enc = tok([line], return_tensors="pt")
            hs = model(**enc, output_hidden_states=True).hidden_states[layer + 1][0]
            rows.append(hs[1:])  # drop <bos>
    return torch.cat(rows)


def test_harvest_cli_writes_the_hooked_activations(tiny_model, tmp_path, capsys):
    out = tmp_path / "acts"
    rc = main(["harvest", "--model", str(tiny_model), "--hook", "h.0", "--text", str(tiny_model / "docs.txt"),
               "--out", str(out), "--batch-size", "2", "--shard-rows", "10", "--no-progress"])
    assert rc == 0
    assert str(out) in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    want = _expected_rows(tiny_model, 0)
    assert manifest["rows"] == want.shape[0] == sum(s["rows"] for s in manifest["shards"])
    assert manifest["d_in"] == 32 and manifest["hook"] == "h.0" and len(manifest["shards"]) > 2
    got = torch.cat([torch.from_numpy(np.load(out / s["file"])) for s in manifest["shards"]])
    # padding and <bos> dropped; every real token's activation, in document order
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    src = ShardSource(out, batch_size=8)
    assert src.d_in == 32 and src.n_rows == want.shape[0]


def test_harvest_api_bf16_safetensors_max_tokens_and_early_stop(tiny_model, tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    model = transformers.AutoModel.from_pretrained(tiny_model)
    ran_last = []
    model.h[1].register_forward_hook(lambda *a: ran_last.append(1))
    m = harvest(model, tok, TEXT, "h.0", tmp_path / "a", dtype="bfloat16", fmt="safetensors", max_tokens=7,
                progress=False)
    assert m["rows"] == 7 and m["dtype"] == "bfloat16"
    assert not ran_last  # the forward pass stopped at the hook
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "a" / m["shards"][0]["file"]))["activations"]
    assert t.dtype == torch.bfloat16 and t.shape == (7, 32)


def test_harvest_errors_name_the_fix(tiny_model, tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    model = transformers.AutoModel.from_pretrained(tiny_model)
    with pytest.raises(ConfigError, match=r"did you mean .*h\.0"):
        harvest(model, tok, TEXT, "h.O", tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="safetensors"):
        harvest(model, tok, TEXT, "h.0", tmp_path / "y", dtype="bfloat16", fmt="npy", progress=False)


def _run(tiny_model, out, *extra):
    return main(["harvest", "--model", str(tiny_model), "--text", str(tiny_model / "docs.txt"), "--out", str(out),
                 "--no-progress", *extra])


def test_harvest_refuses_a_folder_with_shards_unless_overwrite(tiny_model, tmp_path):
    out = tmp_path / "acts"
    assert _run(tiny_model, out, "--hook", "h.1", "--shard-rows", "5") == 0
    old = sorted(p.name for p in out.iterdir())
    assert len(old) > 3 and "manifest.json" in old
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"already holds harvested activations.*--overwrite"):
        _run(tiny_model, out, "--hook", "h.0")
    assert sorted(p.name for p in out.iterdir()) == sorted(old + ["notes.txt"])  # nothing touched
    stray = tmp_path / "stray"
    stray.mkdir()
    np.save(stray / "other.npy", np.zeros((3, 32), np.float32))  # shards without a manifest count too
    with pytest.raises(ConfigError, match="other.npy"):
        _run(tiny_model, stray, "--hook", "h.1")
    with pytest.raises(InputError, match="does not exist"):  # a typo in --text deletes nothing
        main(["harvest", "--model", str(tiny_model), "--hook", "h.0", "--text", "nope.txt", "--out", str(out),
              "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == sorted(old + ["notes.txt"])
    assert _run(tiny_model, out, "--hook", "h.0", "--overwrite") == 0  # default shard size: one shard
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["hook"] == "h.0"
    shard_files = sorted(p.name for p in out.iterdir() if p.suffix in (".npy", ".safetensors"))
    assert shard_files == [s["file"] for s in manifest["shards"]] == ["shard_00000.npy"]  # old shards gone
    assert (out / "notes.txt").read_text() == "mine"
    want = _expected_rows(tiny_model, 0)
    torch.testing.assert_close(ShardSource(out, batch_size=4, shuffle=False).sample(want.shape[0]), want,
                               rtol=1e-4, atol=1e-5)


def test_harvest_context_length_above_the_model_limit_names_it(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match=r"context length 64 is above the model's limit of 32 positions"):
        _run(tiny_model, tmp_path / "a", "--hook", "h.0", "--context-length", "64")


def test_harvest_of_an_unknown_model_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("fastsae.model._hub_reachable", lambda timeout=3.0: pytest.fail("probed the network"))
    (tmp_path / "x.txt").write_text("hello\n")
    with pytest.raises(ConfigError) as e:
        main(["harvest", "--model", "gpt2", "--hook", "h.0", "--text", str(tmp_path / "x.txt"), "--out",
              str(tmp_path / "o")])
    assert "\n" not in str(e.value) and "not in the local cache" in str(e.value) and "--model DIR" in str(e.value)


def test_harvest_two_hooks_writes_paired_folders(tiny_model, tmp_path):
    out = tmp_path / "pairs"
    assert _run(tiny_model, out, "--hook", "h.0.mlp", "--hook", "transformer.h.0", "--shard-rows", "10") == 0
    top = json.loads((out / "manifest.json").read_text())
    assert top["paired"] and top["hooks"] == ["h.0.mlp", "h.0"] and "shards" not in top
    subs = {h: json.loads((out / f / "manifest.json").read_text()) for h, f in top["folders"].items()}
    assert [s["rows"] for s in subs["h.0.mlp"]["shards"]] == [s["rows"] for s in subs["h.0"]["shards"]]
    assert subs["h.0"]["rows"] == top["rows"] == _expected_rows(tiny_model, 0).shape[0]
    b = ShardSource(out / "h.0", batch_size=4, shuffle=False).sample(top["rows"])
    torch.testing.assert_close(b, _expected_rows(tiny_model, 0), rtol=1e-4, atol=1e-5)
    a = ShardSource(out / "h.0.mlp", batch_size=4, shuffle=False).sample(top["rows"])
    assert a.shape == b.shape and not torch.allclose(a, b)
    # two shuffled sources with one seed read the same tokens in the same order
    sa, sb = (ShardSource(out / h, batch_size=7, seed=3) for h in ("h.0.mlp", "h.0"))
    perm_a, perm_b = next(iter(sa)), next(iter(sb))
    rows_a = [int((a == r).all(1).nonzero()[0]) for r in perm_a]
    rows_b = [int((b == r).all(1).nonzero()[0]) for r in perm_b]
    assert rows_a == rows_b and rows_a != list(range(7))
    with pytest.raises(InputError, match="several hook points .*: pass one of their folders"):
        ShardSource(out, batch_size=4)
    with pytest.raises(ConfigError, match="already holds"):
        _run(tiny_model, out, "--hook", "h.1")
