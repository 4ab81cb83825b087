"""fastsae against the real dictionary_learning: each dictionary class with random weights,
saved as its trainer saves (ae.pt + config.json), loaded by fastsae and compared."""

import json

import pytest
import torch

import fastsae
from fastsae.compat import convert
from helpers import require

dl = require("dictionary_learning", "compat")
# dictionary_learning imports nnsight, whose import patches torch globally (FakeTensor.__new__,
# F.one_hot, einops, math), which breaks torch.compile and opcheck in every later test of the
# session. Its dictionaries do not need the patches: undo them.
import nnsight  # noqa: E402
from dictionary_learning.dictionary import AutoEncoder, JumpReluAutoEncoder  # noqa: E402
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE  # noqa: E402
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE  # noqa: E402
from dictionary_learning.trainers.top_k import AutoEncoderTopK  # noqa: E402
from dictionary_learning.utils import load_dictionary  # noqa: E402

nnsight.DEFAULT_PATCHER.__exit__(None, None, None)

D, N, K = 16, 64, 5
TOL = dict(rtol=1e-5, atol=1e-5)


def make(dict_class, seed=0):
    ae = {
        "AutoEncoder": lambda: AutoEncoder(D, N),
        "AutoEncoderTopK": lambda: AutoEncoderTopK(D, N, K),
        "BatchTopKSAE": lambda: BatchTopKSAE(D, N, K),
        "MatryoshkaBatchTopKSAE": lambda: MatryoshkaBatchTopKSAE(D, N, K, [16, 48]),
        "JumpReluAutoEncoder": lambda: JumpReluAutoEncoder(D, N),
    }[dict_class]()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (D ** -0.5 if p.dim() == 2 else 0.2))
        if hasattr(ae, "threshold") and ae.threshold.dim() == 0:
            ae.threshold.fill_(0.3)  # a learned BatchTopK inference threshold
    return ae


def save_like_trainer(ae, directory, dict_class, **trainer):
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, directory / "ae.pt")
    cfg = {"trainer": {"dict_class": dict_class, "activation_dim": D, "dict_size": N, **trainer}}
    (directory / "config.json").write_text(json.dumps(cfg))


def inputs(seed=1):
    return torch.randn(8, D, generator=torch.Generator().manual_seed(seed)) * 2


def check_same(ae, ours, x):
    feats = ae.encode(x)
    got = ours.encode(x)
    got = got.to_dense() if isinstance(got, fastsae.SparseActs) else got
    torch.testing.assert_close(got, feats, **TOL)
    torch.testing.assert_close(ours.decode(feats), ae.decode(feats), **TOL)
    torch.testing.assert_close(ours(x), ae(x), **TOL)


EXPECTED_ARCH = {"AutoEncoder": "standard", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
                 "MatryoshkaBatchTopKSAE": "matryoshka_batchtopk", "JumpReluAutoEncoder": "jumprelu"}


@pytest.mark.parametrize("dict_class", list(EXPECTED_ARCH))
def test_load_trainer_output(tmp_path, dict_class):
    ae = make(dict_class)
    extra = {"k": K} if "TopK" in dict_class else {}
    save_like_trainer(ae, tmp_path / "trainer_0", dict_class, **extra)
    assert fastsae.formats.detect_format(tmp_path / "trainer_0") == "dictionary_learning"
    ours = fastsae.load(tmp_path / "trainer_0")
    assert ours.cfg.architecture == EXPECTED_ARCH[dict_class]
    if dict_class == "AutoEncoder":  # load_dictionary would renormalise its decoder (and features)
        theirs = AutoEncoder.from_pretrained(tmp_path / "trainer_0" / "ae.pt", normalize_decoder=False)
    else:
        theirs, _ = load_dictionary(str(tmp_path / "trainer_0"), device="cpu")
    check_same(theirs, ours, inputs())


@pytest.mark.parametrize("dict_class", list(EXPECTED_ARCH))
def test_convert_live_dictionary(dict_class):
    ae = make(dict_class, seed=3)
    check_same(ae, convert.from_module(ae), inputs())


def test_jumprelu_apply_b_dec_to_input_attribute_is_honoured():
    ae = make("JumpReluAutoEncoder", seed=4)
    ae.apply_b_dec_to_input = True
    ours = convert.from_dictionary_learning(ae)
    assert ours.cfg.apply_b_dec_to_input
    check_same(ae, ours, inputs())


def test_bare_ae_pt_needs_config_when_ambiguous(tmp_path):
    ae = make("AutoEncoderTopK")
    torch.save(ae.state_dict(), tmp_path / "ae.pt")
    with pytest.raises(fastsae.CheckpointError, match="AutoEncoderTopK and BatchTopKSAE share them"):
        fastsae.load(tmp_path)
    check_same(ae, fastsae.load(tmp_path / "ae.pt", dict_class="AutoEncoderTopK"), inputs())
    torch.save(make("AutoEncoder").state_dict(), tmp_path / "plain.pt")  # inferred from its keys
    assert fastsae.load(tmp_path / "plain.pt").cfg.architecture == "standard"


def test_config_and_weights_disagreeing_on_k(tmp_path):
    save_like_trainer(make("AutoEncoderTopK"), tmp_path, "AutoEncoderTopK", k=K + 1)
    with pytest.raises(fastsae.CheckpointError, match=f"says k={K + 1} but .*ae.pt holds k={K}"):
        fastsae.load(tmp_path)


def test_untrained_batchtopk_threshold_is_refused(tmp_path):
    ae = make("BatchTopKSAE")
    ae.threshold.fill_(-1.0)
    save_like_trainer(ae, tmp_path, "BatchTopKSAE", k=K)
    with pytest.raises(fastsae.CheckpointError, match="never learned its inference threshold"):
        fastsae.load(tmp_path)


def test_unsupported_class_is_named(tmp_path):
    save_like_trainer(make("AutoEncoder"), tmp_path, "PAnnealAutoEncoder")
    with pytest.raises(fastsae.CheckpointError, match="'PAnnealAutoEncoder' is not supported"):
        fastsae.load(tmp_path)
