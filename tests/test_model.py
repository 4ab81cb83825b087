"""fastsae.model on tiny randomly initialised transformers models (GPT-2, Llama, GPT-NeoX, BERT),
built from config classes: hook points, capture, splicing, ablation, loading (no network)."""

import re

import pytest
import torch

from helpers import IdentitySAE, require, tiny_lm, tiny_tokenizer

transformers = require("transformers", "compat")
require("tokenizers", "compat")

import fastsae  # noqa: E402
from fastsae.errors import ConfigError, InputError  # noqa: E402
from fastsae.model import (  # noqa: E402
    ablate,
    capture,
    hook_points,
    load_model,
    resolve_hook,
    splice,
    token_batches,
    token_file_batches,
    valid_positions,
)
from fastsae.toy.tiny_lm import FAMILIES  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
V = 40


def _batch(seed=0, B=3, S=9, pad_last=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    am[-1, S - pad_last:] = 0  # the last sequence is right-padded
    ids[-1, S - pad_last:] = 1
    return ids, am


def _logits(model, ids, am):
    out = model(input_ids=ids, attention_mask=am)
    return out.logits


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def lm(family):
    return tiny_lm(family, V)


def test_hook_points_name_every_layer_and_capture_returns_them(lm, family):
    points = hook_points(lm)
    assert set(points) == {"resid", "mlp", "attn"}
    modules = dict(lm.named_modules())
    for kind, names in points.items():
        assert len(names) == 2 and all(n in modules for n in names), (kind, names)
    assert points["resid"][1].endswith(".1")
    ids, am = _batch()
    got = capture(lm, [n for names in points.values() for n in names], ids, am, stop_early=False)
    assert all(x.shape == (3, 9, 32) for x in got.values())
    # the residual stream after block 0 is the model's own hidden state 1
    hs = lm(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states
    torch.testing.assert_close(got[points["resid"][0]], hs[1])


@pytest.mark.parametrize("kind", ["resid", "mlp", "attn"])
def test_perfect_sae_leaves_logits_unchanged(lm, kind):
    hooks = hook_points(lm)[kind]
    ids, am = _batch()
    with torch.no_grad():
        clean = _logits(lm, ids, am)
        with splice(lm, {h: IdentitySAE(32) for h in hooks}) as sp:
            spliced = _logits(lm, ids, am)
            sp.mask = valid_positions(ids, am)  # and with a mask of the positions to replace
            masked = _logits(lm, ids, am)
    assert sp.calls == {h: 2 for h in hooks}  # the splice ran, at every hook point
    torch.testing.assert_close(spliced, clean, rtol=0, atol=1e-6)
    torch.testing.assert_close(masked, clean, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(lm, ids, am), clean, rtol=0, atol=0)  # hooks removed on exit


@pytest.mark.parametrize("kind", ["resid", "mlp", "attn"])
def test_error_term_keeps_logits_for_any_sae_and_gradients_reach_it(lm, kind):
    hook = hook_points(lm)[kind][0]
    sae = fastsae.TopKSAE(d_in=32, d_sae=64, k=4)
    ids, am = _batch(1)
    with torch.no_grad():
        clean = _logits(lm, ids, am)
        with splice(lm, {hook: sae}):
            replaced = _logits(lm, ids, am)
    assert (replaced - clean).abs().max() > 1e-3  # the random SAE is far from perfect ...
    with splice(lm, {hook: sae}, keep_error=True):
        kept = _logits(lm, ids, am)
        kept.pow(2).sum().backward()
    torch.testing.assert_close(kept.detach(), clean, rtol=1e-5, atol=1e-5)  # ... the error term restores x
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
    lm.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", ["resid", "mlp", "attn"])
def test_zero_ablation_matches_a_hand_written_hook(lm, kind):
    hook = hook_points(lm)[kind][1]
    ids, am = _batch(2)

    def zero(_m, _i, out):
        if isinstance(out, tuple):
            return (torch.zeros_like(out[0]), *out[1:])
        return torch.zeros_like(out)

    with torch.no_grad():
        h = lm.get_submodule(hook).register_forward_hook(zero)
        try:
            want = _logits(lm, ids, am)
        finally:
            h.remove()
        with ablate(lm, [hook]):
            got = _logits(lm, ids, am)
        clean = _logits(lm, ids, am)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got - clean).abs().max() > 1e-3


def test_splice_keeps_dtype_and_replaces_masked_positions_only():
    lm = tiny_lm("llama", V).to(torch.bfloat16)
    hook = hook_points(lm)["resid"][0]
    sae = fastsae.TopKSAE(d_in=32, d_sae=64, k=4)  # a float32 SAE inside a bf16 model
    ids, am = _batch(3)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 2] = mask[1, 5] = True
    seen = {}
    module = lm.get_submodule(hook)
    with torch.no_grad():
        clean = capture(lm, [hook], ids, am)[hook]
        with splice(lm, {hook: sae}, mask=mask, record=True) as sp:
            h = module.register_forward_hook(lambda m, i, o: seen.update(out=o))  # runs after the splice
            _logits(lm, ids, am)
            h.remove()
    out = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
    assert out.dtype == torch.bfloat16 and out.shape == clean.shape
    torch.testing.assert_close(out[~mask], clean[~mask], rtol=0, atol=0)
    with torch.no_grad():
        want = sae(clean[mask].float()).to(torch.bfloat16)
    torch.testing.assert_close(out[mask], want, rtol=0, atol=0)
    rec = sp.records[hook]
    assert rec.x.shape == (2, 32) and rec.x.dtype == torch.float32 and rec.acts.values.shape == (2, 4)
    with pytest.raises(InputError, match="mask"), splice(lm, {hook: sae}, mask=mask[:, :4]):
        _logits(lm, ids, am)


