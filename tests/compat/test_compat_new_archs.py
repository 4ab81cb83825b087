"""Gated, Matryoshka BatchTopK and transcoders against the peers' own modules (SAELens,
dictionary_learning, sparsify from PyPI): their checkpoints loaded by fastsae, fastsae's saved
for them, live modules converted, outputs compared within 1e-5."""

import pytest
import torch

import fastsae
from fastsae import SAEConfig, build_sae
from fastsae.compat import convert
from fastsae.errors import CheckpointError
from helpers import randomize_, require

sae_lens = require("sae_lens", "compat")
dl_dict = require("dictionary_learning.dictionary", "compat")
dl_matryoshka = require("dictionary_learning.trainers.matryoshka_batch_top_k", "compat")
sparse_coder = require("sparsify.sparse_coder", "compat")
sparsify_config = require("sparsify.config", "compat")

D, N, K = 16, 48, 4
TOL = dict(rtol=1e-5, atol=1e-5)


def inputs(rows=9, d=D, seed=1):
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed)) * 2


# ------------------------------------------------------------------------------------ Gated
def saelens_gated(apply_b_dec=True):
    return randomize_(sae_lens.GatedSAE(sae_lens.GatedSAEConfig(d_in=D, d_sae=N, apply_b_dec_to_input=apply_b_dec)))


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_gated_load_save(tmp_path, apply_b_dec):
    ours = saelens_round_trip(saelens_gated(apply_b_dec), tmp_path)
    assert ours.cfg.architecture == "gated" and ours.cfg.apply_b_dec_to_input == apply_b_dec


def saelens_round_trip(theirs, tmp_path):
    """SAELens saves, fastsae loads (and converts the live module), fastsae saves, SAELens loads:
    encode and forward equal the SAELens module's at every step. Returns fastsae's module."""
    theirs.save_model(tmp_path / "theirs")
    ours = fastsae.load(tmp_path / "theirs")
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), **TOL)
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
        torch.testing.assert_close(convert.from_module(theirs)(x), theirs(x), **TOL)
    fastsae.formats.save(ours, tmp_path / "ours", format="saelens")
    back = sae_lens.SAE.load_from_disk(tmp_path / "ours")
    assert type(back) is type(theirs)
    with torch.no_grad():
        torch.testing.assert_close(back(x), theirs(x), **TOL)
    return ours


def test_saelens_gated_training_loss_terms():
    """SAELens's training SAE and fastsae agree on the MSE and the L1 term; the auxiliary term
    differs by design (fastsae freezes the decoder there, as the paper)."""
    cfg = sae_lens.GatedTrainingSAEConfig(d_in=D, d_sae=N, l1_coefficient=0.3)
    theirs = randomize_(sae_lens.GatedTrainingSAE(cfg))
    ours = convert.from_module(theirs)
    ours.train()
    ours.cfg.l1_coefficient = 0.3  # a training setting: the checkpoint formats do not carry it
    x = inputs()
    step = sae_lens.saes.sae.TrainStepInput(sae_in=x, coefficients={"l1": 0.3}, dead_neuron_mask=None,
                                            n_training_steps=0, is_logging_step=False)
    out = theirs.training_forward_pass(step)
    mine = ours.training_forward(x)
    for name, theirs_name in (("mse", "mse_loss"), ("sparsity", "l1_loss"), ("aux", "auxiliary_reconstruction_loss")):
        want = float(out.losses[theirs_name].detach())
        assert float(getattr(mine, name).detach()) == pytest.approx(want, rel=1e-5), name


