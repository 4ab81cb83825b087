"""Helpers the tests share: random SAE weights without top-k ties, the fp32 oracle of the
pre-activations, selection checks, and TopK-family backward cases. Test files import this
module (never each other)."""

import importlib
import os
from pathlib import Path

import pytest
import torch

from fastsae.ops import reference

REPO = Path(__file__).resolve().parent.parent  # the repository root


def require(module: str, extra: str):
    """Import `module` (a package an extra installs). Missing, the test file is skipped, except
    where FASTSAE_REQUIRE_EXTRAS=1 (make test, CI): there a missing extra is a failure."""
    if os.environ.get("FASTSAE_REQUIRE_EXTRAS") == "1":
        try:
            return importlib.import_module(module)
        except ImportError as e:
            pytest.fail(f"{module} is not importable ({e}); install the {extra!r} extra: "
                        f"pip install -e '.[{extra}]'", pytrace=False)
    return pytest.importorskip(module, reason=f"the {extra!r} extra (pip install -e '.[{extra}]') is not installed")

F64 = torch.float64
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
            want = set(ref.indices[r].tolist())
            assert set(got) == want, f"row {r}: {sorted(got)} vs {sorted(want)}"
        else:
            kth = ref.values[r, -1]
            tol = 2e-2 * float(pre[r].abs().max())
            assert float(pre[r, got].min()) >= float(kth) - tol, f"row {r}: picked a latent far below the k-th"


def sparse_case(B, d, n, k, kind="random", seed=0, dtype=F64):
    """Inputs of a TopK-family backward: post-ReLU values (some exact zeros) and indices."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":  # distinct latents within a row, like a real top-k
        idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)] or [torch.empty(0, k)]).long()
        idx = idx.reshape(B, k)
    elif kind == "few_latents":  # the same handful of latents repeated across rows
        idx = torch.randint(0, min(n, 3), (B, k), generator=g)
    elif kind == "one_latent_everywhere":  # latent n-1 is hit by every row
        idx = torch.stack([torch.randperm(n - 1, generator=g)[: k - 1] for _ in range(B)] or
                          [torch.empty(0, k - 1)]).long().reshape(B, k - 1)
        idx = torch.cat([idx, torch.full((B, 1), n - 1)], 1)
    vals = torch.randn(B, k, generator=g, dtype=dtype).relu()  # about half exact zeros
    return dict(
        x=torch.randn(B, d, generator=g, dtype=dtype),
        values=vals,
        indices=idx,
        grad_out=torch.randn(B, d, generator=g, dtype=dtype),
        W_enc=torch.randn(d, n, generator=g, dtype=dtype),
        W_dec=torch.randn(n, d, generator=g, dtype=dtype),
        b_dec=torch.randn(d, generator=g, dtype=dtype),
    )


KINDS = ["random", "few_latents", "one_latent_everywhere"]


def check_autograd_backward_ops(c):
    """sparse_decode_backward and topk_encode_backward on case c against the reference."""
    ref = reference.topk_sae_backward(**c)
    dvalues, dW_dec = torch.ops.fastsae.sparse_decode_backward(c["grad_out"], c["values"], c["indices"], c["W_dec"])
    torch.testing.assert_close(dvalues, ref["dvalues"])
    torch.testing.assert_close(dW_dec, ref["dW_dec"])
    dx, dW_enc, db_enc, db_dec = torch.ops.fastsae.topk_encode_backward(
        ref["dvalues"], c["values"], c["indices"], c["x"], c["W_enc"], c["b_dec"], True)
    torch.testing.assert_close(dx, ref["dx"])
    torch.testing.assert_close(dW_enc, ref["dW_enc"])
    torch.testing.assert_close(db_enc, ref["db_enc"])
    torch.testing.assert_close(db_dec, -ref["dx"].sum(0))  # the encoder's share of db_dec
    dx0, _, _, db_dec0 = torch.ops.fastsae.topk_encode_backward(
        ref["dvalues"], c["values"], c["indices"], c["x"], c["W_enc"], c["b_dec"], False)
    assert dx0.shape == (0, c["x"].shape[1])
    torch.testing.assert_close(db_dec0, db_dec)


# ---------------------------------------------------------------- tiny transformers models (no downloads)
TINY_TEXT = [
    "the cat sat on the mat",
    "a dog ran in the park and the cat watched",
    "sparse autoencoders find features",
    "the mat was red",
    "dogs and cats are friends in the park",
]


def tiny_tokenizer(texts=TINY_TEXT, mlm: bool = False):
    from fastsae.toy.tiny_lm import word_tokenizer

    return word_tokenizer(texts, mlm=mlm)


def tiny_lm(family: str, vocab_size: int, **kwargs):
    """fastsae.toy.tiny_lm.tiny_lm: 2 layers, d=32, 32 positions, random weights, eval mode."""
    from fastsae.toy.tiny_lm import tiny_lm as build

    return build(family, vocab_size, **kwargs)


class IdentitySAE(torch.nn.Module):
    """The SAE surface (encode, decode, forward, d_in, d_sae) with a perfect reconstruction:
    the latents are x itself (d_sae = d_in)."""

    def __init__(self, d_in: int, dtype=torch.float32):
        super().__init__()
        self.d_in = self.d_sae = d_in
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=dtype))  # gives the module a device and dtype
        self.device, self.dtype = self.anchor.device, dtype

    def encode(self, x):
        return x

    def decode(self, acts):
        return acts

    def forward(self, x):
        return x


def randomize_(module, seed=0, fan_in=None):
    """Random weights of every scale a trained SAE has (thresholds in [0, 0.5), matrices scaled
    by 1/sqrt(fan_in or their last dimension), vectors ~0.2), in place; returns the module."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / (fan_in or p.shape[-1]) ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def quiet_config(tmp, sae: dict, **kw):
    """A TrainConfig for tests: out_dir `tmp`, no progress bar, console, plot or periodic checkpoint."""
    from fastsae.config import TrainConfig

    base = dict(sae=sae, out_dir=str(tmp), progress=False, console=False, plot=False, checkpoint_every=0)
    return TrainConfig(**{**base, **kw})
