"""Every SAE module against the plain-PyTorch formulas, on every backend this machine has."""

import pytest
import torch

import fastsae
from fastsae import SAEConfig, SparseActs, ops
from fastsae.sae import sae_class

D, N, K = 12, 40, 4
ARCHS = ["standard", "topk", "batchtopk", "jumprelu"]
CPU_BACKENDS = ops.available_backends("cpu")


def make(arch, seed=0, dtype="float64", backend="reference", **kw):
    torch.manual_seed(seed)
    k = K if sae_class(arch).needs_k else None
    sae = fastsae.sae_class(arch)(d_in=D, d_sae=N, k=k, dtype=dtype, backend=backend, **kw)
    with torch.no_grad():  # non-trivial biases so every term of the formula matters
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        if arch == "jumprelu":
            sae.threshold.uniform_(0.05, 0.3)
    return sae


def manual_pre(sae, x):
    xin = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    return xin @ sae.W_enc + sae.b_enc


def manual_acts(sae, x):
    pre = manual_pre(sae, x)
    arch = sae.cfg.architecture
    if arch == "standard":
        return pre.relu()
    if arch == "jumprelu":
        return pre * (pre > sae.threshold)
    if arch == "topk":
        top = pre.topk(K, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    relu = pre.relu()  # batchtopk in training: the B*K largest over the batch
    cut = relu.flatten().topk(K * x.shape[0]).values.min()
    return relu * (relu >= cut)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_encode_decode_forward_match_formulas(arch, backend, apply_b_dec):
    sae = make(arch, backend=backend, apply_b_dec_to_input=apply_b_dec)
    x = torch.randn(9, D, dtype=torch.float64)
    with torch.no_grad():
        expected = manual_acts(sae, x)
        out = sae.training_forward(x)
        acts = out.acts
        dense = acts.to_dense() if isinstance(acts, SparseActs) else acts
        torch.testing.assert_close(dense, expected)
        torch.testing.assert_close(out.x_hat, expected @ sae.W_dec + sae.b_dec)
        if arch != "batchtopk":  # batchtopk's inference path is the threshold (tested below)
            torch.testing.assert_close(sae(x), expected @ sae.W_dec + sae.b_dec)
            torch.testing.assert_close(sae.decode(sae.encode(x)), sae(x))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("x_grad", [False, True], ids=["x_const", "x_grad"])
def test_training_gradients_match_the_formulas(arch, backend, x_grad):
    """The loss's gradients for every parameter (and x when it asks for one): the encode op
    takes b_dec itself, so b_dec's gradient through the encoder comes from the op's backward
    (W_enc @ db_enc without dx, or with dx when x needs it) instead of autograd's subtraction."""
    sae = make(arch, backend=backend)
    x = torch.randn(9, D, dtype=torch.float64, requires_grad=x_grad)
    sae.training_forward(x).loss.backward()
    got = [p.grad for p in sae.parameters()] + ([x.grad] if x_grad else [])
    sae.zero_grad()
    x.grad = None
    mask = (manual_acts(sae, x) != 0).detach()  # the selection, then differentiate the formula
    acts = manual_pre(sae, x) * mask
    ((acts @ sae.W_dec + sae.b_dec - x) ** 2).sum(-1).mean().backward()
    want = [p.grad for p in sae.parameters()] + ([x.grad] if x_grad else [])
    for (name, _), a, b in zip(list(sae.named_parameters()) + [("x", None)], got, want):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("arch", ARCHS)
def test_leading_dims_and_dense_option(arch):
    sae = make(arch)
    x = torch.randn(2, 3, D, dtype=torch.float64)
    acts = sae.encode(x)
    if sae_class(arch).needs_k:
        assert isinstance(acts, SparseActs)
        assert acts.shape == (2, 3, N)
        dense = sae.encode(x, dense=True)
        assert dense.shape == (2, 3, N)
        torch.testing.assert_close(dense, acts.to_dense())
    else:
        assert acts.shape == (2, 3, N)
    assert sae(x).shape == x.shape
    flat = sae(x.reshape(6, D)).reshape(2, 3, D)
    if arch != "batchtopk":  # batch selection depends on the batch, not its shape
        torch.testing.assert_close(sae(x), flat)


def test_topk_encode_is_small_sparse_result():
    sae = make("topk")
    acts = sae.encode(torch.randn(5, D, dtype=torch.float64))
    assert acts.values.shape == (5, K) and acts.indices.dtype == torch.long


@pytest.mark.parametrize("arch", ARCHS)
def test_training_forward_terms(arch):
    sae = make(arch)
    x = torch.randn(16, D, dtype=torch.float64)
    out = sae.training_forward(x)
    err = out.x_hat - x
    torch.testing.assert_close(out.mse, err.pow(2).sum(-1).mean().float())
    fvu = err.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.fvu, fvu.float())
    dense = out.acts.to_dense() if isinstance(out.acts, SparseActs) else out.acts
    torch.testing.assert_close(out.l0, (dense != 0).sum(-1).double().mean().float())
    if arch == "standard":
        l1 = (dense.abs() * sae.W_dec.norm(dim=1)).sum(-1).mean()
        torch.testing.assert_close(out.sparsity, (sae.cfg.l1_coefficient * l1).float())
    elif arch == "jumprelu":
        torch.testing.assert_close(out.sparsity, (sae.cfg.l0_coefficient * out.l0).float())
    else:
        assert float(out.sparsity) == 0.0
    torch.testing.assert_close(out.loss, out.mse + out.sparsity)
    out.loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sae.W_enc.grad.abs().sum() > 0


