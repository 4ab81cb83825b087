"""fastsae against the real SAELens: its modules with random weights, saved by its own code,
loaded by fastsae (and the reverse), compared on encode / decode / forward."""

import pytest
import torch

import fastsae
import helpers
from fastsae.compat import convert, facades
from fastsae.compat.formats import saelens as saelens_format
from fastsae.sae import sae_class
from helpers import require

sae_lens = require("sae_lens", "compat")

D, N, K = 16, 64, 5
TOL = dict(rtol=1e-5, atol=1e-5)


def randomize_(module, seed):
    return helpers.randomize_(module, seed, fan_in=D)


def make_saelens(arch, seed=0, **cfg):
    cls, cfg_cls = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
    }[arch]
    if arch == "topk":
        cfg.setdefault("k", K)
    return randomize_(cls(cfg_cls(d_in=D, d_sae=N, **cfg)), seed)


def inputs(seed=1, shape=(7, D)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2


def check_same(theirs, ours, x):
    """SAELens encode/decode/forward == fastsae's (dense features compared)."""
    feats = theirs.encode(x)
    torch.testing.assert_close(ours.encode(x, dense=True) if ours.cfg.architecture == "topk" else ours.encode(x),
                               feats, **TOL)
    if ours.cfg.normalize_activations == "none":
        torch.testing.assert_close(ours.decode(feats), theirs.decode(feats), **TOL)
    else:
        theirs.decode(feats)  # consume the stats SAELens keeps between encode and decode
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


CASES = [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("topk", {}),
    ("topk", {"apply_b_dec_to_input": False}),
    ("topk", {"rescale_acts_by_decoder_norm": True}),
    ("jumprelu", {}),
    ("jumprelu", {"apply_b_dec_to_input": False}),
    ("standard", {"normalize_activations": "layer_norm"}),
    ("topk", {"normalize_activations": "layer_norm"}),
    ("jumprelu", {"normalize_activations": "constant_norm_rescale"}),
    ("standard", {"normalize_activations": "expected_average_only_in"}),
]


@pytest.mark.parametrize("arch,cfg", CASES, ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in c.items())}" for a, c in CASES])
def test_load_saelens_checkpoint(tmp_path, arch, cfg):
    theirs = make_saelens(arch, **cfg)
    theirs.save_model(tmp_path)
    assert fastsae.formats.detect_format(tmp_path) == "saelens"
    ours = fastsae.load(tmp_path)
    assert ours.cfg.architecture == arch
    check_same(sae_lens.SAE.load_from_disk(tmp_path), ours, inputs())


def test_leading_dimensions(tmp_path):
    theirs = make_saelens("topk")
    theirs.save_model(tmp_path)
    x = inputs(shape=(2, 3, D))
    torch.testing.assert_close(fastsae.load(tmp_path)(x), theirs(x), **TOL)


def test_negative_jumprelu_thresholds_match(tmp_path):
    theirs = make_saelens("jumprelu")
    with torch.no_grad():
        theirs.threshold.copy_(torch.linspace(-1, 0.5, N))
    theirs.save_model(tmp_path)
    check_same(theirs, fastsae.load(tmp_path), inputs())


def test_batchtopk_training_export_loads_as_jumprelu(tmp_path):
    """SAELens saves a trained BatchTopK SAE as a JumpReLU with its threshold per latent."""
    cfg = sae_lens.BatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=K)
    train = randomize_(sae_lens.BatchTopKTrainingSAE(cfg), 3)
    train.topk_threshold = torch.tensor(0.4, dtype=torch.double)
    train.save_inference_model(tmp_path)
    ours = fastsae.load(tmp_path)
    assert ours.cfg.architecture == "jumprelu"
    check_same(sae_lens.SAE.load_from_disk(tmp_path), ours, inputs())


