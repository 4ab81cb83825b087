"""Activations straight from the model (fastsae.streaming) and several SAEs from one pass
(fastsae.group), on the tiny GPT-2 of fastsae.toy.tiny_lm: the source yields exactly the rows
harvest writes, a resumed streaming run equals the uninterrupted one (loss by loss, weights bit
for bit), a group equals separate runs, and `fastsae train --model`."""

import json

import numpy as np
import pytest
import torch

from helpers import require

require("transformers", "compat")
require("tokenizers", "compat")

import fastsae  # noqa: E402
from fastsae.cli import main  # noqa: E402
from fastsae.data import fingerprint_changes  # noqa: E402
from fastsae.errors import ConfigError, InputError  # noqa: E402
from fastsae.group import TrainerGroup  # noqa: E402
from fastsae.harvest import harvest  # noqa: E402
from fastsae.streaming import ModelSource, TokenStream  # noqa: E402
from fastsae.toy.tiny_lm import grammar_corpus, tiny_lm, word_tokenizer  # noqa: E402
from fastsae.tracking import read_log  # noqa: E402
from fastsae.trainer import TrainConfig, Trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
H0, H1 = "transformer.h.0", "transformer.h.1"
TEXTS = grammar_corpus(48, seed=3)


@pytest.fixture(scope="module")
def lm():
    tok = word_tokenizer(TEXTS)
    return tiny_lm("gpt2", len(tok)), tok


def _tokens(tok, texts=TEXTS, batch_size=4):
    return TokenStream(tokenizer=tok, texts=texts, batch_size=batch_size, context_length=32)


def _harvested(model, tok, hooks, tmp_path):
    m = harvest(model, tok, TEXTS, hooks, tmp_path / "acts", context_length=32, batch_size=4, shard_rows=100,
                progress=False)
    out = {}
    for h in hooks if isinstance(hooks, list) else [hooks]:
        folder = tmp_path / "acts" / (h if isinstance(hooks, list) else "")
        mf = json.loads((folder / "manifest.json").read_text())
        out[h] = torch.cat([torch.from_numpy(np.load(folder / s["file"])) for s in mf["shards"]])
    return out, m["rows"]


