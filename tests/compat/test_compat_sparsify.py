"""fastsae against the real EleutherAI sparsify: SparseCoders with random weights saved by its
own code, loaded by fastsae (and the reverse); the SparseCoder facade's outputs and gradients."""

import pytest
import torch

import fastsae
from fastsae.compat import convert, facades
from helpers import require

sparsify = require("sparsify", "compat")

D, N, K = 16, 64, 6
TOL = dict(rtol=1e-5, atol=1e-5)


def make_coder(seed=0, **cfg):
    cfg.setdefault("k", K)
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=N, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (D ** -0.5 if p.dim() == 2 else 0.2))
    return coder


def inputs(seed=1, rows=9):
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed)) * 2


def dense(values, indices):
    return torch.zeros(values.shape[0], N).scatter_add(-1, indices, values)


def check_same(coder, ours, x):
    top_acts, top_indices, _ = coder.encode(x)
    acts = ours.encode(x)
    torch.testing.assert_close(dense(acts.values, acts.indices), dense(top_acts, top_indices), **TOL)
    torch.testing.assert_close(ours.decode(acts), coder.decode(top_acts, top_indices), **TOL)
    torch.testing.assert_close(ours(x), coder(x).sae_out, **TOL)


@pytest.mark.parametrize("transcode", [False, True])
def test_load_sparsify_checkpoint(tmp_path, transcode):
    coder = make_coder(transcode=transcode)
    coder.save_to_disk(tmp_path)
    assert fastsae.formats.detect_format(tmp_path) == "sparsify"
    ours = fastsae.load(tmp_path)
    assert ours.cfg.architecture == "topk" and ours.cfg.k == K and ours.cfg.apply_b_dec_to_input != transcode
    check_same(sparsify.SparseCoder.load_from_disk(tmp_path), ours, inputs())


def test_run_directory_with_hookpoints(tmp_path):
    coders = {"layers.3": make_coder(1), "layers.5.mlp": make_coder(2)}
    for name, coder in coders.items():
        coder.save_to_disk(tmp_path / name)
    assert fastsae.formats.detect_format(tmp_path) == "sparsify"
    with pytest.raises(fastsae.CheckpointError, match=r"hookpoints \['layers\.3', 'layers\.5\.mlp'\]: pass hookpoint="):
        fastsae.load(tmp_path)
    check_same(coders["layers.5.mlp"], fastsae.load(tmp_path, hookpoint="layers.5.mlp"), inputs())
    many = facades.SparseCoder.load_many(tmp_path)
    assert list(many) == ["layers.3", "layers.5.mlp"]
    check_same(coders["layers.3"], many["layers.3"].sae, inputs())


def test_convert_live_coder():
    coder = make_coder(4)
    check_same(coder, convert.from_module(coder), inputs())


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_sparsify_reads_what_fastsae_saves(tmp_path, apply_b_dec_to_input):
    torch.manual_seed(0)
    ours = fastsae.TopKSAE(d_in=D, d_sae=N, k=K, apply_b_dec_to_input=apply_b_dec_to_input)
    with torch.no_grad():
        ours.b_enc.normal_(0, 0.2)
        ours.b_dec.normal_(0, 0.5)
    fastsae.formats.save(ours, tmp_path, format="sparsify")
    coder = sparsify.SparseCoder.load_from_disk(tmp_path)
    assert not coder.cfg.transcode  # a b_dec-free encoder is folded into the bias: still an SAE
    x = inputs()
    torch.testing.assert_close(coder(x).sae_out, ours(x), **TOL)
    torch.testing.assert_close(fastsae.load(tmp_path)(x), ours(x), **TOL)


def test_sparsify_refuses_what_it_cannot_hold(tmp_path):
    with pytest.raises(fastsae.CheckpointError, match="TopK coders only"):
        fastsae.formats.save(fastsae.StandardSAE(d_in=D, d_sae=N), tmp_path, format="sparsify")
    coder = make_coder(activation="groupmax", k=4)
    coder.save_to_disk(tmp_path / "g")
    with pytest.raises(fastsae.CheckpointError, match="groupmax"):
        fastsae.load(tmp_path / "g")


