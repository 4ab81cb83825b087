"""Compact optimizer state: bf16 / 8-bit moments, Kahan / stochastic-rounding weights, Signum.

Checked against fp32 Adam (torch's, through DenseAdam), for row locality (a row-sparse step
touches only the fired latents' bytes), exact resume (a state_dict round trip continues
bit-identically) and the errors a mismatched resume raises."""

import io
import itertools

import pytest
import torch

import fastsae
from fastsae.errors import ConfigError
from fastsae.optim import CompactAdam, DenseAdam, RowSparseAdam, build_optimizer
from fastsae.sparse import RowSparseGrads
from fastsae.toy.data import ToyData
from fastsae.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

D, N = 6, 20


def _sae(dtype="float32", seed=0):
    torch.manual_seed(seed)
    return fastsae.TopKSAE(d_in=D, d_sae=N, k=2, dtype=dtype)


def _rows(g, u, dtype=torch.float32):
    u = torch.as_tensor(sorted(u), dtype=torch.long)
    return RowSparseGrads(u, torch.randn(len(u), D, generator=g).t().to(dtype),  # transposed, as the op's
                          torch.randn(len(u), generator=g).to(dtype), torch.randn(len(u), D, generator=g).to(dtype), N)


def _fired(g, p=0.3):
    return torch.nonzero(torch.rand(N, generator=g) < p).flatten().tolist()


def _drive(opt, sae, steps, seed, row_sparse_api):
    """The trainer's calls: step(rows, db_dec) for RowSparseAdam, step_row_sparse otherwise."""
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        rows = _rows(g, _fired(g, 0.0 if i == 3 else 0.3), sae.dtype)
        db = torch.randn(D, generator=g).to(sae.dtype)
        opt.set_lr(0.01 * (1 - i / (2 * steps)))
        if row_sparse_api:
            opt.step(rows, db)
        else:
            opt.step_row_sparse(rows, db)


def _params(sae):
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def test_compact_adam_in_fp32_is_torch_adam():
    """fp32 moments and weights: CompactAdam's chunked step equals torch's Adam (through
    DenseAdam), on step() and step_row_sparse(), unit-norm rows included."""
    for api in ("step", "step_row_sparse"):
        a, b = _sae(), _sae()
        ours = CompactAdam(dict(a.named_parameters()), lr=0.01, unit_norm_rows=("W_dec",), state="fp32",
                           master="fp32", chunk_elems=16)  # several chunks per parameter
        ref = DenseAdam(dict(b.named_parameters()), lr=0.01, unit_norm_rows=("W_dec",))
        g = torch.Generator().manual_seed(4)
        for _ in range(15):
            rows, db = _rows(g, _fired(g)), torch.randn(D, generator=g)
            if api == "step":
                full = rows.to_dense()
                for sae in (a, b):
                    sae.W_enc.grad, sae.b_enc.grad = full["dW_enc"].clone(), full["db_enc"].clone()
                    sae.W_dec.grad, sae.b_dec.grad = full["dW_dec"].clone(), db.clone()
                ours.step()
                ref.step()
            else:
                ours.step_row_sparse(rows, db)
                ref.step_row_sparse(rows, db)
        for k, v in _params(a).items():
            torch.testing.assert_close(v, _params(b)[k], rtol=1e-5, atol=1e-6, msg=f"{api} {k}")


def test_compact_adam_step_leaves_the_gradient_alone():
    a = _sae()
    opt = CompactAdam(dict(a.named_parameters()), lr=0.01, unit_norm_rows=("W_dec",), state="int8",
                      master="fp32")
    grads = {n: torch.randn_like(p) for n, p in a.named_parameters()}
    for n, p in a.named_parameters():
        p.grad = grads[n].clone()
    opt.step()
    for n, p in a.named_parameters():
        assert torch.equal(p.grad, grads[n]), n


FORMS = list(itertools.product(("fp32", "bf16", "int8"), ("fp32", "kahan", "stochastic", "none")))


