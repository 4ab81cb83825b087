"""Phase (b) of bench/gpu_check.sh: every kernel against the reference on the GPU (under
FASTSAE_GPU_CHECK_TINY=1: on CPU through the Triton interpreter at toy sizes).

Every autotune config forced once per dtype, odd batch sizes, k from 1 to 512, both encoder
strategies, non-contiguous input, no b_dec, d_in x d_sae past 2^31 elements, a record past
2^31 slots, the C++ CUDA backward in bf16 against the reference and bit for bit run to run,
and a whole training step of the default backend against the reference backend.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from bench.gpu import device, tiny
from fastsae import ops
from fastsae.kernels import fused_relu, sparse_decoder, topk_encoder
from fastsae.ops import reference

DEV = device()
TINY = tiny()
DTYPES = [torch.float32, torch.bfloat16] if TINY else [torch.float32, torch.bfloat16, torch.float16]
D, N = (20, 70) if TINY else (768, 8192)
ODD_B = (1, 33) if TINY else (1, 7, 33, 1000)
KS = (1, 5, 9) if TINY else (1, 7, 32, 128, 512)
full_only = pytest.mark.skipif(TINY, reason="needs GPU memory: run without --tiny")


def _weights(B, d, n, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    def r(*s):
        return torch.randn(*s, device=DEV, generator=g)
    x = r(B, d).to(dtype)
    W_enc = (r(d, n) / d**0.5).to(dtype)
    b_enc, b_dec = (0.1 * r(n)).to(dtype), (0.1 * r(d)).to(dtype)
    W_dec = (r(n, d) / d**0.5).to(dtype)
    return x, W_enc, b_enc, b_dec, W_dec


def _pre(x, W_enc, b_enc, b_dec=None):
    xin = x - b_dec if b_dec is not None else x
    return xin.float() @ W_enc.float() + b_enc.float()


def _assert_topk(pre, indices, k, dtype):
    """Every pick within rounding of the true k-th (exact sets up to near-ties)."""
    assert indices.shape == (pre.shape[0], k)
    ref = pre.topk(k, dim=1).values[:, -1]
    got = pre.gather(1, indices)
    scale = pre.abs().amax(1).clamp_min(1.0)
    tol = (1e-4 if dtype == torch.float32 else 2e-2) * scale
    assert bool((got.min(1).values >= ref - tol).all())
    assert bool((indices.sort(1).values.diff(dim=1) != 0).all()), "a latent picked twice"


@contextlib.contextmanager
def forced(tuner, i):
    """Autotuner `tuner` limited to its config i (and its cache emptied) inside the block."""
    configs, cache = tuner.configs, dict(tuner.cache)
    tuner.configs = [configs[i]]
    tuner.cache.clear()
    try:
        yield configs[i]
    finally:
        tuner.configs = configs
        tuner.cache.clear()
        tuner.cache.update(cache)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", range(len(topk_encoder._topk_partial_kernel.configs)))
def test_topk_every_config(cfg, dtype):
    x, W_enc, b_enc, b_dec, _ = _weights(ODD_B[-1], D, N, dtype)
    with forced(topk_encoder._topk_partial_kernel, cfg):
        for k in KS:
            _, idx = topk_encoder.topk_encode(x, W_enc, b_enc, b_dec, k)
            _assert_topk(_pre(x, W_enc, b_enc, b_dec), idx, k, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", range(len(fused_relu._fused_threshold_kernel.configs)))
def test_fused_relu_every_config(cfg, dtype):
    x, W_enc, b_enc, b_dec, W_dec = _weights(ODD_B[-1], min(D, 256), N // 4, dtype)
    with forced(fused_relu._fused_threshold_kernel, cfg):
        r = fused_relu.fused_threshold(x, W_enc, b_enc, b_dec, torch.zeros((), dtype=dtype, device=DEV),
                                       W_dec, b_dec, capacity=N // 4)
    ref = reference.relu_forward(x.float(), W_enc.float(), b_enc.float(), b_dec.float(), W_dec.float(),
                                 b_dec.float())
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(r.x_hat.float(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", range(len(sparse_decoder._sparse_decode_kernel.configs)))
def test_sparse_decode_every_config(cfg, dtype):
    x, _, _, b_dec, W_dec = _weights(ODD_B[-1], D, N, dtype)
    g = torch.Generator(device=DEV).manual_seed(1)
    vals = torch.randn(x.shape[0], KS[-1], device=DEV, generator=g).to(dtype)
    idx = torch.randint(0, N, vals.shape, device=DEV, generator=g)
    with forced(sparse_decoder._sparse_decode_kernel, cfg):
        out, sq = sparse_decoder.sparse_decode(vals, idx, W_dec, b_dec, x=x)
        _, sq2 = sparse_decoder.sparse_decode(vals, idx, W_dec, b_dec, x=x)
    ref = reference.sparse_decode(vals.float(), idx, W_dec.float(), b_dec.float())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    assert torch.equal(sq, sq2), "the squared error is not deterministic"


@pytest.mark.parametrize("strategy", topk_encoder.STRATEGIES)
@pytest.mark.parametrize("B", ODD_B)
@pytest.mark.parametrize("k", KS[::2] if TINY else KS)
def test_topk_odd_shapes_and_k(strategy, B, k):
    x, W_enc, b_enc, b_dec, _ = _weights(B, D + 3, N - 5, torch.bfloat16, seed=B + k)
    _, idx = topk_encoder.encode(x, W_enc, b_enc, b_dec, k, strategy=strategy)
    _assert_topk(_pre(x, W_enc, b_enc, b_dec), idx, k, torch.bfloat16)


@pytest.mark.parametrize("strategy", topk_encoder.STRATEGIES)
def test_noncontiguous_input_and_no_b_dec(strategy):
    x, W_enc, b_enc, _, _ = _weights(ODD_B[-1], D, N, torch.bfloat16)
    xs = torch.empty(x.shape[0], 2 * x.shape[1], device=DEV, dtype=x.dtype)[:, ::2]  # stride 2 along d
    xs.copy_(x)
    Wt = W_enc.t().contiguous().t()    # column-major W_enc
    assert not xs.is_contiguous() and not Wt.is_contiguous()
    _, idx = topk_encoder.encode(xs, Wt, b_enc, None, KS[1], strategy=strategy)
    _assert_topk(_pre(x, W_enc, b_enc), idx, KS[1], torch.bfloat16)


@full_only
@pytest.mark.parametrize("strategy", topk_encoder.STRATEGIES)
def test_index_space_past_2_31(strategy):
    """W_enc of d_in x d_sae > 2^31 elements (4096 x 2^19+64, 4 GiB in bf16)."""
    d, n = 4096, 2**19 + 64
    x, W_enc, b_enc, b_dec, _ = _weights(64, d, n, torch.bfloat16, seed=3)
    # every pre-activation sums over all d rows: offsets past 2^31 are read for every pick
    _, idx = topk_encoder.encode(x, W_enc, b_enc, b_dec, 8, strategy=strategy)
    _assert_topk(_pre(x, W_enc, b_enc, b_dec), idx, 8, torch.bfloat16)


@full_only
def test_record_past_2_31_slots():
    """fused_relu's record of 16384 rows x 2^17+1 slots (int64 offsets)."""
    B, d, n = 16384, 16, 2**17 + 1
    x = torch.ones(B, d, device=DEV, dtype=torch.bfloat16)
    W_enc = torch.full((d, n), 0.01, device=DEV, dtype=torch.bfloat16)
    b_enc = torch.zeros(n, device=DEV, dtype=torch.bfloat16)
    r = fused_relu.fused_threshold(x, W_enc, b_enc, None, torch.zeros((), device=DEV, dtype=torch.bfloat16),
                                   capacity=n)
    assert bool((r.l0 == n).all())
    assert int(r.indices[-1, -1]) == n - 1 and int(r.indices[-1, 0]) == 0


