"""Optimizers: row-sparse Adam against dense Adam, bf16 masters, the sparse step path."""

import os
import subprocess
import sys

import pytest
import torch

import fastsae
from fastsae.metrics import mmcs
from fastsae.optim import DenseAdam, RowSparseAdam, merge_row_sparse
from fastsae.sparse import RowSparseGrads, Selection, SparseActs
from fastsae.toy.data import ToyData
from fastsae.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp, **kw):
    base = dict(sae=dict(d_in=16, d_sae=32, architecture="topk", k=4), steps=5, batch_size=64, lr=1e-2,
                log_every=1, checkpoint_every=0, out_dir=str(tmp), progress=False, console=False,
                plot=False, init_sample_rows=256, dead_tokens=64)
    base.update(kw)
    return TrainConfig(**base)


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.sae.state_dict().items()}


def test_row_sparse_equals_dense_adam_when_every_latent_fires(tmp_path):
    # k = d_sae: every latent is in every step's index set, so lazy moments and per-row
    # bias correction coincide with dense Adam's global ones
    x = ToyData(d=16, n_features=32, seed=1).sample(1024)
    sae = dict(d_in=16, d_sae=32, architecture="topk", k=32)
    a = Trainer(_cfg(tmp_path / "a", sae=sae, optimizer="adam"), x)
    b = Trainer(_cfg(tmp_path / "b", sae=sae, optimizer="row_sparse_adam"), x)
    a.fit(), b.fit()
    pa, pb = _params(a), _params(b)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_sparse_backward_step_equals_autograd_step_with_auxk(tmp_path):
    x = ToyData(d=16, n_features=32, seed=2).sample(1024)
    a = Trainer(_cfg(tmp_path / "a", sparse_backward=True), x)
    b = Trainer(_cfg(tmp_path / "b", sparse_backward=False), x)
    for t in (a, b):  # half the latents start dead, so AuxK runs from step 1
        t.tracker.tokens_since_fired[::2] = 10**6
    a.fit(), b.fit()
    assert a.tracker.history[0]["auxk"] > 0, "AuxK was not compared"
    pa, pb = _params(a), _params(b)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm"])