@pytest.mark.parametrize("state,master", FORMS)
@pytest.mark.parametrize("algorithm", ["adam", "signum"])
def test_row_sparse_step_touches_only_the_fired_latents(state, master, algorithm):
    sae = _sae("bfloat16")
    opt = RowSparseAdam(sae, lr=0.01, catch_up=False, state=state, master=master, algorithm=algorithm)
    _drive(opt, sae, 5, seed=1, row_sparse_api=True)  # every moment has some history
    before = _params(sae)
    store = {n: [t.clone() for m in ms for t in m.tensors()] for n, ms in opt.moments.items()}
    extra = {n: [t.clone() for t in w.extra_tensors()] for n, w in opt.weights.items()}
    g = torch.Generator().manual_seed(9)
    fired = [2, 3, 11]
    opt.step(_rows(g, fired, sae.dtype), None)
    others = [j for j in range(N) if j not in fired]
    after = _params(sae)
    assert torch.equal(after["W_enc"][:, others], before["W_enc"][:, others])
    assert torch.equal(after["W_dec"][others], before["W_dec"][others])
    assert not torch.equal(after["W_dec"][fired], before["W_dec"][fired])
    for n, ms in opt.moments.items():
        for t, t0 in zip([t for m in ms for t in m.tensors()], store[n]):
            assert torch.equal(t[others], t0[others]), n  # codes, block scales or values of silent latents
    for n, w in opt.weights.items():
        for t, t0 in zip(w.extra_tensors(), extra[n]):
            assert torch.equal(t[others], t0[others]), n


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", ["row_sparse_adam", "adam", "row_sparse_signum", "signum"])
@pytest.mark.parametrize("state,master", [("int8", "stochastic"), ("bf16", "kahan"), ("int8", "fp32"),
                                          ("fp32", "none")])
def test_state_dict_round_trip_continues_bit_identically(name, state, master):
    a = _sae("bfloat16")
    opt_a = build_optimizer(a, name=name, lr=0.01, state=state, master=master)
    row_sparse = name.startswith("row_sparse")
    _drive(opt_a, a, 6, seed=2, row_sparse_api=row_sparse)
    saved = _roundtrip(opt_a.state_dict())
    b = _sae("bfloat16", seed=1)  # different weights, then the checkpoint's
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b, name=name, lr=0.5, state=state, master=master)
    opt_b.load_state_dict(saved)
    _drive(opt_a, a, 6, seed=3, row_sparse_api=row_sparse)
    _drive(opt_b, b, 6, seed=3, row_sparse_api=row_sparse)
    if row_sparse:
        opt_a.flush()
        opt_b.flush()
    for k, v in _params(a).items():
        assert torch.equal(v, _params(b)[k]), k
    assert not torch.equal(_params(a)["W_dec"], _sae("bfloat16")._parameters["W_dec"].detach())


def test_resume_with_other_settings_is_refused():
    sae = _sae("bfloat16")
    saved = build_optimizer(sae, name="row_sparse_adam", lr=0.01, state="int8", master="kahan").state_dict()
    with pytest.raises(ConfigError, match="moments are int8"):
        build_optimizer(sae, name="row_sparse_adam", lr=0.01, state="bf16", master="kahan").load_state_dict(saved)
    with pytest.raises(ConfigError, match="master='kahan'"):
        build_optimizer(sae, name="row_sparse_adam", lr=0.01, state="int8", master="stochastic").load_state_dict(saved)
    with pytest.raises(ConfigError, match="signum"):
        build_optimizer(sae, name="row_sparse_signum", lr=0.01, state="int8",
                        master="kahan").load_state_dict(saved)


def test_fp32_row_sparse_state_loads_the_format_before_compact_state():
    sae = _sae()
    opt = RowSparseAdam(sae, lr=0.01)
    _drive(opt, sae, 4, seed=5, row_sparse_api=True)
    new = opt.state_dict()
    old = {k: new[k] for k in ("lr", "t", "catch_up", "row_steps", "dense")}
    old["state"] = {n: tuple(m.values.reshape(-1) if n == "b_enc" else m.values for m in ms)
                    for n, ms in opt.moments.items()}
    old["master"] = None
    other = RowSparseAdam(_sae(), lr=0.01)
    other.load_state_dict(old)
    for n, ms in opt.moments.items():
        for m, m2 in zip(ms, other.moments[n]):
            assert torch.equal(m.values, m2.values)


def test_build_optimizer_choices_and_errors():
    sae = _sae("bfloat16")
    assert isinstance(build_optimizer(sae, name="adam", lr=1e-3), DenseAdam)
    assert isinstance(build_optimizer(sae, name="adam", lr=1e-3, state="bf16", master="stochastic"), CompactAdam)
    assert isinstance(build_optimizer(sae, name="signum", lr=1e-3), CompactAdam)
    rs = build_optimizer(sae, name="row_sparse_signum", lr=1e-3, state="int8", catch_up=True)
    assert isinstance(rs, RowSparseAdam) and rs.algorithm == "signum" and not rs.catch_up
    with pytest.raises(ConfigError, match="optimizer 'sgd' is unknown"):
        build_optimizer(sae, name="sgd", lr=1e-3)
    with pytest.raises(ConfigError, match="optimizer state 'int4' is unknown"):
        build_optimizer(sae, name="adam", lr=1e-3, state="int4")
    with pytest.raises(ConfigError, match="master weights 'fp64' are unknown"):
        build_optimizer(sae, name="adam", lr=1e-3, master="fp64")
    with pytest.raises(ConfigError, match="use master='fp32', or train in bfloat16"):
        build_optimizer(_sae("float32"), name="row_sparse_adam", lr=1e-3, master="kahan")


