"""Gated, Matryoshka BatchTopK and transcoders against plain-PyTorch references of their papers'
formulas (float64), the sparse backward against autograd through a dense reference, the
trainer's two paths against each other, save/load, and the errors for bad settings."""

from __future__ import annotations

import pytest
import torch

import fastsae
from fastsae import SAEConfig, build_sae
from fastsae.data import PairedSource, TensorSource
from fastsae.errors import ConfigError, InputError
from fastsae.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def randomize(sae, seed=0, scale=0.3):
    """Non-zero biases and gated/skip parameters, so every term of the formulas matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name in ("W_enc", "W_dec"):
                continue
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return sae


def densify(rows, sae):
    """A RowSparseGrads as dense gradients (any d_in, d_out)."""
    out = {"W_enc": sae.W_enc.new_zeros(sae.W_enc.shape), "b_enc": sae.b_enc.new_zeros(sae.b_enc.shape),
           "W_dec": sae.W_dec.new_zeros(sae.W_dec.shape)}
    out["W_enc"][:, rows.latents] = rows.W_enc
    out["b_enc"][rows.latents] = rows.b_enc
    out["W_dec"][rows.latents] = rows.W_dec
    return out


def snapshot(sae):
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def assert_unchanged(sae, before):
    for k, v in sae.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was modified"


# ----------------------------------------------------------------------------------- registry
def test_each_new_architecture_is_one_registered_file():
    import fastsae.architectures.gated as gated
    import fastsae.architectures.matryoshka as matryoshka

    arch = fastsae.sae.architectures()
    assert arch["gated"] is gated.GatedSAE and arch["matryoshka_batchtopk"] is matryoshka.MatryoshkaBatchTopKSAE
    assert "matryoshka_batchtopk" in fastsae.sparse_architectures() and "gated" not in fastsae.sparse_architectures()
    # transcoders are an option of every architecture, not an architecture
    for name in ("standard", "topk", "jumprelu", "gated", "batchtopk"):
        kw = {"k": 2} if arch[name].needs_k else {}
        sae = build_sae(SAEConfig(d_in=4, d_sae=6, architecture=name, transcoder=True, d_out=3,
                                  apply_b_dec_to_input=False, skip_connection=True, **kw))
        assert sae.W_dec.shape == (6, 3) and sae.b_dec.shape == (3,) and sae.W_skip.shape == (3, 4)
        assert sae(torch.randn(2, 5, 4)).shape == (2, 5, 3)


# ----------------------------------------------------------------------------------- gated
def gated_reference(sae, x, l1_decoder_norm=True):
    """The Gated SAE of Rajamanoharan et al. 2024, written out: (acts, x_hat, loss terms)."""
    p = dict(sae.named_parameters())
    x_in = x - p["b_dec"] if sae.cfg.apply_b_dec_to_input else x
    pi_gate = x_in @ p["W_enc"] + p["b_enc"]
    pi_mag = x_in @ (p["W_enc"] * p["r_mag"].exp()) + p["b_mag"]
    acts = (pi_gate > 0).to(x.dtype) * pi_mag.relu()
    x_hat = acts @ p["W_dec"] + p["b_dec"]
    gate = pi_gate.relu()
    norms = p["W_dec"].norm(dim=1) if l1_decoder_norm else torch.ones_like(p["b_enc"])
    l1 = sae.cfg.l1_coefficient * (gate * norms).sum(-1).mean()
    via_gate = gate @ p["W_dec"].detach() + p["b_dec"].detach()  # the frozen decoder
    aux = (via_gate - x).pow(2).sum(-1).mean()
    mse = (x_hat - x).pow(2).sum(-1).mean()
    return acts, x_hat, {"mse": mse, "sparsity": l1, "aux": aux, "loss": mse + l1 + aux}


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("l1_decoder_norm", [True, False])
def test_gated_matches_its_reference(apply_b_dec, l1_decoder_norm):
    sae = randomize(build_sae(SAEConfig(d_in=6, d_sae=20, architecture="gated", dtype="float64",
                                        l1_coefficient=0.3, apply_b_dec_to_input=apply_b_dec)))
    sae.l1_decoder_norm = l1_decoder_norm
    x = torch.randn(9, 6, dtype=F64)
    acts, x_hat, terms = gated_reference(sae, x, l1_decoder_norm)
    # some magnitude thresholds are negative (clamped to 0 in the JumpReLU form)
    assert bool((sae.jumprelu_equivalent()[2] == 0).any()) and bool((sae.jumprelu_equivalent()[2] > 0).any())
    out = sae.training_forward(x)
    for name, want in terms.items():
        assert float(getattr(out, name).detach()) == pytest.approx(float(want.detach()), rel=1e-6), name
    torch.testing.assert_close(out.acts, acts, atol=1e-12, rtol=0)
    got = torch.autograd.grad(out.loss, list(sae.parameters()))
    want = torch.autograd.grad(terms["loss"], list(sae.parameters()))
    for (name, _), a, b in zip(sae.named_parameters(), got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)  # the MSE is taken in float32
    before = snapshot(sae)
    with torch.no_grad():  # inference: the fused JumpReLU kernel on the folded weights
        for backend in ("reference", "auto"):
            sae.cfg.backend = backend
            torch.testing.assert_close(sae(x), x_hat, atol=1e-10, rtol=0)
            torch.testing.assert_close(sae.encode(x), acts, atol=1e-12, rtol=0)
    assert_unchanged(sae, before)


def test_gated_shapes_and_edge_cases():
    sae = randomize(build_sae(SAEConfig(d_in=5, d_sae=1, architecture="gated")))
    for x in (torch.randn(1, 5), torch.randn(0, 5), torch.randn(2, 3, 5)):
        with torch.no_grad():
            assert sae(x).shape == x.shape and sae.encode(x).shape == (*x.shape[:-1], 1)
    out = sae.training_forward(torch.randn(4, 5)[:, :5].t().contiguous().t())  # non-contiguous input
    assert torch.isfinite(out.loss)


# ----------------------------------------------------------------------------------- matryoshka
def matryoshka_sae(d_in=6, d_sae=20, k=3, widths=(3, 9, 20), weights=None, **kw):
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="matryoshka_batchtopk", k=k, dtype="float64",
                    matryoshka_widths=list(widths), matryoshka_weights=weights, **kw)
    return randomize(build_sae(cfg), scale=0.1)


def matryoshka_dense_loss(sae, x, target):
    """Σ_g λ_g ‖b_dec + A[:, :w_g] W_dec[:w_g] - target‖²/N with A the batch top-(N·k) of the
    ReLU'd pre-activations: the dense [N, d_sae] reference, differentiable by autograd."""
    p = dict(sae.named_parameters())
    x_in = x - p["b_dec"] if sae.cfg.apply_b_dec_to_input else x
    acts = (x_in @ p["W_enc"] + p["b_enc"]).relu()
    keep = min(sae.cfg.k * x.shape[0], acts.numel())
    mask = torch.zeros(acts.numel(), dtype=torch.bool)
    mask[acts.detach().flatten().topk(keep).indices] = True
    acts = acts * mask.view_as(acts)
    weights = sae.cfg.matryoshka_weights or [1.0] * len(sae.widths)
    loss = 0
    for w, width in zip(weights, sae.widths):
        recon = acts[:, :width] @ p["W_dec"][:width] + p["b_dec"]
        loss = loss + w * (recon - target).pow(2).sum() / x.shape[0]
    return loss, acts


