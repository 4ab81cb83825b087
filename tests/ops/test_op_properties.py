"""Every op of every backend available on CPU against the reference, over the edge shapes
(1 row, 0 rows, 1 latent, k = 1, k = n, non-contiguous input) and dtypes: same results, same
gradients, no input (parameters included) changed, and no output sharing memory with an input.
Triton runs here under TRITON_INTERPRET=1 (tests/conftest.py); its kernels take fp32/bf16 and
route float64 to the reference."""

import pytest
import torch

import fastsae
from fastsae import ops
from fastsae.ops import reference as R
from fastsae.sparse import RowSparseGrads, SparseActs

pytestmark = pytest.mark.usefixtures("one_thread")

# (B, d, n, k, noncontig): the edges, then a few random shapes drawn once from a fixed seed
EDGES = [
    (5, 6, 12, 3, False),
    (1, 6, 12, 3, False),   # one row: expand().contiguous() of b_dec is b_dec itself
    (0, 6, 12, 3, False),   # an empty batch
    (4, 6, 1, 1, False),    # one latent
    (4, 6, 12, 1, False),   # k = 1
    (3, 6, 8, 8, False),    # k = n
    (4, 6, 12, 3, True),    # strided x, W_enc, W_dec
    (1, 5, 9, 2, True),
]
_g = torch.Generator().manual_seed(1234)
RANDOM = []
for _ in range(3):
    n = int(torch.randint(1, 40, (), generator=_g))
    RANDOM.append((int(torch.randint(0, 9, (), generator=_g)), int(torch.randint(1, 20, (), generator=_g)), n,
                   int(torch.randint(1, n + 1, (), generator=_g)), bool(torch.randint(0, 2, (), generator=_g))))
SHAPES = EDGES + RANDOM
SHAPE_IDS = [f"B{b}-d{d}-n{n}-k{k}{'-strided' if s else ''}" for b, d, n, k, s in SHAPES]


def cpu_backends(op):
    """The backends with an implementation of their own for `op` on CPU tensors."""
    return [b for b in ops.available_backends("cpu") if b != "reference" and ops.provider(op, b, "cpu") == b]


def weights(B, d, n, noncontig, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = r(B, d + 3)[:, 1:d + 1] if noncontig else r(B, d)
    W_enc = r(n, d).t() if noncontig else r(d, n)
    W_dec = r(d, n).t() if noncontig else r(n, d)
    b_enc, b_dec = r(n) * 0.3, r(d) * 0.3
    cast = lambda t: t.to(dtype) if not noncontig or t.is_contiguous() else t.to(dtype).t().contiguous().t()  # noqa: E731
    out = [x.to(dtype), cast(W_enc), b_enc.to(dtype), b_dec.to(dtype), cast(W_dec)]
    if noncontig:
        out[0] = r(B, d + 3).to(dtype)[:, 1:d + 1]
    return out


def selection(B, n, k, dtype, seed=0):
    """A TopK-like (values, indices): distinct latents per row, about a third exact zeros."""
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)]) if B else torch.zeros(0, k)
    vals = (torch.randn(B, k, generator=g, dtype=torch.float64) + 0.4).relu()
    return vals.to(dtype), idx.long().reshape(B, k)