def test_int8_moments_keep_vectors_in_fp32_and_matrices_in_bytes():
    sae = _sae("bfloat16")
    rs = RowSparseAdam(sae, lr=1e-3, state="int8", master="stochastic")
    assert [m.form for m in rs.moments["W_enc"]] == ["int8", "int8"]
    assert [m.form for m in rs.moments["b_enc"]] == ["fp32", "fp32"]
    dense = CompactAdam(dict(sae.named_parameters()), lr=1e-3, state="int8", master="stochastic")
    assert [m.form for m in dense.moments["b_dec"]] == ["fp32", "fp32"]
    assert dense.moments["W_enc"][0].codes.shape == (D, N)
    assert sum(w.nbytes for w in rs.weights.values()) == 0  # stochastic rounding keeps no copy


def test_signum_moves_each_fired_weight_by_lr_and_signsgd_keeps_no_state():
    sae = _sae()
    opt = RowSparseAdam(sae, lr=0.25, unit_norm_decoder=False, algorithm="signum", betas=(0.0, 0.999))
    assert all(not ms for ms in opt.moments.values())
    before = _params(sae)
    g = torch.Generator().manual_seed(0)
    rows = _rows(g, [1, 4])
    opt.step(rows, None)
    delta = _params(sae)["W_dec"] - before["W_dec"]
    torch.testing.assert_close(delta[[1, 4]], -0.25 * rows.W_dec.sign())
    assert float(delta[[0, 2, 3]].abs().max()) == 0


@pytest.mark.parametrize("master,moves", [("none", False), ("kahan", True), ("stochastic", True), ("fp32", True)])
def test_small_steps_on_bf16_weights_add_up_unless_rounded_to_nearest(master, moves):
    """lr·1 = 1e-4 per step on weights ~1 (bf16 resolution 2^-7): 200 steps should move each
    weight by ~0.02. Round-to-nearest drops every step; Kahan and stochastic rounding keep them."""
    w = torch.nn.Parameter(torch.full((64, 8), 1.0, dtype=torch.bfloat16))
    opt = CompactAdam({"w": w}, lr=1e-4, state="fp32", master=master)
    for _ in range(200):
        w.grad = torch.ones_like(w)
        opt.step()
    moved = 1.0 - w.detach().float()
    if not moves:
        assert float(moved.abs().max()) == 0
    else:  # within an ulp (2^-8 here) on average; stochastic rounding leaves each weight a random walk of ulps
        assert abs(float(moved.mean()) - 0.02) < 0.002
        assert float((moved - 0.02).abs().max()) < (0.05 if master == "stochastic" else 2 ** -8)


def test_compact_moments_track_fp32_adam():
    """Same gradients: bf16 and int8 moments stay close to fp32 Adam's trajectory on fp32
    weights (relative weight deviation after 40 steps)."""
    trajectories = {}
    for state in ("fp32", "bf16", "int8"):
        sae = _sae()
        opt = RowSparseAdam(sae, lr=0.01, state=state)
        _drive(opt, sae, 40, seed=6, row_sparse_api=True)
        opt.flush()
        trajectories[state] = _params(sae)
    init = _params(_sae())
    for state in ("bf16", "int8"):
        for k in ("W_enc", "W_dec"):
            moved = (trajectories["fp32"][k] - init[k]).norm()
            dev = (trajectories[state][k] - trajectories["fp32"][k]).norm()
            assert float(dev / moved) < 0.05, (state, k, float(dev / moved))


def test_trainer_drives_a_compact_optimizer_to_the_same_quality(tmp_path):
    """A bf16 TopK SAE on toy data, trained by the Trainer with int8 moments and stochastic
    rounding instead of fp32 moments and masters: FVU within 0.01 of fp32 Adam's (bench/
    optim_quality.py runs the longer comparisons)."""
    toy = ToyData(d=16, n_features=48, mean_active=3.0, seed=0)
    x, held = toy.sample(6400), toy.sample(2048)
    fvus = {}
    for state, master in (("fp32", "fp32"), ("int8", "stochastic")):
        cfg = TrainConfig(sae=dict(d_in=16, d_sae=96, architecture="topk", k=4, dtype="bfloat16"), steps=200,
                          batch_size=64, lr=2e-3, optimizer="row_sparse_adam", optimizer_state=state,
                          master_weights=master, log_every=200, checkpoint_every=0,
                          out_dir=str(tmp_path / state), progress=False, console=False, plot=False,
                          init_sample_rows=256, dead_tokens=64 * 20)
        tr = Trainer(cfg, x)
        assert tr.opt.form == state  # TrainConfig's optimizer_state reached the optimizer
        tr.fit()
        with torch.no_grad():
            fvus[state] = float((tr.sae(held).float() - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
    assert fvus["fp32"] < 0.5, fvus
    assert abs(fvus["int8"] - fvus["fp32"]) <= 0.01, fvus
