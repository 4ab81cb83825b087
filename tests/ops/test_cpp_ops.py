"""The C++ ops (torch.ops.fastsae.*) against the plain-PyTorch reference: values, gradients,
determinism, registration (opcheck, gradcheck, torch.compile) and argument errors."""

import math

import pytest
import torch

import fastsae
from fastsae.ops import reference
from fastsae.sae import sae_class
from fastsae.sparse import SparseActs
from helpers import KINDS, check_autograd_backward_ops, require, sparse_case

cpp_ops = require("fastsae.ops.cpp", "the C++ extension (a build of fastsae._C)")
F = torch.ops.fastsae
F64 = torch.float64


def rand(*shape, dtype=F64, seed=None, **kw):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, dtype=dtype, generator=g, **kw)


# (B, d, n, k): k=1, k=n, d not a multiple of any vector width, d=1, empty batch
SHAPES = [(7, 5, 11, 3), (33, 17, 64, 1), (4, 13, 9, 9), (20, 1, 30, 4), (0, 6, 10, 2), (65, 33, 200, 8)]


# ---------------------------------------------------------------- backward vs reference
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_b_dec", [True, False])
def test_topk_sae_backward_matches_reference(shape, kind, with_b_dec):
    B, d, n, k = shape
    if kind == "one_latent_everywhere" and k < 2:
        k = 2
    c = sparse_case(B, d, n, k, kind)
    if not with_b_dec:
        c["b_dec"] = None
    for row_sparse, need_dx in ((False, True), (True, True), (False, False), (True, False)):
        got = cpp_ops.topk_sae_backward(**c, row_sparse=row_sparse, need_dx=need_dx)
        ref = reference.topk_sae_backward(**c, row_sparse=row_sparse)  # always with dx
        assert got.keys() == ref.keys()
        for key in ("dvalues", "db_dec") + (("dx",) if need_dx else ()):
            torch.testing.assert_close(got[key], ref[key])
        if not need_dx:  # the reference's own db_dec without dx is the same sum
            assert got["dx"] is None
            torch.testing.assert_close(reference.topk_sae_backward(**c, row_sparse=row_sparse, need_dx=False)["db_dec"],
                                       ref["db_dec"])
        if row_sparse:
            g, r = got["rows"], ref["rows"]
            assert torch.equal(g.latents, r.latents) and g.d_sae == r.d_sae
            for name in ("W_enc", "b_enc", "W_dec"):
                torch.testing.assert_close(getattr(g, name), getattr(r, name))
        else:
            for key in ("dW_enc", "db_enc", "dW_dec"):
                assert got[key].shape == ref[key].shape
                torch.testing.assert_close(got[key], ref[key])


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_decode_and_topk_encode_backward_match_reference(kind):
    check_autograd_backward_ops(sparse_case(24, 9, 40, 5, kind))


@pytest.mark.parametrize("rows,n,k", [(40, 50, 6), (1, 50, 6), (0, 50, 6), (7, 1, 1)],
                         ids=["40rows", "1row", "0rows", "1latent"])
