"""OpenAI sparse_autoencoder and Gemma Scope checkpoints.

Neither library is on PyPI, so the files are built here exactly as they write them (OpenAI:
`torch.save(Autoencoder.state_dict())`, whose state_dict adds `activation` and
`activation_state_dict`; Gemma Scope: `params.npz`). The oracle is the real SAELens computing
the same SAE (layer_norm TopK / JumpReLU without b_dec subtraction), plus, for OpenAI, their
forward written out step by step below.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastsae
from fastsae.compat import convert
from helpers import require

sae_lens = require("sae_lens", "compat")

D, N, K = 16, 64, 5
TOL = dict(rtol=1e-5, atol=1e-5)


def tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D, N, generator=g) / D ** 0.5, "b_enc": torch.randn(N, generator=g) * 0.2,
            "W_dec": torch.randn(N, D, generator=g) / D ** 0.5, "b_dec": torch.randn(D, generator=g) * 0.2,
            "threshold": torch.rand(N, generator=g) * 0.4}


def inputs(seed=1):
    return torch.randn(9, D, generator=torch.Generator().manual_seed(seed)) * 3 + 1


# ------------------------------------------------------------------ OpenAI
def openai_state(t, activation):
    """Autoencoder.state_dict() of openai/sparse_autoencoder (model.py): nn.Linear layouts."""
    state = {
        "pre_bias": t["b_dec"], "encoder.weight": t["W_enc"].t().contiguous(), "latent_bias": t["b_enc"],
        "decoder.weight": t["W_dec"].t().contiguous(),
        "stats_last_nonzero": torch.zeros(N, dtype=torch.long),
        "latents_activation_frequency": torch.ones(N), "latents_mean_square": torch.zeros(N),
        "activation": activation,
    }
    state["activation_state_dict"] = {"k": K, "postact_fn": "ReLU"} if activation == "TopK" else {}
    return state


def openai_forward(state, x):
    """Their forward: LN (TopK only), subtract pre_bias, encoder + latent_bias, activation,
    decoder + pre_bias, undo LN."""
    topk = state["activation"] == "TopK"
    if topk:
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        x = (x - mu) / (std + 1e-5)
    pre = F.linear(x - state["pre_bias"], state["encoder.weight"], state["latent_bias"])
    if topk:
        top = pre.topk(K, dim=-1)
        latents = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    else:
        latents = pre.relu()
    recons = F.linear(latents, state["decoder.weight"]) + state["pre_bias"]
    return latents, recons * std + mu if topk else recons


@pytest.mark.parametrize("activation", ["TopK", "ReLU"])
def test_openai_checkpoint(tmp_path, activation):
    t = tensors(0)
    state = openai_state(t, activation)
    torch.save(state, tmp_path / "ae.pt" if activation == "ReLU" else tmp_path / "resid_post_mlp_6.pt")
    path = next(tmp_path.iterdir())
    assert fastsae.formats.detect_format(path) == "openai"
    ours = fastsae.load(path)
    assert ours.cfg.architecture == ("topk" if activation == "TopK" else "standard")
    x = inputs()
    latents, recons = openai_forward(state, x)
    torch.testing.assert_close(ours(x), recons, **TOL)
    got = ours.encode(x)
    torch.testing.assert_close(got.to_dense() if activation == "TopK" else got, latents, **TOL)
    # The real SAELens with the same weights and its layer-norm input normalisation agrees.
    if activation == "TopK":
        cfg = sae_lens.TopKSAEConfig(d_in=D, d_sae=N, k=K, normalize_activations="layer_norm")
        theirs = sae_lens.TopKSAE(cfg)
        theirs.load_state_dict({k: t[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")})
        torch.testing.assert_close(ours(x), theirs(x), **TOL)


def test_openai_tied_decoder_and_unsupported_postact(tmp_path):
    t = tensors(1)
    state = openai_state(t, "ReLU")
    del state["decoder.weight"]
    state["decoder.linear.weight"] = state["encoder.weight"]  # TiedTranspose(encoder)
    torch.save(state, tmp_path / "tied.pt")
    x = inputs()
    expected = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]).relu() @ t["W_enc"].t() + t["b_dec"]
    torch.testing.assert_close(fastsae.load(tmp_path / "tied.pt")(x), expected, **TOL)
    state = openai_state(t, "TopK")
    state["activation_state_dict"]["postact_fn"] = "Identity"
    torch.save(state, tmp_path / "identity.pt")
    with pytest.raises(fastsae.CheckpointError, match="postact_fn='Identity'"):
        fastsae.load(tmp_path / "identity.pt")


# ------------------------------------------------------------------ Gemma Scope
@pytest.mark.parametrize("spelling", ["W_", "w_"])
def test_gemma_scope_params_npz(tmp_path, spelling):
    t = tensors(2)
    t["threshold"][:4] = -0.1  # negative thresholds still give relu(pre)·1[pre > θ]
    np.savez(tmp_path / "params.npz", **{(spelling + k[2:] if k.startswith("W_") else k): v.numpy()
                                         for k, v in t.items()})
    assert fastsae.formats.detect_format(tmp_path) == "gemma_scope"
    ours = fastsae.load(tmp_path)
    assert ours.cfg.architecture == "jumprelu" and not ours.cfg.apply_b_dec_to_input
    # What SAELens builds for Gemma Scope: a JumpReLU SAE with apply_b_dec_to_input=False.
    theirs = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D, d_sae=N, apply_b_dec_to_input=False))
    theirs.load_state_dict(t)
    x = inputs()
    torch.testing.assert_close(ours.encode(x), theirs.encode(x), **TOL)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    torch.testing.assert_close(fastsae.load(tmp_path / "params.npz")(x), theirs(x), **TOL)


def test_gemma_scope_round_trip_through_saelens_format(tmp_path):
    t = tensors(3)
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in t.items()})
    ours = fastsae.load(tmp_path)
    fastsae.formats.save(ours, tmp_path / "saelens", format="saelens")
    x = inputs()
    torch.testing.assert_close(sae_lens.SAE.load_from_disk(tmp_path / "saelens")(x), ours(x), **TOL)
    assert convert.from_saelens(sae_lens.SAE.load_from_disk(tmp_path / "saelens")).cfg.apply_b_dec_to_input is False


def test_convert_live_openai_autoencoder():
    """from_openai reads the module's state_dict(), which their Autoencoder extends with the
    activation's name and state; a stand-in module with that state_dict plays it here."""
    t = tensors(4)
    state = openai_state(t, "TopK")

    class Autoencoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pre_bias = torch.nn.Parameter(state["pre_bias"].clone())

        def state_dict(self, *args, **kwargs):
            return dict(state)

    ours = convert.from_openai(Autoencoder())
    x = inputs()
    torch.testing.assert_close(ours(x), openai_forward(state, x)[1], **TOL)
