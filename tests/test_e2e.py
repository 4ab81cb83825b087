"""End-to-end training (fastsae.e2e) on the tiny GPT-2: the gradients the sparse backward gets
through the model equal autograd's through a dense TopK SAE written in plain torch ops (float64),
nothing [tokens, d_sae]-shaped is kept for backward, a resumed run equals the uninterrupted one,
and `fastsae train --e2e`."""

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import require

require("transformers", "compat")
require("tokenizers", "compat")

import fastsae  # noqa: E402
from fastsae.cli import main  # noqa: E402
from fastsae.e2e import E2ESource, E2ETrainer, clean_pass, e2e_loss  # noqa: E402
from fastsae.errors import ConfigError  # noqa: E402
from fastsae.model import special_token_ids, splice, token_batches, valid_positions  # noqa: E402
from fastsae.streaming import TokenStream  # noqa: E402
from fastsae.toy.tiny_lm import grammar_corpus, tiny_lm, word_tokenizer  # noqa: E402
from fastsae.tracking import read_log  # noqa: E402
from fastsae.trainer import TrainConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
H0, H1 = "transformer.h.0", "transformer.h.1"
TEXTS = grammar_corpus(24, seed=4)
D_SAE = 200  # no dimension of the model or the batch is this wide


class DenseTopK(torch.nn.Module):
    """The TopK SAE written out in plain torch ops: dense [N, d_sae] activations, autograd
    through everything (normalize_activations "none" or "layer_norm")."""

    def __init__(self, sae):
        super().__init__()
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            setattr(self, name, torch.nn.Parameter(getattr(sae, name).detach().clone()))
        self.k, self.d_in, self.d_sae, self.norm = sae.cfg.k, sae.d_in, sae.d_sae, sae.cfg.normalize_activations

    def encode(self, x):
        raise NotImplementedError

    decode = encode

    def forward(self, x):
        mu = std = None
        if self.norm == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            std = (x - mu).std(-1, keepdim=True)
            x = (x - mu) / (std + 1e-5)
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        vals, idx = pre.topk(self.k, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        y = acts @ self.W_dec + self.b_dec
        return y if mu is None else y * std + mu


@pytest.fixture(scope="module")
def lm():
    tok = word_tokenizer(TEXTS)
    model = tiny_lm("gpt2", len(tok)).double().requires_grad_(False)
    return model, tok


def _batch(tok, n=6):
    ids, am = next(token_batches(tok, TEXTS[:n], n, 32))
    return ids, am, valid_positions(ids, am, special_token_ids(tok))


def _sae(norm="none", seed=0):
    torch.manual_seed(seed)
    sae = fastsae.TopKSAE(d_in=32, d_sae=D_SAE, k=4, dtype="float64", normalize_activations=norm)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


@pytest.mark.parametrize("norm,downstream", [("none", []), ("none", [H1]), ("layer_norm", [H1])])
def test_e2e_gradients_equal_autograd_through_a_dense_reference(lm, norm, downstream):
    model, tok = lm
    ids, am, valid = _batch(tok)
    sae = _sae(norm)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    clean = clean_pass(model, H0, ids, am, valid, downstream)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        out = e2e_loss(model, sae, H0, clean, kl_coefficient=0.8, downstream_coefficient=0.7)
    assert shapes and not [s for s in shapes if D_SAE in s], "a [.., d_sae] tensor was kept for backward"
    rows, db_dec = out.backward(sae)
    assert all(torch.equal(before[k], v) for k, v in sae.state_dict().items())  # gradients only

    ref = DenseTopK(sae)
    kept = {}
    hook = model.get_submodule(H1).register_forward_hook(
        lambda _m, _i, o: kept.update(h1=o[0] if isinstance(o, tuple) else o))
    with splice(model, {H0: ref}, mask=valid):
        logits = model(input_ids=ids, attention_mask=am).logits
    hook.remove()
    n = int(valid.sum())
    loss = 0.8 * F.kl_div(torch.log_softmax(logits[valid], -1), clean.logp, log_target=True, reduction="sum") / n
    if downstream:
        loss = loss + 0.7 * F.mse_loss(kept["h1"][valid], clean.downstream[H1])
    loss.backward()
    assert float(out.loss.detach()) == pytest.approx(float(loss.detach()), rel=1e-12)
    dense = rows.to_dense()
    fired = torch.zeros(D_SAE, dtype=torch.bool)
    fired[rows.latents] = True
    assert fired.sum() > 4
    for name, want in (("dW_enc", ref.W_enc.grad), ("db_enc", ref.b_enc.grad), ("dW_dec", ref.W_dec.grad)):
        torch.testing.assert_close(dense[name], want, rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(db_dec, ref.b_dec.grad, rtol=1e-9, atol=1e-12)
    assert out.kl > 0 and (out.downstream > 0) == bool(downstream)


def test_a_downstream_hook_before_the_sae_is_refused(lm):
    model, tok = lm
    ids, am, valid = _batch(tok)
    with pytest.raises(ConfigError, match="runs before"):
        e2e_loss(model, _sae(), H1, clean_pass(model, H1, ids, am, valid, [H0]))


def _cfg(out, **kw):
    base = dict(sae=dict(d_in=32, d_sae=48, architecture="topk", k=4, dtype="float64"), steps=10, batch_size=4,
                lr=1e-2, log_every=1, checkpoint_every=3, dead_tokens=60, k_aux=8, init_sample_rows=64,
                out_dir=str(out), progress=False, console=False, plot=False,
                extra={"e2e": {"downstream": [H1], "downstream_coefficient": 0.5}})
    base.update(kw)
    return TrainConfig(**base)


def _source(model, tok):
    return E2ESource(model, H0, TokenStream(tokenizer=tok, texts=TEXTS, batch_size=4, context_length=32))


def _log(out):
    keys = ("step", "loss", "kl", "downstream", "auxk", "tokens")
    return [tuple(r[k] for k in keys) for r in read_log(out / "log.jsonl")]


def test_e2e_training_resumes_exactly_and_lowers_the_kl(lm, tmp_path):
    model, tok = lm
    full = E2ETrainer(_cfg(tmp_path / "full"), _source(model, tok)).fit()
    E2ETrainer(_cfg(tmp_path / "cut"), _source(model, tok)).fit(max_steps=7)
    cut = E2ETrainer.resume(tmp_path / "cut", _source(model, tok),
                            checkpoint=tmp_path / "cut/checkpoints/step_00000006")
    assert cut.source.state_dict() == {"epoch": 0, "doc": 24}  # the position, saved at the end of an epoch
    cut = cut.fit()
    a, b = _log(tmp_path / "full"), _log(tmp_path / "cut")
    assert a == b and [r[0] for r in a] == list(range(1, 11))
    assert any(r[4] > 0 for r in a), "AuxK never ran"
    sa, sb = fastsae.load(full.final_dir).state_dict(), fastsae.load(cut.final_dir).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sum(r[2] for r in a[-3:]) < sum(r[2] for r in a[:3])  # it learns to keep the output
    assert not any(p.requires_grad for p in model.parameters())


def test_e2e_trainer_refuses_what_it_cannot_train(lm, tmp_path):
    model, tok = lm
    with pytest.raises(ConfigError, match="sparse path"):
        E2ETrainer(_cfg(tmp_path / "a", sae=dict(d_in=32, d_sae=48, architecture="standard", dtype="float64")),
                   _source(model, tok))
    with pytest.raises(ConfigError, match="unknown end-to-end setting"):
        E2ETrainer(_cfg(tmp_path / "b", extra={"e2e": {"kl": 1.0}}), _source(model, tok))
    with pytest.raises(ConfigError, match="E2ESource"):
        E2ETrainer(_cfg(tmp_path / "c"), torch.randn(64, 32))


def test_train_cli_e2e(lm, tmp_path, capsys):
    model, tok = lm
    path = tmp_path / "model"
    model.float().save_pretrained(path)
    model.double()
    tok.save_pretrained(path)
    (path / "docs.txt").write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "out"
    assert main(["train", "--model", str(path), "--hook", H0, "--text", str(path / "docs.txt"), "--e2e",
                 "--downstream", H1, "--expansion", "2", "--k", "4", "--steps", "3", "--batch-size", "4",
                 "--out-dir", str(out), "--set", "plot=false", "--no-progress"]) == 0
    run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"][0]
    sae = fastsae.load(run["final"])
    assert sae.cfg.metadata["training"] == "end-to-end" and sae.cfg.metadata["hook"] == H0 and sae.d_sae == 64
    saved = json.loads((out / H0 / "train_config.json").read_text())
    assert saved["batch_size"] == 4 and saved["extra"]["e2e"] == {"downstream": [H1]}
    assert [r["step"] for r in read_log(out / H0 / "log.jsonl")] == [3]