@pytest.mark.parametrize("d", [16, 64, 100, 147])
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_register_blocked_sums_match_fp64(d, kind, rows, n, k):
    """fp32 sums over gathered rows run in blocks of 64 and 16 floats plus a scalar tail: every
    width mix, long segments (one latent in every row), slots with value 0, 1 and 0 rows and a
    single latent; no input is written."""
    if kind == "one_latent_everywhere" and k < 2:
        k = 2 if n > 1 else k
    c = sparse_case(rows, d, n, k, kind)
    c32 = {name: v.float() if v.is_floating_point() else v for name, v in c.items()}
    before = {name: v.clone() for name, v in c32.items()}
    for row_sparse in (False, True):
        got = cpp_ops.topk_sae_backward(**c32, row_sparse=row_sparse, need_dx=True)
        ref = reference.topk_sae_backward(**c, row_sparse=row_sparse)
        keys = ("dvalues", "dx", "db_dec") + (() if row_sparse else ("dW_enc", "db_enc", "dW_dec"))
        for key in keys:
            torch.testing.assert_close(got[key].double(), ref[key], rtol=1e-5, atol=1e-4, msg=key)
        if row_sparse:
            assert torch.equal(got["rows"].latents, ref["rows"].latents)
            for name in ("W_enc", "b_enc", "W_dec"):
                torch.testing.assert_close(getattr(got["rows"], name).double(), getattr(ref["rows"], name),
                                           rtol=1e-5, atol=1e-4, msg=name)
    want = reference.sparse_decode(c["values"], c["indices"], c["W_dec"], c["b_dec"])
    got = F.sparse_decode(c32["values"], c32["indices"], c32["W_dec"], c32["b_dec"])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    for name, t in c32.items():
        assert torch.equal(t, before[name]), f"{name} was written"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_low_precision_tracks_fp64(dtype):
    c = sparse_case(16, 12, 30, 4, "few_latents")
    got = cpp_ops.topk_sae_backward(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in c.items()})
    ref = reference.topk_sae_backward(**c)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    for key in ("dvalues", "dW_enc", "db_enc", "dW_dec", "dx", "db_dec"):
        assert got[key].dtype == dtype
        torch.testing.assert_close(got[key].double(), ref[key], rtol=tol, atol=tol * 10)


def test_backward_is_bit_identical_across_runs():
    c = sparse_case(256, 24, 50, 16, "few_latents", dtype=torch.float32)
    c["indices"][:, 0] = 7  # and one latent hit by every row
    for row_sparse in (False, True):
        a = cpp_ops.topk_sae_backward(**c, row_sparse=row_sparse)
        b = cpp_ops.topk_sae_backward(**c, row_sparse=row_sparse)
        for key, val in a.items():
            if key == "rows":
                for name in ("latents", "W_enc", "b_enc", "W_dec"):
                    assert torch.equal(getattr(val, name), getattr(b[key], name))
            else:
                assert torch.equal(val, b[key]), key