def test_dictionary_learning_gated_load_save(tmp_path):
    theirs = randomize_(dl_dict.GatedAutoEncoder(D, N))
    (tmp_path / "theirs").mkdir()
    torch.save(theirs.state_dict(), tmp_path / "theirs" / "ae.pt")
    ours = fastsae.load(tmp_path / "theirs")
    assert ours.cfg.architecture == "gated"
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), **TOL)
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
        torch.testing.assert_close(convert.from_module(theirs)(x), theirs(x), **TOL)
        # a fastsae Gated SAE that does not subtract b_dec is folded into dictionary_learning's form
        alt = build_sae(ours.cfg.replace(apply_b_dec_to_input=False), init=False)
        alt.load_state_dict(ours.state_dict())
        for sae, name in ((ours, "ours"), (alt, "alt")):
            fastsae.formats.save(sae, tmp_path / name, format="dictionary_learning")
            back = dl_dict.GatedAutoEncoder.from_pretrained(tmp_path / name / "ae.pt")
            torch.testing.assert_close(back(x), sae(x), **TOL)


# ------------------------------------------------------------------------------------ Matryoshka
WIDTHS = [6, 18, N]


def test_saelens_matryoshka_load_save(tmp_path):
    cfg = sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=K, matryoshka_widths=list(WIDTHS),
                                                        rescale_acts_by_decoder_norm=True)
    theirs = randomize_(sae_lens.MatryoshkaBatchTopKTrainingSAE(cfg))
    theirs.topk_threshold = torch.tensor(0.3, dtype=torch.double)
    theirs.save_model(tmp_path / "theirs")
    ours = fastsae.load(tmp_path / "theirs")
    assert ours.cfg.architecture == "matryoshka_batchtopk" and ours.cfg.matryoshka_widths == WIDTHS
    assert float(ours.threshold) == pytest.approx(0.3)
    x = inputs(12)
    ours.train()  # SAELens's training SAE always selects the batch top-k
    step = sae_lens.saes.sae.TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0,
                                            is_logging_step=False)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x, dense=True), theirs.encode(x), **TOL)
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
        # the loss: SAELens's outer MSE plus its inner levels' MSEs
        out = theirs.training_forward_pass(step)
    mine = ours.training_forward(x)  # (also updates the threshold's EMA, as SAELens's training step does)
    assert float(mine.loss.detach()) == pytest.approx(float(out.loss), rel=1e-5)
    threshold = float(ours.threshold)
    with torch.no_grad():
        live = convert.from_module(theirs)
        live.train()
        torch.testing.assert_close(live(x), theirs(x), **TOL)
    ours.cfg.matryoshka_weights = [1.0, 2.0, 1.0]
    fastsae.formats.save(ours, tmp_path / "ours", format="saelens")
    back = sae_lens.MatryoshkaBatchTopKTrainingSAE.load_from_disk(tmp_path / "ours")
    assert back.cfg.matryoshka_widths == WIDTHS
    with torch.no_grad():
        torch.testing.assert_close(back(x), theirs(x), **TOL)
    again = fastsae.load(tmp_path / "ours")
    assert again.cfg.matryoshka_weights == [1.0, 2.0, 1.0] and float(again.threshold) == pytest.approx(threshold)


def dl_matryoshka_module(threshold=0.2):
    theirs = randomize_(dl_matryoshka.MatryoshkaBatchTopKSAE(D, N, K, [6, 12, N - 18]))
    theirs.threshold.fill_(threshold)
    return theirs


def test_dictionary_learning_matryoshka_load_save(tmp_path):
    theirs = dl_matryoshka_module()
    (tmp_path / "theirs").mkdir()
    torch.save(theirs.state_dict(), tmp_path / "theirs" / "ae.pt")
    ours = fastsae.load(tmp_path / "theirs")
    assert ours.cfg.architecture == "matryoshka_batchtopk" and ours.cfg.matryoshka_widths == [6, 18, N]
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x, dense=True), theirs.encode(x), **TOL)  # the threshold
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
        torch.testing.assert_close(convert.from_module(theirs)(x), theirs(x), **TOL)
        ours.train()
        torch.testing.assert_close(ours.encode(x, dense=True), theirs.encode(x, use_threshold=False), **TOL)
        ours.eval()
    ours.cfg.matryoshka_weights = [0.5, 1.0, 2.0]
    fastsae.formats.save(ours, tmp_path / "ours", format="dictionary_learning")
    back = dl_matryoshka.MatryoshkaBatchTopKSAE.from_pretrained(tmp_path / "ours" / "ae.pt")
    with torch.no_grad():
        torch.testing.assert_close(back(x), theirs(x), **TOL)
    assert fastsae.load(tmp_path / "ours").cfg.matryoshka_weights == [0.5, 1.0, 2.0]