def test_live_training_saes_convert(tmp_path):
    """Training SAEs (rescale_acts_by_decoder_norm on by default) equal their inference export."""
    train = randomize_(sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=K)), 4)
    train.topk_threshold = torch.tensor(0.3, dtype=torch.double)
    assert train.cfg.rescale_acts_by_decoder_norm
    ours = convert.from_module(train)
    assert ours.cfg.architecture == "batchtopk" and ours.cfg.k == K
    train.save_inference_model(tmp_path)
    x = inputs()
    torch.testing.assert_close(ours(x), sae_lens.SAE.load_from_disk(tmp_path)(x), **TOL)

    jump = randomize_(sae_lens.JumpReLUTrainingSAE(sae_lens.JumpReLUTrainingSAEConfig(d_in=D, d_sae=N)), 5)
    ours = convert.from_saelens(jump)
    torch.testing.assert_close(ours.threshold, jump.threshold.detach(), **TOL)
    torch.testing.assert_close(ours(x), jump(x), **TOL)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_convert_live_module(arch):
    theirs = make_saelens(arch, seed=7)
    ours = convert.from_module(theirs)
    check_same(theirs, ours, inputs())
    with torch.no_grad():  # a copy: changing ours leaves theirs alone
        ours.W_dec.zero_()
    assert theirs.W_dec.abs().sum() > 0


def test_norm_scaling_factor_is_folded(tmp_path):
    theirs = make_saelens("standard", normalize_activations="expected_average_only_in")
    theirs.save_model(tmp_path)
    ours = fastsae.load(tmp_path, norm_scaling_factor=2.5)
    theirs.fold_activation_norm_scaling_factor(2.5)
    check_same(theirs, ours, inputs())


def test_pre_6_config_and_finetuning_scaling_factor(tmp_path):
    """An old (SAELens < 6) cfg: activation_fn_str, topk via activation_fn_kwargs, scaling_factor."""
    theirs = make_saelens("topk", seed=9)
    scaling = torch.rand(N) + 0.5
    state = {k: v.detach() for k, v in theirs.state_dict().items()}
    old_cfg = {"d_in": D, "d_sae": N, "dtype": "float32", "activation_fn_str": "topk",
               "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": True,
               "finetuning_scaling_factor": True, "normalize_activations": False, "hook_name": "blocks.0"}
    ours = saelens_format.from_state(old_cfg, {**state, "scaling_factor": scaling}, "old")
    assert ours.cfg.architecture == "topk" and ours.cfg.k == K
    x = inputs()
    feats = theirs.encode(x)
    torch.testing.assert_close(ours.encode(x, dense=True), feats, **TOL)
    torch.testing.assert_close(ours(x), (feats * scaling) @ theirs.W_dec + theirs.b_dec, **TOL)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "batchtopk", "layer_norm"])
def test_saelens_reads_what_fastsae_saves(tmp_path, arch):
    torch.manual_seed(0)
    if arch == "layer_norm":
        ours = fastsae.StandardSAE(d_in=D, d_sae=N, normalize_activations="layer_norm")
    else:
        ours = fastsae.sae_class(arch)(d_in=D, d_sae=N, **({"k": K} if sae_class(arch).needs_k else {}))
    randomize_(ours, 11)
    if arch == "batchtopk":
        ours.threshold.fill_(0.35)
    ours.eval()
    fastsae.formats.save(ours, tmp_path, format="saelens")
    assert fastsae.formats.detect_format(tmp_path) == "saelens"
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    x = inputs()
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    back = fastsae.load(tmp_path)
    torch.testing.assert_close(back(x), ours(x), **TOL)


def test_untrained_batchtopk_cannot_be_exported(tmp_path):
    sae = fastsae.BatchTopKSAE(d_in=D, d_sae=N, k=K)
    with pytest.raises(fastsae.CheckpointError, match="threshold"):
        fastsae.formats.save(sae, tmp_path, format="saelens")


# ------------------------------------------------------------------ the SAE facade
@pytest.mark.parametrize("arch,cfg", [("standard", {}), ("topk", {}), ("jumprelu", {}),
                                      ("topk", {"normalize_activations": "layer_norm"})])
