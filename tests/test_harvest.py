"""`fastsae harvest` on a tiny randomly initialised GPT-2 built from a config (no downloads)."""

import json

import numpy as np
import pytest
import torch

from helpers import require

transformers = require("transformers", "compat")
tokenizers = require("tokenizers", "compat")

from fastsae.cli import main  # noqa: E402
from fastsae.data import ShardSource  # noqa: E402
from fastsae.errors import ConfigError  # noqa: E402
from fastsae.harvest import harvest  # noqa: E402

TEXT = [
    "the cat sat on the mat",
    "a dog ran in the park and the cat watched",
    "sparse autoencoders find features",
    "the mat was red",
    "dogs and cats are friends in the park",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    path = tmp_path_factory.mktemp("tiny_gpt2")
    words = sorted({w for line in TEXT for w in line.split()})
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "<bos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                bos_token="<bos>", eos_token="<bos>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(vocab), n_positions=32,
                                  bos_token_id=2, eos_token_id=2, pad_token_id=1)
    transformers.GPT2Model(cfg).save_pretrained(path)
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