# ------------------------------------------------------------------ the SparseCoder facade
def test_facade_output_tuples_have_sparsify_fields():
    assert facades.EncoderOutput._fields == sparsify.fused_encoder.EncoderOutput._fields
    assert facades.ForwardOutput._fields == sparsify.sparse_coder.ForwardOutput._fields


def test_facade_encode_decode_forward_match(tmp_path):
    coder = make_coder(5)
    coder.save_to_disk(tmp_path)
    facade = facades.SparseCoder.load_from_disk(tmp_path)
    x = inputs()
    theirs, ours = coder.encode(x), facade.encode(x)
    torch.testing.assert_close(dense(ours.top_acts, ours.top_indices), dense(theirs.top_acts, theirs.top_indices),
                               **TOL)
    torch.testing.assert_close(ours.pre_acts, theirs.pre_acts, **TOL)
    torch.testing.assert_close(facade.decode(theirs.top_acts, theirs.top_indices),
                               coder.decode(theirs.top_acts, theirs.top_indices), **TOL)
    assert facade.d_in == coder.d_in and facade.num_latents == coder.num_latents
    torch.testing.assert_close(facade.encoder.weight, coder.encoder.weight, **TOL)


@pytest.mark.parametrize("multi_topk", [False, True])
def test_facade_forward_losses_and_gradients_match(multi_topk):
    coder = make_coder(6, multi_topk=multi_topk)
    facade = facades.SparseCoder(convert.from_module(coder), multi_topk=multi_topk)
    x = inputs(rows=12)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::3] = True
    theirs, ours = coder(x, dead_mask=dead), facade(x, dead_mask=dead)
    for name in ("sae_out", "fvu", "auxk_loss", "multi_topk_fvu"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), **TOL, msg=name)
    torch.testing.assert_close(dense(ours.latent_acts.detach(), ours.latent_indices),
                               dense(theirs.latent_acts.detach(), theirs.latent_indices), **TOL)
    (theirs.fvu + theirs.auxk_loss + theirs.multi_topk_fvu).backward()
    (ours.fvu + ours.auxk_loss + ours.multi_topk_fvu).backward()
    torch.testing.assert_close(facade.W_dec.grad, coder.W_dec.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(facade.b_dec.grad, coder.b_dec.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(facade.sae.W_enc.grad.t(), coder.encoder.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(facade.sae.b_enc.grad, coder.encoder.bias.grad, rtol=1e-4, atol=1e-5)
    coder.remove_gradient_parallel_to_decoder_directions()
    facade.remove_gradient_parallel_to_decoder_directions()
    torch.testing.assert_close(facade.W_dec.grad, coder.W_dec.grad, rtol=1e-4, atol=1e-5)
    coder.set_decoder_norm_to_unit_norm()
    facade.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(facade.W_dec, coder.W_dec, **TOL)


def test_facade_transcoder_target_and_save(tmp_path):
    coder = make_coder(8, transcode=True)
    facade = facades.SparseCoder(convert.from_module(coder))
    assert facade.cfg.transcode
    x, y = inputs(1), inputs(2)
    torch.testing.assert_close(facade(x, y).fvu, coder(x, y).fvu, **TOL)
    facade.save_to_disk(tmp_path)
    torch.testing.assert_close(sparsify.SparseCoder.load_from_disk(tmp_path)(x).sae_out, coder(x).sae_out, **TOL)


def test_facade_load_from_hub_goes_through_sparsify(monkeypatch):
    """No network here: sparsify's own load_from_hub is stubbed to return a known coder."""
    coder = make_coder(10)
    monkeypatch.setattr(sparsify.SparseCoder, "load_from_hub",
                        staticmethod(lambda name, hookpoint=None, device="cpu": coder))
    facade = facades.SparseCoder.load_from_hub("EleutherAI/sae-pythia-70m-32k", "layers.1")
    x = inputs()
    torch.testing.assert_close(facade(x).sae_out, coder(x).sae_out, **TOL)