# ------------------------------------------------------------------ output and input checks
def tensors_in(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from tensors_in(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from tensors_in(o)
    elif isinstance(obj, (SparseActs, RowSparseGrads)):
        yield from tensors_in(list(vars(obj).values()))
    elif hasattr(obj, "x_hat"):  # a fused forward's result
        yield from tensors_in([v for v in vars(obj).values() if isinstance(v, torch.Tensor)])


def span(t):
    """[first byte, last byte + 1) of the memory t can reach."""
    if t.numel() == 0:
        return None
    lo = hi = t.data_ptr()
    for size, stride in zip(t.shape, t.stride()):
        (lo, hi) = (lo, hi + (size - 1) * stride * t.element_size()) if stride >= 0 else \
            (lo + (size - 1) * stride * t.element_size(), hi)
    return lo, hi + t.element_size()


def assert_no_alias(result, inputs, what):
    spans = [(name, span(t)) for name, t in inputs.items() if isinstance(t, torch.Tensor)]
    for out in tensors_in(result):
        s = span(out)
        for name, si in spans:
            if s is not None and si is not None:
                assert s[1] <= si[0] or si[1] <= s[0], f"{what}: an output shares memory with input {name}"


class Unchanged:
    """Snapshot tensors; .check() asserts none was written (values and dtype)."""

    def __init__(self, **tensors):
        self.saved = {k: (t, t.detach().clone()) for k, t in tensors.items() if isinstance(t, torch.Tensor)}

    def check(self, what):
        for name, (t, copy) in self.saved.items():
            assert torch.equal(t.detach(), copy), f"{what} changed its input {name}"


def call(op, backend, *args, **kw):
    """Run op on backend, checking that no tensor argument changed and no output aliases one."""
    names = [f"arg{i}" for i in range(len(args))]
    inputs = dict(zip(names, args), **kw)
    guard = Unchanged(**inputs)
    out = ops.get(op, backend)(*args, **kw)
    guard.check(f"{op}[{backend}]")
    assert_no_alias(out, inputs, f"{op}[{backend}]")
    return out


def tol(dtype):
    return dict(float32=dict(rtol=1e-4, atol=1e-4), float64=dict(rtol=1e-9, atol=1e-9),
                bfloat16=dict(rtol=5e-2, atol=8e-2))[str(dtype).removeprefix("torch.")]


def dense(res, n):
    if isinstance(res, SparseActs):
        return res.to_dense()
    if isinstance(res, tuple):
        return SparseActs(res[0], res[1], n).to_dense()
    return res


def leaves(ts, dtype_ok=True):
    return [t.detach().clone().requires_grad_(dtype_ok) if isinstance(t, torch.Tensor) else t for t in ts]


def grads_of(fn, args, n, seed=5):
    """Gradients of <R, dense(fn(*args))> w.r.t. the tensor args, R a fixed random tensor."""
    args = leaves(args)
    out = dense(fn(*args), n)
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    (out * proj).sum().backward()
    return [a.grad if isinstance(a, torch.Tensor) else None for a in args]


def compare_grads(got, want, dtype, what):
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        torch.testing.assert_close(a, b, **tol(dtype), msg=lambda m, i=i: f"{what}: gradient {i}: {m}")


def compare_encode_grads(op, backend, args, last, n, dtype):
    """An encode's gradients w.r.t. x and the weights on `backend` against the reference's."""
    compare_grads(grads_of(lambda *a: ops.get(op, backend)(*a, last), args, n),
                  grads_of(lambda *a: getattr(R, op)(*a, last), args, n), dtype, f"{op}[{backend}]")


# ------------------------------------------------------------------ cases
def cases(op):
    """(backend, shape, dtype) params: every CPU backend of op. The reference is run too, for the
    input and aliasing checks (it is the fallback users run). The interpreter is slow: triton
    gets the edges in fp32 and three of them in bf16."""
    out = []
    for backend in ["reference", *cpu_backends(op)]:
        if backend == "reference":
            combos = [(s, i, torch.float32) for s, i in zip(SHAPES, SHAPE_IDS)]
        elif backend == "triton":
            combos = [(s, i, torch.float32) for s, i in zip(EDGES, SHAPE_IDS)]
            combos += [(s, i, torch.bfloat16) for s, i in zip(EDGES[:3], SHAPE_IDS)]
        else:
            combos = [(s, i, dt) for s, i in zip(SHAPES, SHAPE_IDS)
                      for dt in (torch.float32, torch.float64, torch.bfloat16)]
        out += [pytest.param(backend, s, dt, id=f"{backend}-{i}-{str(dt)[6:]}") for s, i, dt in combos]
    return out


def _encode_args(shape, dtype, with_b_dec=True):
    B, d, n, k, nc = shape
    x, W_enc, b_enc, b_dec, W_dec = weights(B, d, n, nc, dtype)
    return x, W_enc, b_enc, (b_dec if with_b_dec else None), W_dec, n, k


@pytest.mark.parametrize("backend,shape,dtype", cases("topk_encode"))
def test_topk_encode(backend, shape, dtype):
    x, W_enc, b_enc, b_dec, _, n, k = _encode_args(shape, dtype)
    values, indices = call("topk_encode", backend, x, W_enc, b_enc, b_dec, k)
    rv, ri = R.topk_encode(x, W_enc, b_enc, b_dec, k)
    assert values.shape == indices.shape == (x.shape[0], k) and indices.dtype == torch.int64
    if dtype == torch.bfloat16:  # near-ties may swap latents: compare the sorted kept values
        torch.testing.assert_close(values.sort(-1).values, rv.sort(-1).values, **tol(dtype))
        return
    assert torch.equal(indices.sort(-1).values, ri.sort(-1).values)
    torch.testing.assert_close(dense((values, indices), n), dense((rv, ri), n), **tol(dtype))
    compare_encode_grads("topk_encode", backend, (x, W_enc, b_enc, b_dec), k, n, dtype)


@pytest.mark.parametrize("backend,shape,dtype", cases("topk_encode_dead"))
def test_topk_encode_dead(backend, shape, dtype):
    """topk_encode's selection, and AuxK's among the dead ids, from one pass: no dead latent,
    a few, all of them; k_aux below, at and above their number."""
    x, W_enc, b_enc, b_dec, _, n, k = _encode_args(shape, dtype)
    g = torch.Generator().manual_seed(n)
    some = torch.randperm(n, generator=g)[: max(1, n // 3)].sort().values
    for dead in (torch.zeros(0, dtype=torch.long), some, torch.arange(n)):
        for k_aux in (0, 1, dead.numel(), dead.numel() + 2):
            values, indices, dv, di = call("topk_encode_dead", backend, x, W_enc, b_enc, b_dec, k, dead, k_aux)
            rv, ri = R.topk_encode(x, W_enc, b_enc, b_dec, k)
            _, _, rdv, rdi = R.topk_encode_dead(x, W_enc, b_enc, b_dec, k, dead, k_aux)
            ka = min(k_aux, dead.numel())
            assert dv.shape == di.shape == (x.shape[0], ka) and di.dtype == torch.int64
            if dtype == torch.bfloat16:  # near-ties may swap latents: compare the sorted kept values
                torch.testing.assert_close(values.sort(-1).values, rv.sort(-1).values, **tol(dtype))
                torch.testing.assert_close(dv.sort(-1).values, rdv.sort(-1).values, **tol(dtype))
                continue
            assert torch.equal(indices.sort(-1).values, ri.sort(-1).values)
            torch.testing.assert_close(dense((values, indices), n), dense((rv, ri), n), **tol(dtype))
            assert torch.equal(di.sort(-1).values, rdi.sort(-1).values), (dead, k_aux)
            assert bool(torch.isin(di, dead).all())
            torch.testing.assert_close(dense((dv, di), n), dense((rdv, rdi), n), **tol(dtype))


def test_topk_encode_dead_refuses_unsorted_or_out_of_range_ids():
    if "cpp" not in cpu_backends("topk_encode_dead"):
        pytest.skip("the C++ extension is not built")
    x, W_enc, b_enc, _, _ = weights(4, 6, 12, False, torch.float32)
    for dead in (torch.tensor([3, 1]), torch.tensor([2, 2]), torch.tensor([12]), torch.tensor([-1])):
        with pytest.raises(RuntimeError, match="ascending, unique latent ids"):
            torch.ops.fastsae.topk_encode_dead(x, W_enc, b_enc, None, 2, dead, 2)


@pytest.mark.parametrize("backend,shape,dtype", cases("batchtopk_encode"))
def test_batchtopk_encode(backend, shape, dtype):
    x, W_enc, b_enc, b_dec, _, n, k = _encode_args(shape, dtype)
    got = call("batchtopk_encode", backend, x, W_enc, b_enc, b_dec, k)
    ref = R.batchtopk_encode(x, W_enc, b_enc, b_dec, k)
    assert isinstance(got, SparseActs) and got.values.shape[0] == x.shape[0] and got.d_sae == n
    if dtype == torch.bfloat16:  # a near-tie at the batch's cut may move an entry: compare the kept values
        a, b = got.values[got.values > 0].sort().values, ref.values[ref.values > 0].sort().values
        m = min(a.numel(), b.numel())
        assert abs(a.numel() - b.numel()) <= 1
        torch.testing.assert_close(a[a.numel() - m:], b[b.numel() - m:], **tol(dtype))
        return
    torch.testing.assert_close(got.to_dense(), ref.to_dense(), **tol(dtype))
    compare_encode_grads("batchtopk_encode", backend, (x, W_enc, b_enc, b_dec), k, n, dtype)


@pytest.mark.parametrize("backend,shape,dtype", cases("threshold_encode"))
def test_threshold_encode(backend, shape, dtype):
    x, W_enc, b_enc, b_dec, _, n, _ = _encode_args(shape, dtype)
    # bf16: threshold 0, so an entry that rounds across it is ~0 either way
    th = torch.zeros((), dtype=dtype) if dtype == torch.bfloat16 else torch.linspace(0.05, 0.4, n, dtype=dtype)
    got = call("threshold_encode", backend, x, W_enc, b_enc, b_dec, th)
    ref = R.threshold_encode(x, W_enc, b_enc, b_dec, th)
    torch.testing.assert_close(got.to_dense(), ref.to_dense(), **tol(dtype))
    if dtype != torch.bfloat16:
        compare_encode_grads("threshold_encode", backend, (x, W_enc, b_enc, b_dec), th, n, dtype)


@pytest.mark.parametrize("with_b_dec", [True, False], ids=["b_dec", "no_b_dec"])
@pytest.mark.parametrize("backend,shape,dtype", cases("sparse_decode"))
def test_sparse_decode(backend, shape, dtype, with_b_dec):
    B, d, n, k, _ = shape
    _, _, _, b_dec, W_dec, _, _ = _encode_args(shape, dtype)
    b_dec = b_dec if with_b_dec else None
    values, indices = selection(B, n, k, dtype)
    got = call("sparse_decode", backend, values, indices, W_dec, b_dec)
    assert got.shape == (B, d) and got.dtype == dtype
    torch.testing.assert_close(got, R.sparse_decode(values, indices, W_dec, b_dec), **tol(dtype))
    if dtype == torch.bfloat16:
        return
    fn = ops.get("sparse_decode", backend)
    got_g = grads_of(lambda v, W, b: fn(v, indices, W, b), (values, W_dec, b_dec), n)
    want_g = grads_of(lambda v, W, b: R.sparse_decode(v, indices, W, b), (values, W_dec, b_dec), n)
    compare_grads(got_g, want_g, dtype, f"sparse_decode[{backend}]")


DENSE_OPS = ("relu_encode", "jumprelu_encode", "dense_decode", "relu_forward", "jumprelu_forward")


def dense_op_args(op, shape, dtype):
    x, W_enc, b_enc, b_dec, W_dec, n, _ = _encode_args(shape, dtype)
    th = torch.linspace(0.05, 0.4, n, dtype=dtype)
    return {"relu_encode": (x, W_enc, b_enc, b_dec),
            "jumprelu_encode": (x, W_enc, b_enc, b_dec, th, 1e-3),
            "dense_decode": (R.relu_encode(x, W_enc, b_enc, b_dec), W_dec, b_dec),
            "relu_forward": (x, W_enc, b_enc, b_dec, W_dec, b_dec),
            "jumprelu_forward": (x, W_enc, b_enc, b_dec, th, W_dec, b_dec)}[op]


@pytest.mark.parametrize("op,backend,shape,dtype", [pytest.param(op, *p.values, id=f"{op}-{p.id}")
                                                    for op in DENSE_OPS for p in cases(op)])
def test_dense_ops(op, backend, shape, dtype):
    args = dense_op_args(op, shape, dtype)
    got = call(op, backend, *args)
    torch.testing.assert_close(got, getattr(R, op)(*args), **tol(dtype))


@pytest.mark.parametrize("need_dx", [True, False], ids=["dx", "no_dx"])
@pytest.mark.parametrize("row_sparse", [False, True], ids=["dense", "row_sparse"])
@pytest.mark.parametrize("backend,shape,dtype", cases("topk_sae_backward"))
def test_topk_sae_backward(backend, shape, dtype, row_sparse, need_dx):
    B, d, n, k, _ = shape
    x, W_enc, _, b_dec, W_dec, _, _ = _encode_args(shape, dtype)
    values, indices = selection(B, n, k, dtype)
    grad_out = torch.randn(B, d, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype)
    for bd in (b_dec, None):
        args = (x, values, indices, grad_out, W_enc, W_dec, bd)
        got = call("topk_sae_backward", backend, *args, row_sparse=row_sparse, need_dx=need_dx)
        want = R.topk_sae_backward(*args, row_sparse=row_sparse)  # with dx: the same db_dec either way
        assert set(got) == set(want)
        for key in want:
            a, b = got[key], want[key]
            if key == "dx" and not need_dx:
                assert a is None
                continue
            if isinstance(b, RowSparseGrads):
                assert torch.equal(a.latents, b.latents)
                a, b = a.to_dense(), b.to_dense()
            torch.testing.assert_close(a, b, **tol(dtype), msg=lambda m, key=key: f"{key}: {m}")


# ------------------------------------------------------------------ the native backward ops, directly
def test_every_op_is_covered():
    tested = {"topk_encode", "topk_encode_dead", "batchtopk_encode", "threshold_encode", "sparse_decode",
              "topk_sae_backward", *DENSE_OPS}
    assert tested == set(ops.OPS), f"ops without a property test: {sorted(set(ops.OPS) - tested)}"


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_native_backward_ops_leave_inputs_alone(shape):
    if "cpp" not in cpu_backends("sparse_decode"):
        pytest.skip("the C++ extension is not built")
    B, d, n, k, _ = shape
    x, W_enc, _, b_dec, W_dec, _, _ = _encode_args(shape, torch.float64)
    values, indices = selection(B, n, k, torch.float64)
    grad = torch.randn(B, d, dtype=torch.float64)
    dvalues = torch.randn(B, k, dtype=torch.float64)
    want = R.topk_sae_backward(x, values, indices, grad, W_enc, W_dec, b_dec)
    for name, args in (("sparse_decode_backward", (grad, values, indices, W_dec)),
                       ("topk_encode_backward", (dvalues, values, indices, x, W_enc, b_dec, True))):
        inputs = {f"arg{i}": a for i, a in enumerate(args)}
        guard = Unchanged(**inputs)
        out = getattr(torch.ops.fastsae, name)(*args)
        guard.check(name)
        assert_no_alias(out, inputs, name)
        if name == "sparse_decode_backward":
            torch.testing.assert_close(out[0], want["dvalues"])
            torch.testing.assert_close(out[1], want["dW_dec"])


# ------------------------------------------------------------------ the reported symptom, end to end
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_one_row_forward_leaves_the_module_alone(arch):
    for backend in ["reference", *cpu_backends("sparse_decode")]:
        torch.manual_seed(0)
        sae = fastsae.sae_class(arch)(d_in=8, d_sae=16, k=2, backend=backend)
        with torch.no_grad():
            sae.b_dec.normal_()
        before = {k: v.clone() for k, v in sae.state_dict().items()}
        x = torch.randn(8)
        with torch.no_grad():
            outs = [sae(x) for _ in range(3)]
        assert all(torch.equal(o, outs[0]) for o in outs), backend
        for name, t in sae.state_dict().items():
            assert torch.equal(t, before[name]), f"{backend}: {name} changed"


def test_batchtopk_zero_rows_gives_empty_results():
    for backend in ["reference", *cpu_backends("batchtopk_encode")]:
        sae = fastsae.BatchTopKSAE(d_in=6, d_sae=12, k=3, backend=backend)
        acts = sae.encode(torch.zeros(0, 6))
        assert acts.values.shape[0] == 0 and acts.indices.shape == acts.values.shape, backend
        assert sae(torch.zeros(0, 6)).shape == (0, 6), backend