def test_autograd_backward_is_bit_identical_across_runs():
    sae = fastsae.TopKSAE(d_in=24, d_sae=64, k=8, dtype="float32", backend="cpp")
    x = rand(128, 24, dtype=torch.float32, seed=1)
    grads = []
    for _ in range(2):
        sae.zero_grad(set_to_none=True)
        sae.training_forward(x).loss.backward()
        grads.append([p.grad.clone() for p in sae.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- forward vs reference
# n=1300 spans several 256-latent tiles; B=700 spans two 512-row blocks; B=3 makes the op
# split the latents across threads and merge the partial top-k lists.
@pytest.mark.parametrize("B,d,n,k", [(0, 3, 6, 2), (9, 7, 20, 1), (9, 7, 20, 20), (300, 17, 1300, 16),
                                     (700, 9, 300, 7), (3, 5, 1300, 40), (5, 3, 513, 512)])
@pytest.mark.parametrize("with_b_dec", [True, False])
def test_topk_encode_matches_reference(B, d, n, k, with_b_dec):
    x, W, b = rand(B, d, seed=0), rand(d, n, seed=1), rand(n, seed=2)
    b_dec = rand(d, seed=3) if with_b_dec else None
    vals, idx = F.topk_encode(x, W, b, b_dec, k)
    rvals, ridx = reference.topk_encode(x, W, b, b_dec, k)
    assert idx.dtype == torch.long and vals.shape == (B, k)
    assert torch.equal(idx, ridx)  # continuous fp64 data: no ties, same (descending) order
    torch.testing.assert_close(vals, rvals)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_encode_low_precision(dtype):
    x, W, b = rand(40, 16, seed=0), rand(16, 700, seed=1), rand(700, seed=2)
    vals, idx = F.topk_encode(x.to(dtype), W.to(dtype), b.to(dtype), None, 8)
    assert vals.dtype == dtype
    # pre-activations recomputed in fp64 at the chosen ids are the top of each row
    pre = x.to(dtype).double() @ W.to(dtype).double() + b.to(dtype).double()
    chosen = pre.gather(1, idx)
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(chosen.relu(), vals.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(chosen.relu(), pre.topk(8).values.relu(), rtol=tol, atol=tol)


def test_topk_encode_ties_prefer_smaller_id_and_nan_does_not_crash():
    W = torch.zeros(3, 10, dtype=F64)
    b = torch.tensor([1.0, 2, 2, 0, 2, 1, 0, 0, 0, 0], dtype=F64)
    vals, idx = F.topk_encode(torch.ones(2, 3, dtype=F64), W, b, None, 4)
    assert idx.tolist() == [[1, 2, 4, 0]] * 2 and vals.tolist() == [[2.0, 2, 2, 1]] * 2
    x = torch.ones(2, 3, dtype=F64)
    x[0, 0] = float("nan")
    vals, idx = F.topk_encode(x, rand(3, 10, seed=0), b, None, 4)
    assert torch.isnan(vals[0]).all() and torch.isfinite(vals[1]).all()


def _ranked(pre_row: list[float], ids: list[int]) -> list[int]:
    """ids ranked as topk_encode ranks them: NaN first, then larger value, then smaller id."""
    return sorted(ids, key=lambda j: (not math.isnan(pre_row[j]), -pre_row[j] if not math.isnan(pre_row[j]) else 0, j))


@pytest.mark.parametrize("k", [1, 5, 40, 700])
def test_topk_encode_fp32_ranks_ties_nan_inf_and_signed_zero(k):
    """fp32 selections rank one packed 64-bit key per entry; it must order exactly as the pair
    (value, id) does: NaN above +inf, -0 tied with +0, negatives in order, ties toward the
    smaller id, over several tiles and many cuts of the running top-k."""
    g = torch.Generator().manual_seed(0)
    n = 700
    pool = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1.5, -2.25, 3.0, 1e-38, -1e-38])
    b = pool[torch.randint(len(pool), (n,), generator=g)]
    b[::7] = torch.randn(len(range(0, n, 7)), generator=g)
    x, W = torch.ones(3, 1), torch.full((1, n), -0.0)  # pre-activations = b_enc exactly, -0 + -0 = -0 kept
    dead = torch.arange(1, n, 3)
    vals, idx, dvals, didx = torch.ops.fastsae.topk_encode_dead(x, W, b, None, k, dead, min(k, 50))
    want = _ranked(b.tolist(), list(range(n)))[:k]
    want_dead = _ranked(b.tolist(), dead.tolist())[:min(k, 50)]
    for r in range(3):  # AuxK's selection: the same set, in no particular order
        assert idx[r].tolist() == want and sorted(didx[r].tolist()) == sorted(want_dead)
    torch.testing.assert_close(vals, b[want].relu().expand(3, -1), equal_nan=True)
    torch.testing.assert_close(dvals, b[didx].relu(), equal_nan=True)
    assert torch.equal(F.topk_encode(x, W, b, None, k)[1], idx)


# Rows of fp32 pre-activations that exercise the running top-k's cuts: random, ascending
# (every tile beats the last bar), descending, heavy ties and a late burst (the best in the
# last tile). One-hot x and b_enc = 0 make the encoder's sums the rows exactly.
FP32_ROW_KINDS = ("random", "ascending", "descending", "ties", "late burst")
_SELECTION_CHECK = """
import torch, fastsae._C
F = torch.ops.fastsae

def rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    late = torch.randn(n, generator=g)
    late[-200:] += 10
    return torch.stack([torch.randn(n, generator=g), torch.linspace(-3, 3, n), torch.linspace(3, -3, n),
                        torch.randint(0, 4, (n,), generator=g).float(), late])

def ranked(row, ids):  # larger value first, ties toward the smaller id (a stable sort)
    order = torch.sort(-row[ids], stable=True).indices
    return ids[order]

bad = []
for n, ks in ((300, (1, 17, 299, 300)), (4100, (1, 32, 200, 4099))):
    W = rows(n, n)
    x, b = torch.eye(W.shape[0]), torch.zeros(n)
    dead = torch.arange(0, n, 2)
    for k in ks:
        ka = min(k, dead.numel())
        vals, idx, dvals, didx = F.topk_encode_dead(x, W, b, None, k, dead, ka)
        for r in range(W.shape[0]):
            want = ranked(W[r], torch.arange(n))[:k]
            want_dead = ranked(W[r], dead)[:ka]
            if not (torch.equal(idx[r], want) and torch.equal(vals[r], W[r, want].relu())
                    and torch.equal(torch.sort(didx[r]).values, torch.sort(want_dead).values)
                    and torch.equal(dvals[r], W[r, didx[r]].relu())):
                bad.append((n, k, r))
print("bad", bad)
"""


@pytest.mark.parametrize("isa", ["native", "avx2", "baseline"])
def test_topk_encode_fp32_selection_matches_a_stable_sort_on_every_cpu_path(isa):
    """The fp32 selections (packed keys, cut by row_math's select_largest) against a stable
    sort, for k = 1, k = n and AuxK-sized k, on rows whose order stresses the cuts (see
    FP32_ROW_KINDS), on the CPU paths FASTSAE_CPU_ISA can cap to, each in a fresh process."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    if isa != "native":
        env["FASTSAE_CPU_ISA"] = isa
    out = subprocess.run([sys.executable, "-c", _SELECTION_CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "bad []", out.stdout


def test_batchtopk_encode_tie_with_a_smaller_id_later_in_the_stream():
    """BatchTopK's running top-(B·k) sees row 1's first tile before row 0's last one, so an
    entry tied with the bar but of a smaller flat id (b·n + j) can arrive after the bar was set:
    it must still win the tie. One thread: with more, the two tiles go to different workers."""
    n = 1200
    W = torch.zeros(2, n)
    W[0, n - 256:] = 1.0  # row 0: ones in its last latents (flat ids 944..1199)
    W[1, :256] = 1.0      # row 1: ones in its first latents (flat ids 1200..1455)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = cpp_ops.batchtopk_encode(x, W, torch.zeros(n), None, 2)  # keeps 3 * 2 = 6 entries
    finally:
        torch.set_num_threads(threads)
    assert torch.nonzero(got.to_dense()).tolist() == [[0, j] for j in range(n - 256, n - 250)]


@pytest.mark.parametrize("B,d,n,k", [(9, 7, 20, 3), (300, 17, 1300, 16), (3, 5, 1300, 40), (4, 3, 6, 9), (0, 3, 6, 2)])
def test_batchtopk_and_threshold_encode_match_reference(B, d, n, k):
    x, W, b, b_dec = rand(B, d, seed=0), rand(d, n, seed=1), rand(n, seed=2), rand(d, seed=3)
    got = cpp_ops.batchtopk_encode(x, W, b, b_dec, k)
    ref = reference.batchtopk_encode(x, W, b, b_dec, k)
    assert got.indices.dtype == torch.long and got.values.shape == ref.values.shape
    torch.testing.assert_close(got.to_dense(), ref.to_dense())
    for th in (torch.tensor(0.3, dtype=F64), rand(n, seed=4).abs(), torch.tensor(-0.5, dtype=F64)):
        got = cpp_ops.threshold_encode(x, W, b, None, th)
        torch.testing.assert_close(got.to_dense(), reference.threshold_encode(x, W, b, None, th).to_dense())


def test_threshold_encode_gradients_match_reference():
    x, W, b = rand(6, 4, seed=0), rand(4, 15, seed=1), rand(15, seed=2)
    for th in (torch.tensor(0.2, dtype=F64), torch.tensor(-0.3, dtype=F64)):  # < 0: reference fallback
        grads = []
        for fn in (cpp_ops.threshold_encode, reference.threshold_encode):
            Wg, bg = W.clone().requires_grad_(), b.clone().requires_grad_()
            acts = fn(x, Wg, bg, None, th)
            (acts.to_dense() * torch.arange(15, dtype=F64)).sum().backward()
            grads.append((Wg.grad, bg.grad))
        for a, r in zip(*grads):
            torch.testing.assert_close(a, r)


# ---------------------------------------------------------------- registration
def _opcheck(op, args):
    # test_aot_dispatch_dynamic compiles the op, which the data-dependent output size of
    # topk_sae_backward supports only through the fake kernel's dynamic size.
    torch.library.opcheck(op, args)


def test_opcheck_forward_ops_with_autograd():
    c = sparse_case(6, 5, 12, 3, "few_latents")
    W_enc = c["W_enc"].requires_grad_()
    W_dec = c["W_dec"].requires_grad_()
    b_enc = rand(12, seed=4).requires_grad_()
    b_dec = c["b_dec"].requires_grad_()
    x = c["x"].requires_grad_()
    _opcheck(F.topk_encode, (x, W_enc, b_enc, b_dec, 3))
    _opcheck(F.topk_encode, (x, W_enc, b_enc, None, 12))
    _opcheck(F.batchtopk_encode, (x, W_enc, b_enc, b_dec, 2))
    _opcheck(F.threshold_encode, (x, W_enc, b_enc, b_dec, torch.tensor(0.5, dtype=F64)))
    _opcheck(F.threshold_encode, (x, W_enc, b_enc, None, rand(12, seed=5).abs()))
    values = c["values"].requires_grad_()
    _opcheck(F.sparse_decode, (values, c["indices"], W_dec, b_dec))
    _opcheck(F.sparse_decode, (values, c["indices"], W_dec, None))


def test_opcheck_backward_ops():
    c = sparse_case(6, 5, 12, 3, "few_latents")
    _opcheck(F.sparse_decode_backward, (c["grad_out"], c["values"], c["indices"], c["W_dec"]))
    for b_dec in (c["b_dec"], None):
        for need_dx in (True, False):
            _opcheck(F.topk_encode_backward,
                     (c["values"] * 0.5, c["values"], c["indices"], c["x"], c["W_enc"], b_dec, need_dx))
        for row_sparse in (False, True):
            for need_dx in (True, False):
                _opcheck(F.topk_sae_backward, (c["x"], c["values"], c["indices"], c["grad_out"], c["W_enc"],
                                               c["W_dec"], b_dec, row_sparse, need_dx))


def test_torch_compile_traces_encode_decode_and_backward():
    sae = fastsae.TopKSAE(d_in=6, d_sae=16, k=3, dtype="float64", backend="cpp")
    x = rand(5, 6, seed=0)

    def step(W_enc, b_enc, W_dec, b_dec):
        vals, idx = F.topk_encode(x, W_enc, b_enc, b_dec, 3)
        return (F.sparse_decode(vals, idx, W_dec, b_dec) - x).pow(2).sum()

    params = [p.detach().clone().requires_grad_() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    eager = torch.autograd.grad(step(*params), params)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for a, b in zip(eager, torch.autograd.grad(compiled(*params), params)):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- whole SAEs through the cpp backend
@pytest.mark.parametrize("arch,apply_b_dec", [("topk", True), ("topk", False), ("batchtopk", True),
                                               ("standard", True), ("jumprelu", True)])
def test_gradcheck_whole_sae_through_cpp_backend(arch, apply_b_dec):
    torch.manual_seed(0)
    k = 3 if sae_class(arch).needs_k else None
    sae = fastsae.sae_class(arch)(d_in=5, d_sae=12, k=k, dtype="float64", backend="cpp",
                                  apply_b_dec_to_input=apply_b_dec)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        if arch == "jumprelu":
            sae.threshold.fill_(0.05)
    x = rand(4, 5, seed=1)
    names = ["W_enc", "b_enc", "W_dec", "b_dec"]  # the JumpReLU threshold has an STE, not a true gradient
    params = tuple(getattr(sae, n).detach().clone().requires_grad_() for n in names)

    def forward(*ps):
        return torch.func.functional_call(sae, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(forward, params, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_module_gradients_cpp_equal_reference(arch, apply_b_dec):
    torch.manual_seed(0)
    sae = fastsae.sae_class(arch)(d_in=10, d_sae=50, k=4, dtype="float64", backend="cpp",
                                  apply_b_dec_to_input=apply_b_dec)
    ref = fastsae.sae_class(arch)(sae.cfg.replace(backend="reference"))
    ref.load_state_dict(sae.state_dict())
    x = rand(3, 7, 10, seed=2)  # leading dims are flattened by the module
    for m in (sae, ref):
        m.training_forward(x).loss.backward()
    for (name, p), q in zip(sae.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_modules_pick_the_cpp_ops_on_cpu():
    sae = fastsae.TopKSAE(d_in=4, d_sae=8, k=2)
    assert sae.backend == "cpp"
    acts = sae.encode(torch.randn(3, 4))
    assert isinstance(acts, SparseActs) and acts.indices.dtype == torch.long
    assert fastsae.ops.get("topk_sae_backward", "cpp") is cpp_ops.topk_sae_backward


# ---------------------------------------------------------------- bad input: clear errors, no crash
def _bad_cases():
    c = sparse_case(4, 3, 6, 2)
    args = lambda **o: {**c, **o}  # noqa: E731
    yield "out of range", args(indices=c["indices"] + 6), "out of range"
    yield "negative index", args(indices=c["indices"] - 100), "out of range"
    yield "int32 indices", args(indices=c["indices"].int()), "int64"
    yield "dtype mix", args(values=c["values"].float()), "cast"
    yield "values/indices shapes", args(values=c["values"][:, :1]), "same shape"
    yield "grad rows", args(grad_out=c["grad_out"][:3]), "grad_out"
    yield "x width", args(x=c["x"][:, :2]), "x must have shape"
    yield "W_enc shape", args(W_enc=c["W_enc"][:, :5]), "W_enc"
    yield "b_dec shape", args(b_dec=c["b_dec"][:2]), "b_dec"
    yield "integer weights", args(W_dec=c["W_dec"].long()), "floating"


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[0])
def test_backward_bad_input_raises_clear_error(case):
    _, kwargs, message = case
    with pytest.raises(RuntimeError, match=message):
        cpp_ops.topk_sae_backward(**kwargs)


def test_forward_and_decode_bad_input_raise_clear_errors():
    x, W, b = rand(4, 3), rand(3, 6), rand(6)
    with pytest.raises(RuntimeError, match="k must lie"):
        F.topk_encode(x, W, b, None, 7)
    with pytest.raises(RuntimeError, match=r"x .*must have shape \[\*, 3\]"):
        F.topk_encode(rand(4, 2), W, b, None, 2)
    with pytest.raises(RuntimeError, match="b_enc"):
        F.topk_encode(x, W, rand(5), None, 2)
    with pytest.raises(RuntimeError, match="cast"):
        F.topk_encode(x.float(), W, b, None, 2)
    with pytest.raises(RuntimeError, match="threshold must be a scalar or have shape"):
        F.threshold_encode(x, W, b, None, rand(5))
    with pytest.raises(RuntimeError, match="k must be >= 0"):
        F.batchtopk_encode(x, W, b, None, -1)
    with pytest.raises(RuntimeError, match="b_dec"):
        F.batchtopk_encode(x, W, b, rand(4), 2)
    vals, idx = F.topk_encode(x, W, b, None, 2)
    with pytest.raises(RuntimeError, match="out of range"):
        F.sparse_decode_backward(x, vals, idx + 6, W.t().contiguous())
    with pytest.raises(RuntimeError, match="grad"):
        F.sparse_decode_backward(x[:2], vals, idx, W.t().contiguous())
    with pytest.raises(RuntimeError, match="dvalues"):
        F.topk_encode_backward(vals[:, :1], vals, idx, x, W, None, True)