MATRYOSHKA_CASES = {
    "sum": dict(),
    "weighted": dict(weights=[0.5, 2.0, 1.5]),
    "no-b_dec-input": dict(apply_b_dec_to_input=False),
    "one row": dict(rows=1),
    "k=1": dict(k=1),
    "k=n": dict(k=20),
    "one level": dict(widths=(20,)),
    "width 1 level": dict(widths=(1, 20)),
    "transcoder": dict(transcoder=True, d_out=4, apply_b_dec_to_input=False),
    "transcoder d_out=d_in": dict(transcoder=True, apply_b_dec_to_input=False),
}


@pytest.mark.parametrize("case", MATRYOSHKA_CASES, ids=list(MATRYOSHKA_CASES))
def test_matryoshka_sparse_backward_is_autograd_of_the_nested_losses(case):
    """The sum of prefix losses gives each level's slots the error Σ_{g' >= g} λ_g' e_g' (a
    per-level weighting of errors): the sparse backward, level by level over k slots, equals
    autograd through the dense float64 reference."""
    kw = dict(MATRYOSHKA_CASES[case])
    rows = kw.pop("rows", 8)
    sae = matryoshka_sae(**kw)
    x = torch.randn(rows, 6, dtype=F64)
    target = torch.randn(rows, sae.d_out, dtype=F64) if sae.cfg.transcoder else x
    loss, dense_acts = matryoshka_dense_loss(sae, x, target)
    want = dict(zip([n for n, _ in sae.named_parameters()], torch.autograd.grad(loss, list(sae.parameters()))))
    before = snapshot(sae)
    with torch.no_grad():
        sel = sae.select(x, train=True)
        torch.testing.assert_close(sel.acts.to_dense(), dense_acts.detach(), atol=1e-12, rtol=0)
        x_hat = sae.decode_selection(sel, x)
        got_loss, grad_out = sae.sparse_loss(sel, x_hat, target)
        rows_, db_dec = sae.sparse_backward(x, sel, grad_out)
    assert float(got_loss) == pytest.approx(float(loss.detach()), rel=1e-12)
    assert grad_out.shape == (len(sae.widths), rows, sae.d_out)  # never [N, d_sae]
    dense = densify(rows_, sae)
    for name in ("W_enc", "b_enc", "W_dec"):
        torch.testing.assert_close(dense[name], want[name], atol=1e-10, rtol=0, msg=name)
    torch.testing.assert_close(db_dec, want["b_dec"], atol=1e-10, rtol=0)
    fired = torch.unique(sel.acts.indices[sel.acts.values != 0])
    assert torch.equal(rows_.latents, fired)  # only the latents that fired
    before.pop("threshold")  # select(train=True) updates the inference threshold, nothing else
    assert_unchanged(sae, {**before, "threshold": sae.threshold})
    # the autograd path's loss is the same objective
    out = sae.training_forward(x, target if sae.cfg.transcoder else None)
    assert float(out.loss.detach()) == pytest.approx(float(loss.detach()), rel=1e-6)
    got = torch.autograd.grad(out.loss, list(sae.parameters()))
    for (name, _), a in zip(sae.named_parameters(), got):
        torch.testing.assert_close(a, want[name], atol=1e-5, rtol=1e-5, msg=name)  # MSE in float32