def test_the_stream_is_what_harvest_writes(lm, tmp_path):
    model, tok = lm
    want, n = _harvested(model, tok, [H0, H1], tmp_path)
    # in order, several buffers of whole forward passes, one epoch
    src = ModelSource(model, [H0, H1], _tokens(tok), batch_size=1, buffer_rows=37, shuffle=False, epochs=1)
    got = list(src)
    assert len(got) == n and src.forward_passes == 12  # 48 documents, 4 per pass
    for h in (H0, H1):
        assert torch.equal(torch.cat([b[h] for b in got]), want[h])
    # shuffled: the same rows (as a multiset), still paired across hooks, in another order
    src = ModelSource(model, [H0, H1], _tokens(tok), batch_size=1, buffer_rows=37, seed=5, epochs=1)
    batches = list(src)
    rows = {h: torch.cat([b[h] for b in batches]) for h in (H0, H1)}
    pair = lambda d: torch.cat([d[H0], d[H1]], 1)  # noqa: E731
    assert not torch.equal(pair(rows), pair(want))
    order = lambda t: t[np.lexsort(t.T.numpy()[::-1])]  # noqa: E731
    assert torch.equal(order(pair(rows)), order(pair(want)))
    # one hook alone: the same rows as that hook in the pair, batches cut across buffers
    one = ModelSource(model, H1, _tokens(tok), batch_size=16, buffer_rows=37, shuffle=False, epochs=1)
    batches = list(one)
    assert all(b.shape == (16, 32) for b in batches) and len(batches) == n // 16
    assert torch.equal(torch.cat(batches), want[H1][: n // 16 * 16])


def _cfg(out, d_sae=64, k=4, **kw):
    base = dict(sae=dict(d_in=32, d_sae=d_sae, architecture="topk", k=k), steps=14, batch_size=16, lr=3e-3,
                log_every=1, checkpoint_every=5, dead_tokens=40, init_sample_rows=64, out_dir=str(out),
                progress=False, console=False, plot=False)
    base.update(kw)
    return TrainConfig(**base)


def _source(model, tok, hooks=H0, texts=TEXTS[:12], **kw):
    return ModelSource(model, hooks, _tokens(tok, texts), batch_size=16, buffer_rows=40, seed=2, **kw)


def _losses(out_dir):
    return [(r["step"], r["loss"], r["mse"], r["auxk"], r["tokens"]) for r in read_log(out_dir / "log.jsonl")]


def _same_weights(a, b):
    sa, sb = fastsae.load(a).state_dict(), fastsae.load(b).state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("opt", ["row_sparse_adam", "adam"])
def test_a_resumed_streaming_run_equals_the_uninterrupted_one(lm, tmp_path, opt):
    model, tok = lm
    src = _source(model, tok)
    full = Trainer(_cfg(tmp_path / "full", optimizer=opt), src).fit()
    Trainer(_cfg(tmp_path / "cut", optimizer=opt), _source(model, tok)).fit(max_steps=8)
    # resumed from step 5 (as after a crash): the buffer then is re-made from its documents
    cut = Trainer.resume(tmp_path / "cut", _source(model, tok), checkpoint=tmp_path / "cut/checkpoints/step_00000005")
    assert cut.source.state_dict()["offset"] > 0  # mid-buffer
    cut = cut.fit()
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert [r[0] for r in b] == list(range(1, 15)) and a == b
    assert any(r[3] > 0 for r in a), "AuxK never ran"
    assert src.epoch >= 1  # past the end of the documents
    assert _same_weights(full.final_dir, cut.final_dir)


def test_resume_on_other_text_or_settings_is_refused(lm, tmp_path):
    model, tok = lm
    Trainer(_cfg(tmp_path / "run", steps=4), _source(model, tok)).fit()
    other = _source(model, tok, texts=TEXTS[12:24])
    with pytest.raises(ConfigError, match="documents_sample"):
        Trainer.resume(tmp_path / "run", other, steps=6)
    wider = ModelSource(model, H0, _tokens(tok, TEXTS[:12]), batch_size=16, buffer_rows=80, seed=2)
    with pytest.raises(ConfigError, match="buffer_rows: 40 -> 80"):
        Trainer.resume(tmp_path / "run", wider, steps=6)
    assert fingerprint_changes(_source(model, tok).fingerprint(), _source(model, tok, H1).fingerprint()) == \
        [f"hooks: ['{H0}'] -> ['{H1}']"]


def _group(model, tok, root, **kw):
    src = _source(model, tok, [H0, H1])
    specs = [(H0, 64, "a"), (H1, 64, "b"), (H1, 96, "c")]
    return TrainerGroup([Trainer(_cfg(root / name, d_sae=w, **kw), src.view(h)) for h, w, name in specs]), specs


def test_a_group_equals_separate_runs_and_resumes_whole(lm, tmp_path):
    model, tok = lm
    group, specs = _group(model, tok, tmp_path / "group")
    results = group.fit()
    assert [r.steps for r in results] == [14, 14, 14]
    for (h, w, name), res in zip(specs, results):
        alone = Trainer(_cfg(tmp_path / "alone" / name, d_sae=w), _source(model, tok, h)).fit()
        assert _losses(res.out_dir) == _losses(alone.out_dir), name
        assert _same_weights(res.final_dir, alone.final_dir), name
    # interrupted at 12 (checkpoints 10 and 12); run c's step 12 lost, as if killed while saving it
    cut, _ = _group(model, tok, tmp_path / "cut")
    cut.fit(max_steps=12)
    import shutil

    shutil.rmtree(tmp_path / "cut/c/checkpoints/step_00000012")
    resumed = TrainerGroup.resume([tmp_path / "cut" / n for n in "abc"], _source(model, tok, [H0, H1]),
                                  hooks=[H0, H1, H1])
    assert resumed.step == 10
    for res, (_, _, name) in zip(resumed.fit(), specs):
        assert _losses(res.out_dir) == _losses(tmp_path / "group" / name)
        assert _same_weights(res.final_dir, tmp_path / "group" / name / "final")


def test_group_and_source_errors_name_the_fix(lm, tmp_path):
    model, tok = lm
    src = _source(model, tok, [H0, H1])
    with pytest.raises(ConfigError, match=r"source\.view\(hook\)"):
        Trainer(_cfg(tmp_path / "x"), src)
    with pytest.raises(ConfigError, match="same steps"):
        TrainerGroup([Trainer(_cfg(tmp_path / "a"), src.view(H0)), Trainer(_cfg(tmp_path / "b", steps=3),
                                                                            src.view(H1))])
    with pytest.raises(ConfigError, match="views of one ModelSource"):
        TrainerGroup([Trainer(_cfg(tmp_path / "a"), src.view(H0)), Trainer(_cfg(tmp_path / "b"), _source(model, tok))])
    with pytest.raises(ConfigError, match="nonfinite='raise'"):
        TrainerGroup([Trainer(_cfg(tmp_path / "a", nonfinite="skip"), src.view(H0))])
    with pytest.raises(ConfigError, match="did you mean"):
        ModelSource(model, "transformer.h.O", _tokens(tok))
    with pytest.raises(ConfigError, match="above the model's limit of 32"):
        ModelSource(model, H0, TokenStream(tokenizer=tok, texts=TEXTS, context_length=64))
    with pytest.raises(InputError, match="only padding and special tokens"):
        list(ModelSource(model, H0, TokenStream(tokenizer=tok, texts=["<bos>"] * 3), batch_size=2, epochs=1))
    with pytest.raises(ConfigError, match="one kind of input"):
        TokenStream(tokenizer=tok, texts=TEXTS, token_files=["x.npy"])


def test_token_files_stream_and_resume_at_a_file_boundary(lm, tmp_path):
    model, tok = lm
    ids = torch.randint(3, len(tok), (10, 12), generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "a.npy", ids[:6].numpy())
    np.save(tmp_path / "b.npy", ids[6:].numpy())
    stream = TokenStream(token_files=[tmp_path], batch_size=4, context_length=12)
    assert [b[0].shape[0] for b in stream.batches()] == [4, 2, 4]  # batches restart with each file
    assert torch.equal(next(stream.batches(6))[0], ids[6:])
    with pytest.raises(InputError, match="not where a batch of the token files begins"):
        next(stream.batches(5))
    src = ModelSource(model, H0, stream, batch_size=12, buffer_rows=24, shuffle=False, epochs=1)
    from fastsae.model import capture

    want = capture(model, [H0], ids)[H0].reshape(-1, 32)
    assert torch.allclose(torch.cat(list(src)), want[:120], atol=1e-6)


@pytest.fixture(scope="module")
def saved(lm, tmp_path_factory):
    model, tok = lm
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "docs.txt").write_text("\n".join(TEXTS) + "\n")
    return path


def test_train_cli_streams_one_sae_per_hook_and_resumes(saved, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["train", "--model", str(saved), "--hook", H0, "--hook", H1, "--text", str(saved / "docs.txt"),
            "--expansion", "2", "--k", "4", "--batch-size", "16", "--buffer-rows", "40", "--model-batch-size", "4",
            "--log-every", "2", "--checkpoint-every", "3", "--out-dir", str(out), "--set", "plot=false",
            "--no-progress"]
    assert main(args + ["--steps", "6"]) == 0
    runs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    assert [(r["hook"], r["d_sae"]) for r in runs] == [(H0, 64), (H1, 64)]
    sae = fastsae.load(out / H1 / "final")
    assert sae.cfg.metadata["hook"] == H1 and sae.cfg.metadata["model"] == str(saved) and sae.cfg.k == 4
    assert main(args + ["--steps", "8", "--resume"]) == 0
    assert [r["step"] for r in read_log(out / H0 / "log.jsonl")] == [2, 4, 6, 8]
    # several widths on one hook: one folder each
    assert main(["train", "--model", str(saved), "--hook", H0, "--text", str(saved / "docs.txt"), "--widths", "48,96",
                 "--k", "4", "--batch-size", "16", "--buffer-rows", "40", "--steps", "2", "--out-dir",
                 str(tmp_path / "w"), "--set", "plot=false", "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [f"{H0}-48", f"{H0}-96"]


def test_train_cli_model_flags_errors(saved, tmp_path):
    text = str(saved / "docs.txt")
    cases = [
        (["--hook", H0, "--text", text], "add --model"),
        (["--model", str(saved), "--text", text], "--hook MODULE"),
        (["--model", str(saved), "--hook", H0], "--text FILE"),
        (["--model", str(saved), "--hook", H0, "--text", str(tmp_path / "nope.txt")], "does not exist"),
        (["--model", str(saved), "--hook", H0, "--text", text, "--data", str(tmp_path)], "pass one of them"),
        (["--model", str(saved), "--hook", H0, "--hook", H1, "--text", text, "--e2e"], "one --hook"),
        (["--model", str(saved), "--hook", H0, "--text", text, "--downstream", H1], "add --e2e"),
        (["--model", str(saved), "--hook", H0, "--text", text, "--k", "2"], "--d-sae N, --expansion E"),
    ]
    for flags, match in cases:
        with pytest.raises((ConfigError, InputError), match=match):
            main(["train", *flags, "--out-dir", str(tmp_path / "o"), "--no-progress"])