def test_jumprelu_threshold_gets_gradient_from_l0():
    sae = make("jumprelu", jumprelu_bandwidth=0.5)
    sae.training_forward(torch.randn(32, D, dtype=torch.float64)).loss.backward()
    assert sae.threshold.grad.abs().sum() > 0


def test_batchtopk_learns_threshold_and_uses_it_at_inference():
    sae = make("batchtopk")
    assert float(sae.threshold) < 0  # not learned yet
    x = torch.randn(32, D, dtype=torch.float64)
    out = sae.training_forward(x)
    smallest = out.acts.values[out.acts.values > 0].min()
    torch.testing.assert_close(sae.threshold, smallest.float())
    sae.eval()
    with torch.no_grad():
        pre = manual_pre(sae, x)
        expected = pre * (pre > sae.threshold.double())
        torch.testing.assert_close(sae.encode(x).to_dense(), expected)
    # the EMA moves toward later batches' smallest kept value
    sae.train()
    before = float(sae.threshold)
    sae.training_forward(x * 3)
    assert float(sae.threshold) != before


def test_construct_from_config_and_keywords_agree():
    cfg = SAEConfig(d_in=D, d_sae=N, architecture="topk", k=K)
    a = fastsae.TopKSAE(cfg)
    b = fastsae.TopKSAE(d_in=D, d_sae=N, k=K)
    assert a.cfg == b.cfg
    assert fastsae.build_sae(cfg).__class__ is fastsae.TopKSAE
    assert a.W_enc.shape == (D, N) and a.W_dec.shape == (N, D)
    assert a.b_enc.shape == (N,) and a.b_dec.shape == (D,)
    torch.testing.assert_close(a.W_dec.norm(dim=1), torch.ones(N))  # unit-norm rows
    torch.testing.assert_close(a.W_enc, a.W_dec.t() * 3 ** -0.5)  # tied init, TopK's encoder scale
    relu = fastsae.StandardSAE(d_in=D, d_sae=N)
    torch.testing.assert_close(relu.W_enc, relu.W_dec.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_modules_run_and_track_fp64(dtype):
    ref = make("topk", dtype="float64")
    low = fastsae.TopKSAE(ref.cfg.replace(dtype=str(dtype).removeprefix("torch."), backend="auto"))
    low.load_state_dict({k: v.to(dtype) for k, v in ref.state_dict().items()})
    x = torch.randn(8, D, dtype=torch.float64)
    y = low(x.to(dtype))
    assert y.dtype == dtype
    tol = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 2e-2}[dtype]
    torch.testing.assert_close(y.double(), ref(x).detach(), atol=tol * 10, rtol=tol)


def test_backend_switch_env(monkeypatch):
    sae = fastsae.TopKSAE(d_in=D, d_sae=N, k=K)
    monkeypatch.setenv("FASTSAE_BACKEND", "reference")
    assert sae.backend == "reference"
    monkeypatch.delenv("FASTSAE_BACKEND")
    assert sae.backend == ops.resolve_backend("auto", "cpu")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_no_grad_forward_takes_the_fused_path_and_matches(arch, backend, dtype):
    sae = make(arch, backend=backend, dtype=dtype)
    x = torch.randn(9, D, dtype=sae.dtype)
    with torch.no_grad():
        expected = manual_acts(sae, x) @ sae.W_dec + sae.b_dec
        fused = sae(x)  # no grad needed: relu_forward / jumprelu_forward op
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == "float32" else {}
    torch.testing.assert_close(fused, expected, **tol)
    torch.testing.assert_close(sae(x).detach(), expected, **tol)  # grad path: encode + decode