def test_matryoshka_equals_batchtopk_with_one_level_and_inference_is_batchtopk():
    m = matryoshka_sae(widths=(20,))
    b = build_sae(m.cfg.replace(architecture="batchtopk", matryoshka_widths=None), init=False)
    b.load_state_dict(m.state_dict())
    x = torch.randn(8, 6, dtype=F64)
    want = float(b.training_forward(x).loss.detach())
    assert float(m.training_forward(x).loss.detach()) == pytest.approx(want, rel=1e-12)
    m.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), b(x), atol=0, rtol=0)


def run_trainer(cfg_sae, data, tmp_path, name, **kw):
    """A short run. The autograd path takes the MSE in float32, so a gradient that is 0 on one
    path is ~1e-10 on the other; eps=1e-4 keeps Adam from blowing that up to a full step."""
    kw = {"steps": 4, "eps": 1e-4, "dead_tokens": 10**9, **kw}
    cfg = TrainConfig(sae=cfg_sae, batch_size=16, lr=1e-2, b_dec_init="zeros", log_every=2,
                      checkpoint_every=0, out_dir=str(tmp_path / name), progress=False, console=False, plot=False,
                      **kw)
    torch.manual_seed(0)
    trainer = Trainer(cfg, data, sae=build_sae(cfg.sae))
    trainer.fit()
    return trainer