def test_sparse_and_autograd_steps_agree_with_input_normalisation(tmp_path, norm):
    x = 5.0 * ToyData(d=16, n_features=32, seed=2).sample(1024) + 1.0
    sae = dict(d_in=16, d_sae=32, architecture="topk", k=4, normalize_activations=norm)
    a = Trainer(_cfg(tmp_path / "a", sae=sae, sparse_backward=True), x)
    b = Trainer(_cfg(tmp_path / "b", sae=sae, sparse_backward=False), x)
    ra, rb = a.fit(), b.fit()
    assert ra.last_metrics["fvu"] == pytest.approx(rb.last_metrics["fvu"], rel=1e-4)
    for k, v in _params(a).items():
        torch.testing.assert_close(v, _params(b)[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("B,n,k_aux,dead_every", [(9, 40, 6, 2), (1, 12, 1, 1), (0, 12, 3, 2), (7, 30, 30, 3),
                                                   (3, 1, 1, 1)])
def test_auxk_grads_equal_autograd_through_the_reference_loss(dtype, apply_b_dec, B, n, k_aux, dead_every):
    """BaseSAE.auxk_grads computes AuxK's gradient by the sparse backward of its selection;
    it must equal autograd through losses.auxk_loss (einsum over the full parameters) at the
    same selection, from the scan and from the encoder pass's selection alike, with the
    input, residual and parameters left untouched."""
    from fastsae.losses import auxk_loss

    torch.manual_seed(0)
    sae = fastsae.TopKSAE(d_in=5, d_sae=n, k=min(2, n), dtype="float64" if dtype == torch.float64 else "float32",
                          apply_b_dec_to_input=apply_b_dec)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(B, 5, dtype=dtype)
    residual = torch.randn(B, 5, dtype=dtype)
    dead = torch.arange(0, n, dead_every)
    saved = [t.detach().clone() for t in (x, residual, *sae.parameters())]
    _, preacts = sae.select_for_training(x, dead, k_aux)
    for given in (None, preacts):
        loss, rows = sae.auxk_grads(x, residual, dead, k_aux, 0.7, given)
        x_in = sae.encoder_input(x).detach()
        idx = (x_in @ sae.W_enc.detach() + sae.b_enc.detach())[:, dead].topk(min(k_aux, dead.numel()), dim=1).indices
        params = [p.detach().clone().requires_grad_() for p in (sae.W_enc, sae.b_enc, sae.W_dec)]
        want = auxk_loss(x_in, residual, dead[idx], *params, scale=0.7)
        tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(loss.double(), want.detach().double(), **tol)
        if B == 0:
            assert rows is None
            continue
        want.backward()
        if rows is None:  # no picked latent had a positive pre-activation: no gradient anywhere
            assert all(not p.grad.any() for p in params)
            continue
        got = rows.to_dense()
        for key, p in zip(("dW_enc", "db_enc", "dW_dec"), params):
            torch.testing.assert_close(got[key], p.grad, **tol, msg=key)
        # only latents with a nonzero gradient are listed
        assert set(rows.latents.tolist()) <= set(dead.tolist())
    for before, after in zip(saved, (x, residual, *sae.parameters())):
        assert torch.equal(before, after.detach())


def test_auxk_gradient_reaches_encoder_and_decoder(tmp_path):
    x = ToyData(d=16, n_features=32, seed=3).sample(1024)
    sae = dict(d_in=16, d_sae=256, architecture="topk", k=2)
    tr = Trainer(_cfg(tmp_path, sae=sae, auxk_coefficient=1.0, batch_size=8), x)
    tr.tracker.tokens_since_fired.fill_(10**6)  # every latent dead
    W_enc0, W_dec0 = tr.sae.W_enc.detach().clone(), tr.sae.W_dec.detach().clone()
    xb = x[:8]
    acts = tr.sae.encode(xb)
    main = set(acts.indices[acts.values > 0].tolist())
    tr.train_step(xb)
    changed_enc = set(torch.nonzero((tr.sae.W_enc != W_enc0).any(0)).flatten().tolist())
    changed_dec = set(torch.nonzero((tr.sae.W_dec != W_dec0).any(1)).flatten().tolist())
    assert changed_enc - main and changed_dec - main  # latents updated through AuxK alone


def test_row_sparse_bias_correction_is_per_row():
    sae = fastsae.TopKSAE(d_in=4, d_sae=6, k=2)
    lr = 0.01
    opt = RowSparseAdam(sae, lr=lr, unit_norm_decoder=False, catch_up=False)

    def grads(latents):
        u = torch.tensor(latents)
        return RowSparseGrads(u, torch.randn(4, len(u)), torch.randn(len(u)), torch.randn(len(u), 4), 6)

    for _ in range(4):
        opt.step(grads([0]), None)
    before = sae.W_dec.detach().clone()
    opt.step(grads([0, 3]), None)
    # latent 3's first update: m̂/√v̂ = g/|g|, so every element moves by lr (up to eps)
    step3 = (sae.W_dec[3] - before[3]).abs()
    torch.testing.assert_close(step3, torch.full_like(step3, lr), rtol=1e-4, atol=0)
    assert opt.row_steps.tolist() == [5, 0, 0, 1, 0, 0]
    untouched = [1, 2, 4, 5]
    assert torch.equal(sae.W_dec[untouched], before[untouched])


def _gap_between_row_sparse_and_dense(unit_norm: bool, catch_up: bool) -> float:
    torch.manual_seed(0)
    a = fastsae.TopKSAE(d_in=4, d_sae=10, k=2)
    b = fastsae.TopKSAE(d_in=4, d_sae=10, k=2)
    b.load_state_dict(a.state_dict())
    sparse = RowSparseAdam(a, lr=0.01, unit_norm_decoder=unit_norm, catch_up=catch_up)
    dense = DenseAdam(dict(b.named_parameters()), lr=0.01, unit_norm_rows=("W_dec",) if unit_norm else ())
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        u = torch.nonzero(torch.rand(10, generator=g) < 0.3).flatten()
        rows = RowSparseGrads(u, torch.randn(4, len(u), generator=g), torch.randn(len(u), generator=g),
                              torch.randn(len(u), 4, generator=g), 10)
        db = torch.randn(4, generator=g)
        sparse.step(rows, db)
        full = rows.to_dense()
        b.W_enc.grad, b.b_enc.grad, b.W_dec.grad, b.b_dec.grad = full["dW_enc"], full["db_enc"], full["dW_dec"], db
        dense.step()
    sparse.flush()
    return max(float((v - b.state_dict()[k]).abs().max()) for k, v in a.state_dict().items())


@pytest.mark.parametrize("unit_norm", [False, True])
def test_row_sparse_catch_up_tracks_dense_adam_on_intermittent_latents(unit_norm):
    """Latents fire on random 30% of 40 steps; dense Adam sees zero gradients for the silent
    ones. After flush(), catch-up row-sparse Adam matches it (constant lr, so only eps and,
    with unit-norm rows, one renormalisation per gap instead of per step differ); lazy Adam
    does not (it drops the momentum steps of silent latents)."""
    tol = 1e-3 if unit_norm else 1e-5
    assert _gap_between_row_sparse_and_dense(unit_norm, catch_up=True) <= tol
    assert _gap_between_row_sparse_and_dense(unit_norm, catch_up=False) > 10 * tol


def test_merge_row_sparse_adds_overlaps():
    a = RowSparseGrads(torch.tensor([1, 4]), torch.ones(3, 2), torch.ones(2), torch.ones(2, 3), 8)
    b = RowSparseGrads(torch.tensor([0, 4]), 2 * torch.ones(3, 2), 2 * torch.ones(2), 2 * torch.ones(2, 3), 8)
    m = merge_row_sparse(a, b)
    want = {k: a.to_dense()[k] + b.to_dense()[k] for k in ("dW_enc", "db_enc", "dW_dec")}
    for k, v in m.to_dense().items():
        assert torch.equal(v, want[k])


def test_bf16_weights_keep_fp32_masters_and_learn(tmp_path):
    x = ToyData(d=16, n_features=32, seed=4).sample(2048)
    for opt in ("adam", "row_sparse_adam"):
        sae = dict(d_in=16, d_sae=32, architecture="topk", k=4, dtype="bfloat16")
        tr = Trainer(_cfg(tmp_path / opt, sae=sae, optimizer=opt, steps=60, lr=3e-3), x)
        res = tr.fit()
        assert tr.sae.W_enc.dtype == torch.bfloat16
        state = tr.opt.state_dict()
        masters = state["masters"] if opt == "adam" else {n: w["master"] for n, w in state["weights"].items()}
        assert all(t.dtype == torch.float32 for t in masters.values())
        first = tr.tracker.history[0]["fvu"]
        assert res.last_metrics["fvu"] < 0.8 * first, (opt, first, res.last_metrics["fvu"])


def test_dense_adam_unit_norm_rows():
    w = torch.nn.Parameter(torch.randn(5, 3))
    opt = DenseAdam({"W_dec": w}, lr=0.1, unit_norm_rows=("W_dec",))
    w.grad = torch.randn(5, 3)
    opt.step()
    torch.testing.assert_close(w.norm(dim=1), torch.ones(5))


def test_row_sparse_adam_matches_dense_quality_on_toy_data(tmp_path):
    """Same data, seed and schedule; stated tolerance for the default (catch-up) mode:
    |ΔFVU| <= 0.01 and |ΔMMCS| <= 0.01 on held-out toy data (measured: < 0.001 on both; the
    longer comparison, lazy mode included, is in README's row-sparse Adam section)."""
    toy = ToyData(d=32, n_features=64, mean_active=3.0, seed=0)
    x = toy.sample(9600)
    held = toy.sample(4096)
    scores = {}
    for opt in ("adam", "row_sparse_adam"):
        cfg = _cfg(tmp_path / opt, sae=dict(d_in=32, d_sae=128, architecture="topk", k=4), optimizer=opt,
                   steps=300, batch_size=128, lr=2e-3, log_every=300, dead_tokens=128 * 20)
        tr = Trainer(cfg, x)
        tr.fit()
        with torch.no_grad():
            fvu = float((tr.sae(held) - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
        scores[opt] = (fvu, mmcs(toy.features, tr.sae.W_dec.detach()))
    (fa, ma), (fs, ms) = scores["adam"], scores["row_sparse_adam"]
    assert fa < 0.5 and ma > 0.7, scores  # both actually learned the features
    assert abs(fa - fs) <= 0.01 and abs(ma - ms) <= 0.01, scores


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("unit_norm", [False, True])
def test_dense_adam_step_row_sparse_equals_step_on_the_densified_gradient(dtype, unit_norm):
    """The trainer's dense-Adam path writes row-sparse gradients into kept buffers instead of
    fresh dense tensors; the weights must equal step() on the densified gradient (including a
    step where no latent fired, and the buffers' reuse across steps)."""
    torch.manual_seed(0)
    a = fastsae.TopKSAE(d_in=5, d_sae=12, k=2, dtype=dtype)
    b = fastsae.TopKSAE(d_in=5, d_sae=12, k=2, dtype=dtype)
    b.load_state_dict(a.state_dict())
    rows_opt = DenseAdam(dict(a.named_parameters()), lr=0.01, unit_norm_rows=("W_dec",) if unit_norm else ())
    dense_opt = DenseAdam(dict(b.named_parameters()), lr=0.01, unit_norm_rows=("W_dec",) if unit_norm else ())
    g = torch.Generator().manual_seed(2)
    for step in range(12):
        u = torch.nonzero(torch.rand(12, generator=g) < (0.0 if step == 4 else 0.4)).flatten()
        rows = RowSparseGrads(u, torch.randn(len(u), 5, generator=g).t().to(a.dtype),  # a transposed view, as the op's
                              torch.randn(len(u), generator=g).to(a.dtype),
                              torch.randn(len(u), 5, generator=g).to(a.dtype), 12)
        db = torch.randn(5, generator=g).to(a.dtype)
        rows_opt.step_row_sparse(rows, db)
        full = rows.to_dense()
        b.W_enc.grad, b.b_enc.grad, b.W_dec.grad, b.b_dec.grad = full["dW_enc"], full["db_enc"], full["dW_dec"], db
        dense_opt.step()
        dense_opt.zero_grad()
    # the fp32 masters: equal up to the unit-norm projection's row sums, which vectorise
    # differently over a [touched, d] block than over all rows (1 ulp seen)
    for name, m in rows_opt.master.items():
        torch.testing.assert_close(m, dense_opt.master[name], atol=1e-7 if unit_norm else 0, rtol=0, msg=name)
    assert all(p.grad is None for p in a.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_copy_columns_matches_index_copy(dtype):
    """The optimizers' scatter of row-sparse encoder columns into a dense buffer: the native
    kernel (contiguous CPU buffers) and the index_copy_ path give the same buffer; the
    source rows are left alone; a bad latent id is refused."""
    from fastsae.optim import copy_columns_

    g = torch.Generator().manual_seed(0)
    for d, n, u in ((5, 130, 70), (3, 7, 7), (4, 9, 0), (1, 1, 1)):
        latents = torch.randperm(n, generator=g)[:u].sort().values
        rows = torch.randn(u, d, generator=g).to(dtype)
        saved = rows.clone()
        want = torch.full((d, n), 7.0).index_copy_(1, latents, rows.t().float())
        got = copy_columns_(torch.full((d, n), 7.0), latents, rows.t())
        assert torch.equal(got, want)
        strided = torch.full((n, d), 7.0).t()  # not contiguous: the index_copy_ path
        assert torch.equal(copy_columns_(strided, latents, rows.t()), want)
        assert torch.equal(rows, saved)
    if fastsae.ops.native("scatter_columns_", "cpu") is not None:
        with pytest.raises(RuntimeError, match="out of range"):
            copy_columns_(torch.zeros(2, 4), torch.tensor([4]), torch.ones(2, 1))


# ---------------------------------------------------------------- the dense optimizer's C++ helpers
def _native_optim_ops():
    if fastsae.ops.native("dense_grads_from_rows_", "cpu") is None:
        pytest.skip("the C++ extension is not built")
    return torch.ops.fastsae


# (d, n, u): some latents, none, one, all of them, d = 1, a d that is no multiple of a vector width,
# a dictionary of one latent (fired or not)
GRAD_SHAPES = [(5, 130, 70), (6, 9, 0), (7, 9, 1), (4, 12, 12), (1, 40, 17), (33, 300, 200), (3, 1, 1), (3, 1, 0)]


def _sparse_case(d, n, u, dtype, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randperm(n, generator=g)[:u].sort().values
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if noncontig:  # strided views: W_enc a column slice of wider rows, W_dec a transpose, b_enc every 2nd
        rW_enc, rW_dec, rb_enc = r(u, d + 3)[:, 1:d + 1], r(d, u).t(), r(2 * u)[::2]
    else:
        rW_enc, rW_dec, rb_enc = r(u, d), r(u, d), r(u)
    master = torch.randn(n, d, generator=g)
    master[0] = 0  # a zero row: <w,w> clamps at 1e-24
    return latents, rW_enc.to(dtype), rb_enc.to(dtype), rW_dec.to(dtype), master


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
@pytest.mark.parametrize("noncontig", [False, True])
def test_dense_grads_from_rows_matches_reference(dtype, shape, noncontig):
    """The one-pass buffer builder of DenseAdam.step_row_sparse against zero + index_copy_ +
    constraints.remove_parallel_component_ (plain PyTorch): every buffer entry is overwritten
    (zeros off the latents), the rows are copied exactly without the master and projected
    within fp32 rounding with it; the inputs are left alone."""
    F = _native_optim_ops()
    d, n, u = shape
    latents, rW_enc, rb_enc, rW_dec, master = _sparse_case(d, n, u, dtype, noncontig=noncontig)
    inputs = (latents, rW_enc, rb_enc, rW_dec, master)
    saved = [t.clone() for t in inputs]
    for with_master in (False, True):
        want_dec = rW_dec.float()
        if with_master:
            from fastsae.constraints import remove_parallel_component_
            want_dec = remove_parallel_component_(want_dec.clone(), master[latents], native=False)
        want = (torch.zeros(d, n).index_copy_(1, latents, rW_enc.t().float()),
                torch.zeros(n).index_copy_(0, latents, rb_enc.float()),
                torch.zeros(n, d).index_copy_(0, latents, want_dec))
        got = (torch.full((d, n), 7.0), torch.full((n,), 7.0), torch.full((n, d), 7.0))
        F.dense_grads_from_rows_(*got, latents, rW_enc, rb_enc, rW_dec, master if with_master else None)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        if with_master:
            torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got[2], want[2])
    for t, s in zip(inputs, saved):
        assert torch.equal(t, s)


@pytest.mark.parametrize("shape", [(130, 5), (9, 1), (0, 4), (1, 6), (3, 33), (64, 300)], ids=str)
def test_unit_norm_ops_match_reference(shape):
    """constraints' two halves: the C++ ops (contiguous fp32 CPU) against the plain-PyTorch
    path (native=False), including a zero row (the norm clamps) and d = 1; the projection's
    rows are left alone."""
    from fastsae.constraints import normalize_rows_, remove_parallel_component_

    _native_optim_ops()
    g = torch.Generator().manual_seed(1)
    w, grad = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    if shape[0]:
        w[0] = 0
    saved = w.clone()
    got = remove_parallel_component_(grad.clone(), w)
    torch.testing.assert_close(got, remove_parallel_component_(grad.clone(), w, native=False), rtol=1e-5, atol=1e-6)
    assert torch.equal(w, saved)
    got = normalize_rows_(w.clone())
    torch.testing.assert_close(got, normalize_rows_(w.clone(), native=False), rtol=1e-6, atol=1e-7)
    if shape[0]:
        assert torch.equal(got[0], torch.zeros(shape[1]))
        torch.testing.assert_close(got[1:].norm(dim=1), torch.ones(shape[0] - 1))


def test_optim_ops_pass_opcheck():
    F = _native_optim_ops()
    latents, rW_enc, rb_enc, rW_dec, master = _sparse_case(5, 20, 8, torch.float32)
    bufs = (torch.zeros(5, 20), torch.zeros(20), torch.zeros(20, 5))
    torch.library.opcheck(F.dense_grads_from_rows_, (*bufs, latents, rW_enc, rb_enc, rW_dec, master))
    torch.library.opcheck(F.dense_grads_from_rows_, (*bufs, latents, rW_enc, rb_enc, rW_dec, None))
    torch.library.opcheck(F.remove_parallel_component_, (torch.randn(20, 5), master))
    torch.library.opcheck(F.normalize_rows_, (master.clone(),))


def test_optim_ops_refuse_bad_arguments():
    F = _native_optim_ops()
    latents, rW_enc, rb_enc, rW_dec, master = _sparse_case(5, 20, 8, torch.float32)
    bufs = lambda: (torch.zeros(5, 20), torch.zeros(20), torch.zeros(20, 5))  # noqa: E731
    cases = [
        ((*bufs(), latents + 12, rW_enc, rb_enc, rW_dec, None), "out of range"),
        ((*bufs(), latents.flip(0), rW_enc, rb_enc, rW_dec, None), "strictly ascending"),
        ((*bufs(), latents.int(), rW_enc, rb_enc, rW_dec, None), "int64"),
        ((*bufs(), latents, rW_enc[:, :4], rb_enc, rW_dec, None), "rW_enc must have shape"),
        ((*bufs(), latents, rW_enc, rb_enc[:3], rW_dec, None), "rb_enc must have shape"),
        ((*bufs(), latents, rW_enc.double(), rb_enc, rW_dec, None), "cast them to one dtype"),
        ((*bufs(), latents, rW_enc, rb_enc, rW_dec, master[:, :4]), "W_dec_master must have shape"),
        ((*bufs(), latents, rW_enc, rb_enc, rW_dec, master.double()), "W_dec_master must be float32"),
        ((torch.zeros(5, 20).double(), *bufs()[1:], latents, rW_enc, rb_enc, rW_dec, None), "gW_enc must be float32"),
        ((torch.zeros(20, 5).t(), *bufs()[1:], latents, rW_enc, rb_enc, rW_dec, None), "gW_enc must be contiguous"),
        ((torch.zeros(4, 20), *bufs()[1:], latents, rW_enc, rb_enc, rW_dec, None), "gW_enc .* must have shape"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            F.dense_grads_from_rows_(*args)
    with pytest.raises(RuntimeError, match="rows .* must have shape"):
        F.remove_parallel_component_(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(RuntimeError, match="weight must be float32"):
        F.normalize_rows_(torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        F.normalize_rows_(torch.zeros(3, 4).t())


def _adam_rows_case(d, n, u, dtype, seed=0, noncontig=False):
    """Parameters and moments (fp32: W_enc, b_enc, W_dec with unit rows, b_dec), a row-sparse
    gradient and db_dec, for adam_rows_step_."""
    g = torch.Generator().manual_seed(seed + 1)
    params = [torch.randn(d, n, generator=g), torch.randn(n, generator=g),
              torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1), torch.randn(d, generator=g)]
    exp_avg = [torch.randn(p.shape, generator=g) * 1e-2 for p in params]
    exp_avg_sq = [torch.rand(p.shape, generator=g) * 1e-3 for p in params]
    latents, rW_enc, rb_enc, rW_dec, _ = _sparse_case(d, n, u, dtype, seed, noncontig)
    return params, exp_avg, exp_avg_sq, (latents, rW_enc, rb_enc, rW_dec, torch.randn(d, generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", GRAD_SHAPES + [(16, 64, 30)], ids=str)
@pytest.mark.parametrize("noncontig", [False, True])
def test_adam_rows_step_matches_buffers_and_torch_kernel(dtype, shape, noncontig):
    """adam_rows_step_ (Adam fed the row-sparse gradient, no buffers) against the buffered
    sequence it replaces: dense_grads_from_rows_, torch's fused Adam kernel, normalize_rows_.
    The same bits wherever torch's kernel takes its vector body (all but the last numel % 16
    entries of a tensor, where it computes in double), within fp32 rounding there; with and
    without the unit-norm projection, over steps 1 and 9 and beta1 on both sides of 0.5; the
    gradient rows, latents and db_dec left alone."""
    F = _native_optim_ops()
    d, n, u = shape
    for unit, beta1, step in ((True, 0.9, 1.0), (False, 0.9, 9.0), (True, 0.3, 9.0)):
        params, exp_avg, exp_avg_sq, grads = _adam_rows_case(d, n, u, dtype, noncontig=noncontig)
        latents, rW_enc, rb_enc, rW_dec, db = grads
        saved = [t.clone() for t in grads]
        ref = [[t.clone() for t in ts] for ts in (params, exp_avg, exp_avg_sq)]
        bufs = [torch.zeros(d, n), torch.zeros(n), torch.zeros(n, d)]
        F.dense_grads_from_rows_(*bufs, latents, rW_enc, rb_enc, rW_dec, ref[0][2] if unit else None)
        torch._fused_adam_(ref[0], bufs + [db.clone()], ref[1], ref[2], [], [torch.tensor(step)] * 4, amsgrad=False,
                           lr=1e-2, beta1=beta1, beta2=0.999, weight_decay=0.0, eps=1e-8, maximize=False)
        if unit:
            F.normalize_rows_(ref[0][2])
        F.adam_rows_step_(params, exp_avg, exp_avg_sq, latents, rW_enc, rb_enc, rW_dec, db, [step] * 4, 1e-2, beta1,
                          0.999, 1e-8, unit)
        for got, want in zip(params + exp_avg + exp_avg_sq, ref[0] + ref[1] + ref[2]):
            body = got.numel() - got.numel() % 16
            if got is params[2] and unit and got.numel() % 16:  # a row normalised across the tail
                body = (body // d) * d
            assert torch.equal(got.flatten()[:body], want.flatten()[:body])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        for t, s in zip(grads, saved):
            assert torch.equal(t, s)


def test_adam_rows_step_gives_the_same_bits_on_any_thread_count():
    """Every column block and row is stepped by one worker: 1 and 3 threads agree bit for bit
    (shapes wide enough for several encoder blocks and decoder chunks)."""
    F = _native_optim_ops()
    case = _adam_rows_case(24, 2000, 1500, torch.float32)
    outs = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            params, exp_avg, exp_avg_sq, grads = [[x.clone() for x in ts] for ts in case]
            F.adam_rows_step_(params, exp_avg, exp_avg_sq, *grads, [3.0] * 4, 1e-3, 0.9, 0.999, 1e-8, True)
            outs.append(params + exp_avg + exp_avg_sq)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_adam_rows_step_refuses_bad_arguments_and_passes_opcheck():
    F = _native_optim_ops()
    params, exp_avg, exp_avg_sq, (latents, rW_enc, rb_enc, rW_dec, db) = _adam_rows_case(5, 20, 8, torch.float32)
    ok = (latents, rW_enc, rb_enc, rW_dec, db, [1.0] * 4, 1e-3, 0.9, 0.999, 1e-8, True)
    torch.library.opcheck(F.adam_rows_step_, (params, exp_avg, exp_avg_sq, *ok))
    bad_b = [params[0], params[1][:7], params[2], params[3]]
    cases = [
        ((params[:3], exp_avg[:3], exp_avg_sq[:3], *ok), "4 entries"),
        ((bad_b, exp_avg, exp_avg_sq, *ok), "b_enc's tensors must have shape"),
        (([p.double() for p in params], exp_avg, exp_avg_sq, *ok), "W_enc must be float32"),
        ((params, exp_avg, exp_avg_sq, latents.flip(0), *ok[1:]), "strictly ascending"),
        ((params, exp_avg, exp_avg_sq, latents, rW_enc[:, :3], *ok[2:]), "rW_enc must have shape"),
        ((params, exp_avg, exp_avg_sq, *ok[:4], db[:3], *ok[5:]), "db_dec must have shape"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            F.adam_rows_step_(*args)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_adam_rows_step_narrower_cpu_paths_match_torch_kernel(isa):
    """The op's AVX2 and portable paths (FASTSAE_CPU_ISA caps what the extension uses) give
    torch's kernel's bits too: DenseAdam's own start-up check, run in a fresh process."""
    _native_optim_ops()
    code = ("import fastsae.optim as o; "
            "print(o._check_rows_kernel(0.9, 0.999, 1e-8), o._check_rows_kernel(0.3, 0.99, 1e-6))")
    env = {**os.environ, "FASTSAE_CPU_ISA": isa}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def test_dense_adam_keeps_the_buffered_step_where_the_op_disagrees_with_torch(monkeypatch):
    """Where adam_rows_step_ does not reproduce torch's kernel (another torch build could fuse
    other multiply-adds), the start-up check fails and step_row_sparse keeps the buffered
    path: still torch.optim's bits. The disagreement is simulated by an lr larger by 1e-6."""
    _native_optim_ops()
    import fastsae.optim as optim_mod

    real = optim_mod.ops.native

    def skewed(name, device):
        op = real(name, device)
        if name != "adam_rows_step_" or op is None:
            return op
        return lambda *a: op(*a[:9], a[9] * (1 + 1e-6), *a[10:])

    monkeypatch.setattr(optim_mod.ops, "native", skewed)
    monkeypatch.setattr(optim_mod, "_rows_kernel_checks", {})
    torch.manual_seed(0)
    mods = [fastsae.TopKSAE(d_in=16, d_sae=48, k=3) for _ in range(2)]
    mods[1].load_state_dict(mods[0].state_dict())
    opts = [DenseAdam(dict(m.named_parameters()), lr=1e-2, unit_norm_rows=("W_dec",)) for m in mods]
    opts[1].direct = False
    assert not opts[0]._rows_kernel_applies()
    u = torch.arange(0, 48, 3)
    rows = RowSparseGrads(u, torch.randn(len(u), 16).t(), torch.randn(len(u)), torch.randn(len(u), 16), 48)
    db = torch.randn(16)
    for o in opts:
        o.step_row_sparse(rows, db)
    for pa, pb in zip(mods[0].parameters(), mods[1].parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_adam_native_bookkeeping_matches_plain_pytorch(dtype):
    """DenseAdam.step_row_sparse with the C++ buffer builder and normalisation against the
    plain-PyTorch sequence (native=False) over several steps: the same weights within fp32
    rounding, the Adam state of the same structure, the caller's gradient rows untouched."""
    _native_optim_ops()
    torch.manual_seed(0)
    a = fastsae.TopKSAE(d_in=33, d_sae=200, k=4, dtype=dtype)
    b = fastsae.TopKSAE(d_in=33, d_sae=200, k=4, dtype=dtype)
    b.load_state_dict(a.state_dict())
    opts = [DenseAdam(dict(m.named_parameters()), lr=1e-3, unit_norm_rows=("W_dec",)) for m in (a, b)]
    opts[1].native = False
    g = torch.Generator().manual_seed(3)
    for step in range(6):
        u = torch.nonzero(torch.rand(200, generator=g) < (0.0 if step == 2 else 0.5)).flatten()
        rows = RowSparseGrads(u, torch.randn(len(u), 33, generator=g).t().to(a.dtype),
                              torch.randn(len(u), generator=g).to(a.dtype),
                              torch.randn(len(u), 33, generator=g).to(a.dtype), 200)
        db = torch.randn(33, generator=g).to(a.dtype)
        saved = [t.clone() for t in (rows.W_enc, rows.b_enc, rows.W_dec, db)]
        for opt in opts:
            opt.step_row_sparse(rows, db)
        assert all(torch.equal(t, s) for t, s in zip((rows.W_enc, rows.b_enc, rows.W_dec, db), saved))
    for name, m in opts[0].master.items():
        torch.testing.assert_close(m, opts[1].master[name], rtol=1e-5, atol=1e-5, msg=name)
    assert opts[0].opt.state_dict()["state"].keys() == opts[1].opt.state_dict()["state"].keys()


@pytest.mark.parametrize("n_rows", [4, 1, 0])
@pytest.mark.parametrize("zeros", [False, True])
def test_sparse_backward_lists_the_latents_kept_with_a_nonzero_value(zeros, n_rows):
    """rows.latents is exactly the latents some slot kept with a value != 0 (a latent picked
    only with value 0 has no gradient), both when no value is 0 (the early return) and when
    some are, at 4, 1 and 0 rows; the rows match autograd of the selection's decode."""
    torch.manual_seed(0)
    sae = fastsae.TopKSAE(fastsae.SAEConfig(d_in=8, d_sae=12, architecture="topk", k=3), dtype=torch.float64)
    x = torch.randn(4, 8, dtype=torch.float64)
    indices = torch.tensor([[0, 5, 7], [5, 2, 9], [11, 0, 3], [7, 9, 2]])
    values = torch.rand(4, 3, dtype=torch.float64) + 0.5
    if zeros:
        values[0, 0] = values[2, 1] = 0.0  # latent 0 only with value 0
        values[2, 2] = 0.0  # latent 3 only with value 0
    x, indices, values = x[:n_rows], indices[:n_rows], values[:n_rows]
    sel = Selection(values, indices, SparseActs(values, indices, 12))
    grad_out = torch.randn(n_rows, 8, dtype=torch.float64)
    rows, _ = sae.sparse_backward(x, sel, grad_out)
    want = sorted({int(i) for i, v in zip(indices.flatten(), values.flatten()) if v != 0})
    assert rows.latents.tolist() == want
    W_dec = sae.W_dec.detach().clone().requires_grad_(True)
    x_hat = torch.zeros(n_rows, 12, dtype=torch.float64).scatter_add(1, indices, values) @ W_dec
    (x_hat * grad_out).sum().backward()
    torch.testing.assert_close(rows.W_dec, W_dec.grad[rows.latents])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape,betas,unit", [((9, 40), (0.9, 0.999), True), ((16, 48), (0.9, 0.999), True),
                                              ((16, 48), (0.3, 0.99), False)])
def test_dense_adam_kernel_call_equals_torch_optim_step(dtype, shape, betas, unit):
    """DenseAdam calls torch's fused Adam kernel itself (direct), and where every parameter
    has a multiple of 16 entries its row-sparse step runs the C++ op adam_rows_step_ instead
    (no gradient buffers); both must give torch.optim's step() bits exactly: weights, moments
    and step counts, through lr changes, both step paths (row-sparse and .grad, steps where
    no latent and one latent fired), and a state_dict round trip into a fresh optimizer.
    betas[0] < 0.5 takes the other form of the kernel's exp_avg.lerp_."""
    d, n = shape
    torch.manual_seed(0)
    mods = [fastsae.TopKSAE(d_in=d, d_sae=n, k=3, dtype=dtype) for _ in range(2)]
    mods[1].load_state_dict(mods[0].state_dict())
    norm = ("W_dec",) if unit else ()
    opts = [DenseAdam(dict(m.named_parameters()), lr=1e-2, betas=betas, unit_norm_rows=norm) for m in mods]
    assert opts[0].direct
    opts[1].direct = False
    assert opts[0]._rows_kernel_applies() == (n % 16 == 0) and not opts[1]._rows_kernel_applies()
    g = torch.Generator().manual_seed(5)
    for step in range(8):
        if step == 4:  # resume both from their state dicts
            states = [o.state_dict() for o in opts]
            opts = [DenseAdam(dict(m.named_parameters()), lr=1e-2, betas=betas, unit_norm_rows=norm) for m in mods]
            opts[1].direct = False
            for o, st in zip(opts, states):
                o.load_state_dict(st)
        u = torch.nonzero(torch.rand(n, generator=g) < 0.5).flatten()
        u = {3: u[:0], 5: u[:1]}.get(step, u)  # row-sparse steps where no latent and one latent fired
        scale = 10.0 ** torch.randint(-6, 2, (len(u), 1), generator=g)  # gradients of several magnitudes
        rows = RowSparseGrads(u, (torch.randn(len(u), d, generator=g) * scale).t().to(mods[0].dtype),
                              torch.randn(len(u), generator=g).to(mods[0].dtype),
                              (torch.randn(len(u), d, generator=g) * scale).to(mods[0].dtype), n)
        db = torch.randn(d, generator=g).to(mods[0].dtype)
        grads = [torch.randn(p.shape, generator=g).to(p.dtype) for p in mods[0].parameters()]
        for o, m in zip(opts, mods):
            o.set_lr(1e-2 / (1 + step))
            if step % 2:
                o.step_row_sparse(rows, db)
            else:
                for p, gr in zip(m.parameters(), grads):
                    p.grad = gr.clone()
                o.step()
                o.zero_grad()
    for name in opts[0].master:
        assert torch.equal(opts[0].master[name], opts[1].master[name]), name
        sa, sb = (o.opt.state[o.master[name]] for o in opts)
        assert all(torch.equal(sa[k], sb[k]) for k in ("step", "exp_avg", "exp_avg_sq")), name
    for pa, pb in zip(mods[0].parameters(), mods[1].parameters()):  # the module's own (bf16) weights too
        assert torch.equal(pa, pb)
    assert (opts[0]._grads is None) == (n % 16 == 0)  # the op keeps no gradient buffers
    assert float(opts[0].opt.state[opts[0].master["W_enc"]]["step"]) == 8
    assert all(p.grad is None for m in mods for p in m.parameters())