def test_facade_matches_saelens(tmp_path, arch, cfg):
    theirs = make_saelens(arch, seed=13, **cfg)
    theirs.save_model(tmp_path)
    facade = facades.SAE.load_from_disk(tmp_path)
    x = inputs()
    feats = theirs.encode(x)
    torch.testing.assert_close(facade.encode(x), feats, **TOL)
    torch.testing.assert_close(facade.decode(feats), theirs.decode(feats), **TOL)
    torch.testing.assert_close(facade(x), theirs(x), **TOL)
    assert facade.cfg.d_in == D and facade.cfg.d_sae == N and facade.cfg.architecture() == arch
    assert facade.cfg.metadata.hook_name == theirs.cfg.metadata.hook_name
    torch.testing.assert_close(facade.W_enc, theirs.W_enc, **TOL)
    torch.testing.assert_close(facade.get_W_dec_norm(), theirs.get_W_dec_norm(), **TOL)


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_facade_folds_like_saelens(tmp_path, arch):
    theirs = make_saelens(arch, seed=17)
    theirs.save_model(tmp_path)
    facade = facades.SAE.load_from_disk(tmp_path, fold_W_dec_norm=True)
    theirs.fold_W_dec_norm()
    x = inputs()
    torch.testing.assert_close(facade.encode(x), theirs.encode(x), **TOL)
    torch.testing.assert_close(facade(x), theirs(x), **TOL)
    facade.fold_activation_norm_scaling_factor(3.0)
    theirs.fold_activation_norm_scaling_factor(3.0)
    torch.testing.assert_close(facade(x), theirs(x), **TOL)


def test_facade_error_term_and_save_model(tmp_path):
    theirs = make_saelens("topk", seed=19)
    facade = facades.SAE(convert.from_module(theirs), use_error_term=True)
    x = inputs()
    torch.testing.assert_close(facade(x), x, **TOL)  # x_hat + (x - x_hat): the input, as SAELens
    facade.use_error_term = False
    weights, cfg = facade.save_model(tmp_path / "out")
    assert weights.name == "sae_weights.safetensors" and cfg.name == "cfg.json"
    torch.testing.assert_close(sae_lens.SAE.load_from_disk(tmp_path / "out")(x), theirs(x), **TOL)


def test_facade_refuses_unsafe_topk_fold_and_decode_without_stats(tmp_path):
    facade = facades.SAE(convert.from_module(make_saelens("topk")))
    with pytest.raises(NotImplementedError, match="not safe"):
        facade.fold_W_dec_norm()
    ln = facades.SAE(convert.from_module(make_saelens("standard", normalize_activations="layer_norm")))
    with pytest.raises(fastsae.InputError, match="call encode"):
        ln.decode(torch.zeros(2, N))


def test_facade_flattens_hook_z_heads(tmp_path):
    theirs = make_saelens("standard", seed=23, reshape_activations="hook_z")
    theirs.save_model(tmp_path)
    facade = facades.SAE.load_from_disk(tmp_path)
    x = inputs(shape=(7, 4, D // 4))
    torch.testing.assert_close(facade.encode(x), theirs.encode(x), **TOL)
    torch.testing.assert_close(facade(x), theirs(x), **TOL)
    assert facade(x).shape == x.shape


def test_facade_from_pretrained_goes_through_saelens(monkeypatch):
    """No network here: SAELens's own from_pretrained is stubbed to return a known SAE."""
    theirs = make_saelens("jumprelu", seed=29)
    calls = []

    def fake(release, sae_id, device="cpu", dtype="float32", **kwargs):
        calls.append((release, sae_id, device, dtype))
        return theirs

    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", fake)
    facade = facades.SAE.from_pretrained("gemma-scope-2b-pt-res", "layer_0/width_16k/average_l0_1")
    assert calls == [("gemma-scope-2b-pt-res", "layer_0/width_16k/average_l0_1", "cpu", "float32")]
    x = inputs()
    torch.testing.assert_close(facade(x), theirs(x), **TOL)


def test_batchtopk_training_sae_with_fractional_k():
    train = randomize_(sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=2.5)), 31)
    train.topk_threshold = torch.tensor(0.2, dtype=torch.double)
    ours = convert.from_saelens(train)
    assert ours.cfg.k == 3 and ours.cfg.metadata["saelens_k"] == 2.5


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_bfloat16_checkpoint_keeps_its_dtype(tmp_path, arch):
    theirs = make_saelens(arch, seed=37, dtype="bfloat16")
    theirs.save_model(tmp_path)
    ours = fastsae.load(tmp_path)
    assert ours.dtype == torch.bfloat16 and ours.cfg.dtype == "bfloat16"
    x = inputs()
    torch.testing.assert_close(ours(x), theirs(x), rtol=2e-2, atol=2e-2)  # bf16: summation order differs