@pytest.mark.parametrize("transcoder", [False, True])
def test_matryoshka_trainer_sparse_path_equals_autograd_path(tmp_path, transcoder):
    kw = dict(transcoder=True, apply_b_dec_to_input=False) if transcoder else {}
    cfg = SAEConfig(d_in=6, d_sae=20, architecture="matryoshka_batchtopk", k=3, dtype="float64",
                    matryoshka_widths=[3, 9, 20], matryoshka_weights=[1.0, 0.5, 2.0], **kw)
    x = torch.randn(64, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(64, 6, dtype=F64, generator=torch.Generator().manual_seed(2))

    def data():
        return PairedSource(x, y, 16, shuffle=False) if transcoder else TensorSource(x, 16, shuffle=False)

    sparse = run_trainer(cfg, data(), tmp_path, "sparse", sparse_backward=True)
    dense = run_trainer(cfg, data(), tmp_path, "dense", sparse_backward=False)
    for name, t in sparse.sae.state_dict().items():
        torch.testing.assert_close(t, dense.sae.state_dict()[name], atol=1e-6, rtol=0, msg=name)
    for a, b in zip(sparse.tracker.history, dense.tracker.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_matryoshka_trains_with_row_sparse_adam(tmp_path):
    """Its per-level row-sparse gradients (concatenated, disjoint latent ranges) feed row-sparse Adam."""
    cfg = SAEConfig(d_in=6, d_sae=20, architecture="matryoshka_batchtopk", k=3, matryoshka_widths=[3, 9, 20])
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    trainer = run_trainer(cfg, TensorSource(x, 16), tmp_path, "rs", optimizer="row_sparse_adam", steps=12,
                          dead_tokens=32)
    hist = trainer.tracker.history
    assert hist[-1]["loss"] < hist[0]["loss"]


# ----------------------------------------------------------------------------------- transcoders
def transcoder(arch="topk", d_out=4, skip=True, **kw):
    extra = {"k": 3} if fastsae.sae_class(arch).needs_k else {}
    if arch == "matryoshka_batchtopk":
        extra["matryoshka_widths"] = [5, 16]
    cfg = SAEConfig(d_in=6, d_sae=16, architecture=arch, dtype="float64", transcoder=True, d_out=d_out,
                    apply_b_dec_to_input=False, skip_connection=skip, **extra, **kw)
    return randomize(build_sae(cfg), scale=0.2)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "standard", "jumprelu", "gated"])
def test_transcoder_forward_is_encode_decode_plus_skip(arch):
    sae = transcoder(arch)
    x = torch.randn(7, 6, dtype=F64)
    sae.eval()
    with torch.no_grad():
        acts = sae.encode(x)
        want = sae.decode(acts) + x @ sae.W_skip.t()
        torch.testing.assert_close(sae(x), want, atol=1e-12, rtol=0)
    y = torch.randn(7, 4, dtype=F64)
    out = sae.training_forward(x, y)
    assert float(out.mse) == pytest.approx(float((out.x_hat - y).pow(2).sum() / 7), rel=1e-6)


@pytest.mark.parametrize("d_out", [4, 6], ids=["d_out<d_in", "d_out=d_in"])
@pytest.mark.parametrize("skip", [True, False])
def test_transcoder_sparse_backward_equals_autograd(d_out, skip):
    sae = transcoder("topk", d_out=d_out, skip=skip)
    x, y = torch.randn(9, 6, dtype=F64), torch.randn(9, d_out, dtype=F64)
    out = sae.training_forward(x, y)
    want = dict(zip([n for n, _ in sae.named_parameters()], torch.autograd.grad(out.mse, list(sae.parameters()))))
    with torch.no_grad():
        sel = sae.select(x, train=True)
        x_hat = sae.decode_selection(sel, x)
        torch.testing.assert_close(x_hat, out.x_hat, atol=1e-12, rtol=0)
        loss, grad_out = sae.sparse_loss(sel, x_hat, y)
        rows, db_dec = sae.sparse_backward(x, sel, grad_out)
    dense = densify(rows, sae)
    for name, got in (*dense.items(), ("b_dec", db_dec)):
        torch.testing.assert_close(got, want[name], atol=1e-5, rtol=1e-5, msg=name)  # MSE in float32
    if skip:
        torch.testing.assert_close(sae.W_skip.grad, want["W_skip"], atol=1e-5, rtol=1e-5)