# ------------------------------------------------------------------------------------ transcoders
SAELENS_TRANSCODERS = {
    "transcoder": (sae_lens.Transcoder, sae_lens.TranscoderConfig),
    "skip_transcoder": (sae_lens.SkipTranscoder, sae_lens.SkipTranscoderConfig),
    "jumprelu_transcoder": (sae_lens.JumpReLUTranscoder, sae_lens.JumpReLUTranscoderConfig),
    "jumprelu_skip_transcoder": (sae_lens.JumpReLUSkipTranscoder, sae_lens.JumpReLUSkipTranscoderConfig),
}


@pytest.mark.parametrize("arch", SAELENS_TRANSCODERS)
def test_saelens_transcoders_load_save(tmp_path, arch):
    cls, cfg_cls = SAELENS_TRANSCODERS[arch]
    theirs = randomize_(cls(cfg_cls(d_in=D, d_sae=N, d_out=10, apply_b_dec_to_input=False)))
    ours = saelens_round_trip(theirs, tmp_path)
    assert ours.cfg.transcoder and ours.d_out == 10 and ours.cfg.skip_connection == ("skip" in arch)


@pytest.mark.parametrize("transcode,skip", [(True, False), (True, True), (False, True)])
def test_sparsify_transcoders_and_skip_load_save(tmp_path, transcode, skip):
    cfg = sparsify_config.SparseCoderConfig(num_latents=N, k=K, transcode=transcode, skip_connection=skip)
    theirs = randomize_(sparse_coder.SparseCoder(D, cfg))
    theirs.save_to_disk(tmp_path / "theirs")
    ours = fastsae.load(tmp_path / "theirs")
    assert ours.cfg.transcoder == transcode and ours.cfg.skip_connection == skip
    x = inputs()
    with torch.no_grad():
        want = theirs(x).sae_out
        torch.testing.assert_close(ours(x), want, **TOL)
        torch.testing.assert_close(convert.from_module(theirs)(x), want, **TOL)
    fastsae.formats.save(ours, tmp_path / "ours", format="sparsify")
    back = sparse_coder.SparseCoder.load_from_disk(tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(back(x).sae_out, want, **TOL)


def test_formats_refuse_what_they_cannot_hold(tmp_path):
    tc = build_sae(SAEConfig(d_in=D, d_sae=N, architecture="topk", k=K, transcoder=True, d_out=8,
                             apply_b_dec_to_input=False))
    with pytest.raises(CheckpointError, match="ReLU and JumpReLU transcoders only"):
        fastsae.formats.save(tc, tmp_path / "a", format="saelens")
    with pytest.raises(CheckpointError, match="input's width"):
        fastsae.formats.save(tc, tmp_path / "b", format="sparsify")
    with pytest.raises(CheckpointError, match="no transcoders"):
        fastsae.formats.save(tc, tmp_path / "c", format="dictionary_learning")
    m = build_sae(SAEConfig(d_in=D, d_sae=N, architecture="matryoshka_batchtopk", k=K, matryoshka_widths=WIDTHS,
                            apply_b_dec_to_input=False))
    with pytest.raises(CheckpointError, match="format='saelens'"):
        fastsae.formats.save(m, tmp_path / "d", format="dictionary_learning")
    with pytest.raises(CheckpointError, match="never learned its inference threshold"):
        theirs = dl_matryoshka_module(threshold=-1.0)
        (tmp_path / "e").mkdir()
        torch.save(theirs.state_dict(), tmp_path / "e" / "ae.pt")
        fastsae.load(tmp_path / "e")