def _backward_case(B, d, n, k, dtype, seed=0):
    x, W_enc, b_enc, b_dec, W_dec = _weights(B, d, n, dtype, seed)
    vals, idx = topk_encoder.encode(x, W_enc, b_enc, b_dec, k)
    g = torch.Generator(device=DEV).manual_seed(seed + 1)
    grad = torch.randn(B, d, device=DEV, generator=g).to(dtype)
    return dict(x=x, values=vals, indices=idx, grad_out=grad, W_enc=W_enc, W_dec=W_dec, b_dec=b_dec)


@pytest.mark.parametrize("row_sparse", [False, True])
def test_default_backward_is_the_native_one_and_deterministic(row_sparse):
    """The default chain's topk_sae_backward on this device: the C++ op (CUDA where built),
    bf16, against the reference in fp32, and bit-identical over two runs."""
    assert ops.provider("topk_sae_backward", ops.resolve_backend("auto", DEV), DEV) == "cpp", \
        f"no native backward on {DEV.type}: {ops.load_errors()} (is fastsae._C built with CUDA?)"
    B, d, n, k = (33, D, N, 5) if TINY else (4096, 768, 2**15, 32)
    c = _backward_case(B, d, n, k, torch.bfloat16)
    bwd = ops.get("topk_sae_backward", ops.resolve_backend("auto", DEV), DEV)
    a = bwd(**c, row_sparse=row_sparse)
    b = bwd(**c, row_sparse=row_sparse)
    ref = reference.topk_sae_backward(**{k_: (v.float() if v.is_floating_point() else v) for k_, v in c.items()},
                                      row_sparse=row_sparse)
    for key in ("dvalues", "dx", "db_dec") + (() if row_sparse else ("dW_enc", "db_enc", "dW_dec")):
        assert torch.equal(a[key], b[key]), f"{key} differs between two runs"
        scale = float(ref[key].abs().max()) or 1.0
        torch.testing.assert_close(a[key].float(), ref[key], rtol=3e-2, atol=3e-2 * scale, msg=key)
    if row_sparse:
        for f in ("latents", "W_enc", "b_enc", "W_dec"):
            assert torch.equal(getattr(a["rows"], f), getattr(b["rows"], f)), f"rows.{f} differs between runs"
        torch.testing.assert_close(a["rows"].W_dec.float(), ref["rows"].W_dec, rtol=3e-2,
                                   atol=3e-2 * float(ref["rows"].W_dec.abs().max()))


def test_training_step_default_backend_against_reference():
    import fastsae

    torch.manual_seed(0)
    d, n, k = (20, 70, 5) if TINY else (768, 2**14, 32)
    sae = fastsae.TopKSAE(d_in=d, d_sae=n, k=k, device=str(DEV))
    ref = fastsae.TopKSAE(d_in=d, d_sae=n, k=k, device=str(DEV), backend="reference")
    ref.load_state_dict(sae.state_dict())
    x = torch.randn(ODD_B[-1], d, device=DEV)
    out, exp = sae.training_forward(x), ref.training_forward(x)
    out.loss.backward()
    exp.loss.backward()
    torch.testing.assert_close(out.loss, exp.loss, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(sae.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_implementation_table_names_the_cuda_path():
    table = ops.implementation_table()
    assert table["topk_encode"]["cuda"] == "triton"
    if DEV.type == "cuda":
        assert table["topk_sae_backward"]["cuda"] == "cpp", table