def test_skip_transcoder_trains_from_paired_activations(tmp_path):
    """Both paths, the skip connection stepped by its own Adam; the sparse and autograd paths
    agree, and the loss falls."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, dtype=F64, generator=g)
    y = x[:, :4] @ torch.randn(4, 4, dtype=F64, generator=g) + 0.1 * torch.randn(64, 4, dtype=F64, generator=g)
    cfg = transcoder("topk", d_out=6).cfg  # the trainer's sparse path needs d_out == d_in
    y = torch.cat([y, x[:, :2]], 1)
    runs = {path: run_trainer(cfg, PairedSource(x, y, 16, shuffle=False), tmp_path, path,
                              sparse_backward=path == "sparse", steps=12)
            for path in ("sparse", "autograd")}
    a, b = runs["sparse"].sae, runs["autograd"].sae
    assert float(a.W_skip.abs().sum()) > 0
    for name, t in a.state_dict().items():
        torch.testing.assert_close(t, b.state_dict()[name], atol=1e-6, rtol=0, msg=name)
    hist = runs["sparse"].tracker.history
    assert hist[-1]["loss"] < hist[0]["loss"]
    loaded = fastsae.load(tmp_path / "sparse" / "final")
    torch.testing.assert_close(loaded.W_skip, a.W_skip)
    resumed = Trainer.resume(tmp_path / "sparse", PairedSource(x, y, 16, shuffle=False), steps=14)
    resumed.fit()
    assert resumed.step == 14


def test_transcoder_to_another_width_trains_on_the_autograd_path(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, dtype=F64, generator=g)
    y = x[:, :4] * 2 + 0.5
    trainer = run_trainer(transcoder("topk", d_out=4).cfg, PairedSource(x, y, 16), tmp_path, "tc", steps=20)
    assert not trainer.cfg.use_sparse_backward
    hist = trainer.tracker.history
    assert hist[-1]["loss"] < hist[0]["loss"] and trainer.sae.W_dec.shape == (16, 4)


def test_paired_source_keeps_rows_paired(tmp_path):
    import numpy as np

    x = torch.arange(40.0).reshape(20, 2)
    y = -torch.arange(60.0).reshape(20, 3)
    src = PairedSource(x, y, 4, seed=3)
    assert src.widths == (2, 3) and src.d_in == 5
    batch = next(iter(src))
    assert torch.equal(batch[:, 2:], -torch.cat([batch[:, :1] * 1.5, batch[:, :1] * 1.5 + 1, batch[:, :1] * 1.5 + 2],
                                                1))
    for side, t in (("in", x), ("out", y)):
        (tmp_path / side).mkdir()
        np.save(tmp_path / side / "s0.npy", t.numpy()[:12])
        np.save(tmp_path / side / "s1.npy", t.numpy()[12:])
    shards = PairedSource(tmp_path / "in", tmp_path / "out", 5, seed=1, chunk_rows=3, buffer_rows=6)
    for b in list(zip(range(6), shards)):
        rows = b[1]
        torch.testing.assert_close(rows[:, 2], -rows[:, 0] * 1.5)
    np.save(tmp_path / "out" / "s1.npy", y.numpy()[12:19])
    with pytest.raises(InputError, match="do not pair up row for row"):
        PairedSource(tmp_path / "in", tmp_path / "out", 5)
    with pytest.raises(InputError, match="20 rows but the targets 19"):
        PairedSource(x, y[:19], 4)


# ----------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("kind", ["gated", "matryoshka", "skip transcoder", "gated transcoder"])
def test_native_save_load_round_trip(tmp_path, kind):
    sae = {"gated": lambda: randomize(build_sae(SAEConfig(d_in=6, d_sae=12, architecture="gated"))),
           "matryoshka": lambda: matryoshka_sae(),
           "skip transcoder": lambda: transcoder("topk"),
           "gated transcoder": lambda: transcoder("gated")}[kind]()
    sae.save_pretrained(tmp_path / "ckpt")
    back = fastsae.load(tmp_path / "ckpt")
    assert type(back) is type(sae) and back.cfg == sae.cfg
    x = torch.randn(5, 6, dtype=sae.dtype)
    sae.eval(), back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), sae(x), atol=0, rtol=0)


# ----------------------------------------------------------------------------------- errors
BAD_CONFIGS = [
    (dict(architecture="matryoshka_batchtopk", k=2), "needs matryoshka_widths"),
    (dict(architecture="matryoshka_batchtopk", k=2, matryoshka_widths=[4, 3, 16]), "strictly increasing"),
    (dict(architecture="matryoshka_batchtopk", k=2, matryoshka_widths=[4, 8]), "append 16"),
    (dict(architecture="matryoshka_batchtopk", k=2, matryoshka_widths=[4, 32]), "go past d_sae"),
    (dict(architecture="matryoshka_batchtopk", k=2, matryoshka_widths=[4, 16], matryoshka_weights=[1.0]),
     "one weight per level"),
    (dict(architecture="matryoshka_batchtopk", k=2, matryoshka_widths=[4, 16], matryoshka_weights=[1.0, -1.0]),
     ">= 0"),
    (dict(architecture="matryoshka_batchtopk", matryoshka_widths=[4, 16]), "needs k"),
    (dict(architecture="matryoshka_batchtopk", k=2, matryoshka_widths=[4, 16], transcoder=True,
          apply_b_dec_to_input=False, skip_connection=True), "skip_connection=False"),
    (dict(architecture="gated", d_out=3), "set transcoder=True"),
    (dict(architecture="topk", k=2, transcoder=True), "apply_b_dec_to_input=False"),
    (dict(architecture="topk", k=2, transcoder=True, apply_b_dec_to_input=False,
          normalize_activations="layer_norm"), "use 'none'"),
    (dict(architecture="topk", k=2, transcoder=True, apply_b_dec_to_input=False, d_out=0), "d_out must be"),
]


@pytest.mark.parametrize("kw,match", BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_bad_settings_say_what_to_do(kw, match):
    with pytest.raises(ConfigError, match=match):
        SAEConfig(d_in=4, d_sae=16, **kw)


def test_bad_transcoder_use_says_what_to_do(tmp_path):
    sae = transcoder("topk")
    x = torch.randn(3, 6, dtype=F64)
    with pytest.raises(InputError, match="pass its target"):
        sae.training_forward(x)
    with pytest.raises(InputError, match="one target row"):
        sae.training_forward(x, torch.randn(3, 5, dtype=F64))
    plain = build_sae(SAEConfig(d_in=6, d_sae=8, architecture="topk", k=2))
    with pytest.raises(InputError, match="takes no target"):
        plain.training_forward(torch.randn(3, 6), torch.randn(3, 6))
    common = dict(steps=2, batch_size=4, out_dir=str(tmp_path), progress=False, console=False, plot=False)
    with pytest.raises(ConfigError, match="use optimizer='adam'"):
        TrainConfig(sae=sae.cfg, optimizer="row_sparse_adam", **common)
    with pytest.raises(ConfigError, match="use sparse_backward=False"):
        TrainConfig(sae=sae.cfg, sparse_backward=True, **common)
    with pytest.raises(ConfigError, match="use init='tied'"):
        TrainConfig(sae=sae.cfg, init="data", **common)
    with pytest.raises(InputError, match="PairedSource"):
        Trainer(TrainConfig(sae=sae.cfg, **common), torch.randn(8, 10, dtype=F64))
    with pytest.raises(InputError, match="pairs widths"):
        Trainer(TrainConfig(sae=sae.cfg, **common), PairedSource(torch.randn(8, 6), torch.randn(8, 5), 4))
    with pytest.raises(InputError, match="transcoder=True"):
        Trainer(TrainConfig(sae=plain.cfg, **common), PairedSource(torch.randn(8, 6), torch.randn(8, 6), 4))
