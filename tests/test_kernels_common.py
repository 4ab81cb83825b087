"""Shared helpers of the kernel tests (random tie-free SAE weights, the fp32 oracle, selection
checks) and tests of the helpers the kernels share."""

import torch

from fastsae.kernels import preact_tile

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def sae_weights(B, D, N, dtype=torch.float32, seed=0, bias_shift=0.0, noncontig=False):
    """x [B,D], W_enc [D,N], b_enc [N], b_dec [D], W_dec [N,D]: continuous random data (no
    ties). noncontig=True returns strided views (x a column slice, W_enc/W_dec transposes)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = r(B, D + 3)[:, 1:D + 1] if noncontig else r(B, D)
    W_enc = r(N, D).t() if noncontig else r(D, N)
    W_dec = r(D, N).t() if noncontig else r(N, D)
    b_enc, b_dec = r(N) + bias_shift, r(D)
    return tuple(t.to(dtype) for t in (x, W_enc, b_enc, b_dec, W_dec))


def oracle_pre(x, W_enc, b_enc, b_dec=None):
    """fp32 pre-activations from the stored values ((x - b_dec) rounded to x's dtype, as torch does)."""
    xin = (x - b_dec) if b_dec is not None else x
    return xin.float() @ W_enc.float() + b_enc.float()


def assert_topk_selection(pre, indices, k, exact=True):
    """indices [B,k] pick each row's top k of pre: the same sets (exact), or, for half
    precision, k distinct latents none of which ranks below the true k-th by more than the
    storage rounding (a near-tie may swap)."""
    assert indices.shape == (pre.shape[0], k)
    assert indices.dtype == torch.int64
    ref = pre.topk(k, dim=1)
    for r in range(pre.shape[0]):
        got = indices[r].tolist()
        assert len(set(got)) == k, f"row {r}: repeated latents {got}"
        if exact:
            assert set(got) == set(ref.indices[r].tolist()), f"row {r}: {sorted(got)} vs {sorted(ref.indices[r].tolist())}"
        else:
            kth = ref.values[r, -1]
            tol = 2e-2 * float(pre[r].abs().max())
            assert float(pre[r, got].min()) >= float(kth) - tol, f"row {r}: picked a latent far below the k-th"


def test_dot_precision_follows_interpreter_and_tf32_flag():
    # Under the interpreter there is no tf32: plain fp32 dots, so tests see exact fp32 math.
    if preact_tile.interpreted():
        assert preact_tile.dot_precision(torch.float32) == "ieee"
    assert preact_tile.dot_precision(torch.bfloat16) in ("tf32", "ieee")


def test_upcast_only_for_bf16_under_interpreter():
    assert not preact_tile.upcast(torch.float32)
    assert not preact_tile.upcast(torch.float16)
    assert preact_tile.upcast(torch.bfloat16) == preact_tile.interpreted()