def test_hook_names_resolve_across_the_lm_wrapper_and_errors_list_hook_points():
    bare, wrapped = tiny_lm("gpt2", V, head=False), tiny_lm("gpt2", V)
    assert resolve_hook(bare, "transformer.h.1") == "h.1"
    assert resolve_hook(wrapped, "h.1.mlp") == "transformer.h.1.mlp"
    with pytest.raises(ConfigError) as e:
        resolve_hook(wrapped, "transformer.h.O")
    msg = str(e.value)
    assert "\n" not in msg and re.search(r"did you mean [^)]*transformer\.h\.0\b", msg)
    assert "transformer.h.{i} (residual stream)" in msg and "transformer.h.{i}.mlp" in msg and "0..1" in msg
    with pytest.raises(ConfigError, match=r"bert\.encoder\.layer\.\{i\}\.output\.dense \(mlp\)"):
        resolve_hook(tiny_lm("bert", V), "layers.0")
    with pytest.raises(ConfigError, match="d_in=16"):
        with splice(wrapped, {"transformer.h.0": fastsae.TopKSAE(d_in=16, d_sae=32, k=2)}):
            _logits(wrapped, *_batch())
    with pytest.raises(ConfigError, match="lacks"):
        with splice(wrapped, {"transformer.h.0": torch.nn.Linear(32, 32)}):
            pass


def test_capture_stops_after_the_deepest_hook():
    lm = tiny_lm("gpt2", V, layers=3)
    ran = []
    lm.transformer.h[2].register_forward_hook(lambda *a: ran.append(2))
    got = capture(lm, ["transformer.h.1", "transformer.h.0.mlp"], *_batch())
    assert set(got) == {"transformer.h.1", "transformer.h.0.mlp"} and not ran


def test_token_batches_and_token_files(tmp_path):
    tok = tiny_tokenizer()
    batches = list(token_batches(tok, ["the cat sat", "the mat", "dogs"], batch_size=2, context_length=3))
    assert [b[0].shape for b in batches] == [(2, 3), (1, 2)]  # truncated to 3, right-padded
    assert batches[0][1].tolist() == [[1, 1, 1], [1, 1, 1]] and batches[1][1].tolist() == [[1, 1]]
    import numpy as np

    np.save(tmp_path / "a.npy", np.arange(23, dtype=np.int32))
    np.save(tmp_path / "b.npy", np.arange(12, dtype=np.int64).reshape(2, 6))
    got = list(token_file_batches(tmp_path, batch_size=3, context_length=5))
    assert [b[0].shape for b in got] == [(3, 5), (1, 5), (2, 6)] and got[0][1] is None
    assert got[1][0].tolist() == [[15, 16, 17, 18, 19]]  # 23 tokens -> 4 pieces of 5, the tail dropped
    np.save(tmp_path / "c.npy", np.zeros(4, dtype=np.float32))
    with pytest.raises(InputError, match="integer ids"):
        list(token_file_batches(tmp_path / "c.npy", 2, 2))


# ---------------------------------------------------------------- loading

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for family in ("gpt2", "bert"):
        path = root / family
        tiny_lm(family, V).save_pretrained(path)
        tiny_tokenizer(mlm=family == "bert").save_pretrained(path)
        out[family] = path
    return out


def test_load_model_from_a_local_directory(saved):
    model, tok = load_model(saved["gpt2"])
    assert type(model).__name__ == "GPT2LMHeadModel" and not model.training and tok.pad_token == "[PAD]"
    bare = load_model(saved["gpt2"], head="none", dtype="bfloat16").model
    assert type(bare).__name__ == "GPT2Model" and bare.wte.weight.dtype == torch.bfloat16
    assert type(load_model(saved["bert"]).model).__name__ == "BertForMaskedLM"
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(saved["gpt2"].parent / "nope")


def _no_network(monkeypatch, tmp_path) -> list:
    """Every socket connection fails and is recorded; an empty Hugging Face cache."""
    import socket

    attempts = []

    def refuse(*a, **k):
        attempts.append(a)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return attempts


def test_offline_missing_model_is_one_line_naming_the_fix(monkeypatch, tmp_path):
    attempts = _no_network(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as e:
        load_model("no-such-org/no-such-model")
    msg = str(e.value)
    assert "\n" not in msg and "offline" in msg and "--model DIR" in msg and "no-such-org/no-such-model" in msg
    assert not attempts


def test_unreachable_hub_is_one_line_without_retries(monkeypatch, tmp_path):
    attempts = _no_network(monkeypatch, tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    probes = []
    monkeypatch.setattr("fastsae.model._hub_reachable", lambda timeout=3.0: probes.append(1) or False)
    with pytest.raises(ConfigError, match="cannot be reached") as e:
        load_model("gpt2")
    assert "\n" not in str(e.value) and probes == [1] and not attempts  # one probe, no download attempt


def test_a_script_in_the_checkout_root_imports_transformers_first(tmp_path):
    """Python run from the repository's root finds the folder kernels/ under the top-level name
    `kernels`, the PyPI package transformers imports; that folder hands over to the installed
    package, so a user script there may import transformers before fastsae."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import transformers, kernels; from transformers import BertConfig, BertModel; "
            "BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, "
            "vocab_size=20)); import fastsae, fastsae.kernels; "
            "print(kernels.__file__ != fastsae.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True"]
