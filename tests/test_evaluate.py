"""fastsae.evaluate and `fastsae eval` on tiny randomly initialised transformers models: the
CE-loss and KL scores against a hand computation, padding and special tokens excluded, masked
LMs on a fixed mask, reconstruction metrics against fastsae.metrics."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_TEXT, IdentitySAE, require, tiny_lm, tiny_tokenizer

transformers = require("transformers", "compat")
require("tokenizers", "compat")

import fastsae  # noqa: E402
from fastsae import metrics  # noqa: E402
from fastsae.cli import main  # noqa: E402
from fastsae.errors import ConfigError, InputError  # noqa: E402
from fastsae.evaluate import evaluate  # noqa: E402
from fastsae.model import token_batches  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
HOOK = "transformer.h.0"


def _sae(d_sae=64, k=4, dtype="float64", seed=0):
    torch.manual_seed(seed)
    return fastsae.TopKSAE(d_in=32, d_sae=d_sae, k=k, dtype=dtype)


def _batches(tok, batch_size=3, context_length=12, texts=TINY_TEXT):
    return list(token_batches(tok, texts, batch_size, context_length))


def _hand_scores(lm, sae, hook, batches, special):
    """The SAEBench definitions written out position by position."""
    module = lm.get_submodule(hook)
    sums = dict(ce_clean=0.0, ce_sae=0.0, ce_abl=0.0, kl_sae=0.0, kl_abl=0.0)
    n_ce = n_kl = 0
    for ids, am in batches:
        valid = am.bool() & ~torch.isin(ids, special)

        def replace(_m, _i, out, valid=valid):
            x = out[0] if isinstance(out, tuple) else out
            new = x.clone()
            new[valid] = sae(x[valid])
            return (new, *out[1:]) if isinstance(out, tuple) else new

        def zero(_m, _i, out):
            return (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)

        with torch.no_grad():
            logits = {"clean": lm(input_ids=ids, attention_mask=am).logits}
            for name, fn in (("sae", replace), ("abl", zero)):
                h = module.register_forward_hook(fn)
                logits[name] = lm(input_ids=ids, attention_mask=am).logits
                h.remove()
        lp = {k: torch.log_softmax(v.double(), -1) for k, v in logits.items()}
        B, S = ids.shape
        for b in range(B):
            for t in range(S):
                if not valid[b, t]:
                    continue
                n_kl += 1
                for name in ("sae", "abl"):
                    sums[f"kl_{name}"] += float((lp["clean"][b, t].exp() * (lp["clean"][b, t] - lp[name][b, t])).sum())
                if t + 1 < S and am[b, t + 1]:
                    n_ce += 1
                    for name in ("clean", "sae", "abl"):
                        sums[f"ce_{name}"] -= float(lp[name][b, t, ids[b, t + 1]])
    m = {k: v / (n_ce if k.startswith("ce") else n_kl) for k, v in sums.items()}
    return {
        "ce_loss_score": (m["ce_abl"] - m["ce_sae"]) / (m["ce_abl"] - m["ce_clean"]),
        "kl_div_score": (m["kl_abl"] - m["kl_sae"]) / m["kl_abl"],
        "delta_lm_loss": m["ce_sae"] - m["ce_clean"],
        "ce_loss_without_sae": m["ce_clean"], "ce_loss_with_ablation": m["ce_abl"], "kl_div_with_sae": m["kl_sae"],
        "ce_tokens": n_ce, "tokens": n_kl,
    }


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def gpt2(tok):
    return tiny_lm("gpt2", len(tok)).double()


def test_scores_match_a_hand_computation(gpt2, tok):
    sae = _sae()
    batches = _batches(tok)
    assert any((am == 0).any() for _, am in batches)  # padding is present
    special = torch.tensor(tok.all_special_ids)
    want = _hand_scores(gpt2, sae, HOOK, batches, special)
    got = evaluate(gpt2, sae, HOOK, batches, tokenizer=tok, progress=False).metrics
    assert got["objective"] == "next-token"
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert 0 < got["ce_loss_score"] < 1 and got["kl_div_with_ablation"] > got["kl_div_with_sae"] > 0


def test_padding_and_special_tokens_are_excluded_everywhere(gpt2, tok):
    sae = _sae(seed=1)
    padded = evaluate(gpt2, sae, HOOK, _batches(tok, batch_size=5), tokenizer=tok, progress=False).metrics
    single = evaluate(gpt2, sae, HOOK, _batches(tok, batch_size=1), tokenizer=tok, progress=False).metrics
    n_words = sum(len(t.split()) for t in TINY_TEXT)
    assert padded["tokens"] == single["tokens"] == n_words  # no <bos>, no [PAD]
    for key, value in single.items():
        if key not in ("sequences", "hook", "sae", "objective") and isinstance(value, (int, float)):
            assert padded[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    with_special = evaluate(gpt2, sae, HOOK, _batches(tok, batch_size=5), tokenizer=tok, exclude_special=False,
                            progress=False).metrics
    assert with_special["tokens"] == n_words + len(TINY_TEXT)  # <bos> counted, padding still not


def test_a_perfect_sae_scores_one(gpt2, tok):
    m = evaluate(gpt2, IdentitySAE(32, torch.float64), HOOK, _batches(tok), tokenizer=tok, progress=False).metrics
    assert m["ce_loss_score"] == pytest.approx(1, abs=1e-9) and m["kl_div_score"] == pytest.approx(1, abs=1e-9)
    assert m["fvu"] == pytest.approx(0, abs=1e-12) and m["relative_reconstruction_bias"] == pytest.approx(1)
    assert m["dead_latents"] == 0 and m["l0"] > 20  # IdentitySAE's "latents" are x itself


def test_reconstruction_metrics_match_fastsae_metrics_and_bare_models_skip_ce(tok):
    bare = tiny_lm("gpt2", len(tok), head=False)
    sae = _sae(d_sae=256, dtype="float32")
    batches = _batches(tok, batch_size=2)
    res = evaluate(bare, sae, "h.0", batches, tokenizer=tok, dense_threshold=0.3, progress=False)
    m = res.metrics
    assert m["objective"] is None and all(m[k] is None for k in ("ce_loss_score", "kl_div_score", "delta_lm_loss"))
    special = torch.tensor(tok.all_special_ids)
    with torch.no_grad():
        x = torch.cat([bare(input_ids=i, attention_mask=a, output_hidden_states=True).hidden_states[1][
            a.bool() & ~torch.isin(i, special)] for i, a in batches])
        acts, x_hat = sae.encode(x), sae(x)
    assert m["tokens"] == x.shape[0]
    assert m["fvu"] == pytest.approx(metrics.fvu(x, x_hat), rel=1e-4)  # around the mean of all tokens
    assert m["explained_variance"] == pytest.approx(1 - m["fvu"])
    assert m["relative_reconstruction_bias"] == pytest.approx(metrics.shrinkage(x, x_hat), rel=1e-4)
    assert m["l0"] == pytest.approx(metrics.l0(acts))
    counts = metrics.latent_fire_counts(acts)
    assert m["dead_latents"] == metrics.dead_latents(counts) > 0
    torch.testing.assert_close(res.feature_density, counts.double() / x.shape[0])
    assert m["dense_latents"] == int((counts.double() / x.shape[0] > 0.3).sum())


def test_masked_lm_scores_on_a_fixed_random_mask():
    tok = tiny_tokenizer(mlm=True)
    bert = tiny_lm("bert", len(tok)).double()
    hook = "bert.encoder.layer.0"
    sae = _sae()
    batches = _batches(tok)
    run = lambda seed, s=sae: evaluate(bert, s, hook, batches, tokenizer=tok, seed=seed, progress=False).metrics  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert a["objective"] == "masked-lm" and a == b and a["ce_loss_score"] != c["ce_loss_score"]
    # by hand: the same mask (same generator draws), CE at the masked positions only
    special = torch.tensor(tok.all_special_ids)
    g = torch.Generator().manual_seed(0)
    ce = n = 0.0
    for ids, am in batches:
        valid = am.bool() & ~torch.isin(ids, special)
        masked = valid & (torch.rand(ids.shape, generator=g) < 0.15)
        with torch.no_grad():
            logits = bert(input_ids=ids.masked_fill(masked, tok.mask_token_id), attention_mask=am).logits
        ce += float(F.cross_entropy(logits[masked], ids[masked], reduction="sum"))
        n += int(masked.sum())
    assert a["ce_tokens"] == n > 0 and a["ce_loss_without_sae"] == pytest.approx(ce / n, rel=1e-9)
    perfect = run(0, IdentitySAE(32, torch.float64))
    assert perfect["ce_loss_score"] == pytest.approx(1, abs=1e-9)


def test_errors_name_the_problem(gpt2, tok):
    with pytest.raises(InputError, match="no tokens"):
        evaluate(gpt2, _sae(), HOOK, [], tokenizer=tok, progress=False)
    with pytest.raises(InputError, match="vocabulary has 25 tokens"):
        evaluate(gpt2, _sae(), HOOK, [(torch.full((1, 4), 25), None)], tokenizer=tok, progress=False)
    long = [(torch.full((1, 40), 5), None)]
    with pytest.raises(ConfigError, match="limit of 32 positions"):
        evaluate(gpt2, _sae(), HOOK, long, tokenizer=tok, progress=False)


def test_cli_eval_writes_json_markdown_and_plot(tmp_path, tok, capsys):
    model_dir = tmp_path / "model"
    tiny_lm("gpt2", len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (tmp_path / "docs.txt").write_text("\n".join(TINY_TEXT) + "\n")
    sae = fastsae.TopKSAE(d_in=32, d_sae=64, k=4, metadata={"model": str(model_dir), "hook": "h.0"})
    sae.save_pretrained(tmp_path / "sae")
    out = tmp_path / "eval"
    rc = main(["eval", "--sae", str(tmp_path / "sae"), "--text", str(tmp_path / "docs.txt"), "--out", str(out),
               "--batch-size", "2", "--no-progress"])
    assert rc == 0 and "CE-loss score" in capsys.readouterr().out
    m = json.loads((out / "eval.json").read_text())
    assert m["hook"] == "transformer.h.0" and m["model"] == str(model_dir) and math.isfinite(m["ce_loss_score"])
    assert sum(m["density_histogram"]["counts"]) + m["dead_latents"] == 64
    md = (out / "eval.md").read_text()
    assert "CE-loss score" in md and f"{m['ce_loss_score']:.4f}" in md
    assert (out / "feature_density.png").stat().st_size > 1000 and (out / "feature_density.npy").is_file()
    import numpy as np

    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(3, len(tok), 200))
    rc = main(["eval", "--sae", str(tmp_path / "sae"), "--tokens", str(tmp_path / "tokens.npy"), "--out",
               str(tmp_path / "eval2"), "--context-length", "16", "--recon-only", "--no-progress"])
    m2 = json.loads((tmp_path / "eval2" / "eval.json").read_text())
    assert rc == 0 and m2["tokens"] == 192 and m2["ce_loss_score"] is None