@pytest.mark.parametrize("arch", ["standard", "topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("norm", ["none", "layer_norm", "constant_norm_rescale"])
def test_encode_decode_is_encode_and_forward_in_one(arch, norm):
    torch.manual_seed(0)
    sae = fastsae.sae_class(arch)(d_in=D, d_sae=N, normalize_activations=norm,
                                  **({"k": K} if fastsae.sae_class(arch).needs_k else {})).eval()
    x = torch.randn(3, 5, D) * 2 + 1
    with torch.no_grad():
        acts, x_hat = sae.encode_decode(x)
        want = sae.encode(x)
        torch.testing.assert_close(x_hat, sae(x))
    dense = acts.to_dense() if isinstance(acts, fastsae.SparseActs) else acts
    torch.testing.assert_close(dense, want.to_dense() if isinstance(want, fastsae.SparseActs) else want)
    assert x_hat.shape == x.shape and dense.shape == (3, 5, N)


@pytest.mark.parametrize("rows", [0, 1, 5])
@pytest.mark.parametrize("strided", [False, True])
def test_reconstruction_terms_and_sparse_loss_match_the_plain_formulas(rows, strided):
    """The step's sums (one BLAS dot each) against squared copies summed in fp64; the inputs,
    strided ones included, are left as they were."""
    from fastsae.sae import reconstruction_terms

    g = torch.Generator().manual_seed(rows)
    x_hat, x = torch.randn(rows, 14, generator=g), torch.randn(rows, 14, generator=g) + 3.0
    if strided:
        x_hat, x = x_hat[:, ::2], x[:, ::2]
    kept = (x_hat.clone(), x.clone())
    err, mse, fvu = reconstruction_terms(x_hat, x)
    e64 = x_hat.double() - x.double()
    n = max(rows, 1)
    fp32 = dict(rtol=1e-5, atol=1e-6)  # fp32 results against fp64 sums
    torch.testing.assert_close(err, e64.float())
    torch.testing.assert_close(mse.double(), e64.pow(2).sum() / n, **fp32)
    if rows > 1:
        var = (x.double() - x.double().mean(0)).pow(2).sum()
        torch.testing.assert_close(fvu.double(), e64.pow(2).sum() / var, **fp32)
    else:  # no spread to explain
        assert torch.isnan(fvu)
    sae = fastsae.TopKSAE(SAEConfig(d_in=x.shape[1], d_sae=4, architecture="topk", k=1))
    loss, grad_out = sae.sparse_loss(None, x_hat, x)
    torch.testing.assert_close(loss.double(), e64.pow(2).sum() / n, **fp32)
    torch.testing.assert_close(grad_out.double(), 2.0 / n * e64, **fp32)
    assert torch.equal(x_hat, kept[0]) and torch.equal(x, kept[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rows", [0, 1, 6])
@pytest.mark.parametrize("n,k", [(1, 1), (N, K), (N, N)])
def test_decode_selection_adds_b_dec_and_its_gradient(backend, rows, n, k):
    # an unsharded module hands b_dec to the decode op: the formula, b_dec's gradient through
    # the op, and nothing it reads changed, at 0 and 1 rows, 1 latent and k = n
    torch.manual_seed(rows * 100 + n)
    sae = fastsae.TopKSAE(d_in=D, d_sae=n, k=k, dtype="float64", backend=backend)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.5)
    x = torch.randn(rows, D, dtype=torch.float64)
    with torch.no_grad():
        sel = sae.select(x)
    saved = [t.detach().clone() for t in (x, sel.values, sel.indices, *sae.parameters())]
    x_hat = sae.decode_selection(sel)
    dense = sel.acts.to_dense()
    torch.testing.assert_close(x_hat, dense @ sae.W_dec + sae.b_dec)
    upstream = torch.randn(rows, D, dtype=torch.float64)
    (x_hat * upstream).sum().backward()
    torch.testing.assert_close(sae.b_dec.grad, upstream.sum(0))
    torch.testing.assert_close(sae.W_dec.grad, dense.t() @ upstream)
    for before, after in zip(saved, (x, sel.values, sel.indices, *sae.parameters())):
        assert torch.equal(before, after.detach())
