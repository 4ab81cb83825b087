"""A latent-sharded (and data-parallel) step equals the single-process step.

Ranks run on CPU with gloo (fastsae.distributed.launch). Each launch runs every case and
returns its tensors; the parent compares them with the single-process SAE built from the
same seed. Tolerances: float64 1e-10 absolute (the sums run in a different order, nothing
else differs), float32 2e-5 (after 3 Adam steps).
"""

from __future__ import annotations

import pytest
import torch

import fastsae
from fastsae.distributed import (
    ShardedSAE,
    broadcast_parameters,
    build_layout,
    launch,
    reduce_gradients,
    reduce_row_sparse,
)
from fastsae.ops import reference
from fastsae.sae import latent_slice, sae_class
from fastsae.sparse import SparseActs

ARCHS = ("topk", "batchtopk", "standard", "jumprelu", "gated", "matryoshka_batchtopk")
TOL = {"float64": 1e-10, "float32": 2e-5}
STEPS = 3


def make_case(arch: str, dtype: str = "float64", d_sae: int = 22, k: int = 4, seed: int = 0):
    """A small SAE with non-zero biases and its batches (continuous data: no top-k ties)."""
    torch.manual_seed(seed)
    kw = dict(d_in=8, d_sae=d_sae, architecture=arch, dtype=dtype, l1_coefficient=0.1, l0_coefficient=0.1,
              jumprelu_init_threshold=0.05, jumprelu_bandwidth=0.1)
    if sae_class(arch).needs_k:
        kw["k"] = k
    if arch == "matryoshka_batchtopk":
        kw["matryoshka_widths"] = [5, 12, d_sae]
    sae = fastsae.build_sae(fastsae.SAEConfig(**kw))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        if arch == "gated":
            sae.r_mag.normal_(0, 0.1)
            sae.b_mag.normal_(0, 0.1)
    batches = [torch.randn(8, 8, dtype=sae.dtype) for _ in range(STEPS)]
    return sae, batches


def _train(model, batches, rows=slice(None)):
    """STEPS Adam steps; the first step's loss, gradients and the final state."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    layout = model.context
    first = None
    for x in batches:
        opt.zero_grad()
        out = model.training_forward(x[rows])
        out.loss.backward()
        if layout is not None:
            reduce_gradients(model, layout)
        if first is None:
            first = {"loss": float(out.loss.detach()), "x_hat": out.x_hat.detach().clone(),
                     "acts": out.acts.to_dense() if isinstance(out.acts, SparseActs) else out.acts.detach(),
                     "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
        opt.step()
    first["state"] = {n: t.clone() for n, t in model.state_dict().items()}
    return first


def sharded_worker(cases):
    """Every rank: for each (arch, dtype, d_sae, k, shards), this shard's results."""
    out = []
    for arch, dtype, d_sae, k, shards in cases:
        sae, batches = make_case(arch, dtype, d_sae, k)
        layout = build_layout(shards=shards)
        model = ShardedSAE.from_full(sae, layout)
        rows = slice(layout.replica * 8 // layout.replicas, (layout.replica + 1) * 8 // layout.replicas)
        x = batches[0][rows]
        with torch.no_grad():
            acts = model.encode(x)
            res = {"encode": acts.to_dense() if isinstance(acts, SparseActs) else acts,
                   "forward": model(x), "decode": model.decode(acts)}
        res.update(_train(model, batches, rows))
        res.update(range=(model.shard_start, model.shard_end), replica=layout.replica, rows=rows)
        out.append(res)
    return out


def _compare(case, results, replicas):
    arch, dtype, d_sae, k, shards = case
    tol = TOL[dtype]
    sae, batches = make_case(arch, dtype, d_sae, k)
    x0 = batches[0]
    with torch.no_grad():
        replica_views = []
        for r in range(replicas):
            rows = slice(r * 8 // replicas, (r + 1) * 8 // replicas)
            acts = sae.encode(x0[rows])
            replica_views.append({"encode": acts.to_dense() if isinstance(acts, SparseActs) else acts,
                                  "forward": sae(x0[rows])})
    ref = _train(sae, batches)
    losses = {}
    for res in results:
        start, end = res["range"]
        view = replica_views[res["replica"]]
        for key in ("encode", "forward", "decode"):
            want = view["forward"] if key == "decode" else view[key]
            torch.testing.assert_close(res[key], want, atol=tol, rtol=0, msg=f"{case} {key}")
        for name, g in res["grads"].items():
            if replicas == 1:  # with replicas, gradients are compared through the weights they produce
                exp = latent_slice(name, ref["grads"][name], start, end, arch)
                torch.testing.assert_close(g, exp, atol=tol, rtol=0, msg=f"{case} grad {name}")
        for name, t in res["state"].items():
            exp = latent_slice(name, ref["state"][name], start, end, arch)
            torch.testing.assert_close(t, exp, atol=tol, rtol=0, msg=f"{case} {name} after {STEPS} Adam steps")
        losses.setdefault(res["replica"], res["loss"])
    # the replicas' mean loss is the loss of the whole batch (losses are float32 in every dtype)
    assert sum(losses.values()) / replicas == pytest.approx(ref["loss"], rel=1e-6)


CASES_2 = [(arch, "float64", 22, 4, 2) for arch in ARCHS] + [
    ("topk", "float32", 22, 4, 2), ("standard", "float32", 22, 4, 2)]
# 4 ranks: 2 replicas x 2 shards, and 1 x 4 with uneven shards (6, 6, 5, 5) and k above a shard's width
CASES_4 = [(arch, "float64", 22, 4, 2) for arch in ("topk", "standard", "jumprelu")] + [
    ("topk", "float64", 22, 7, 4), ("batchtopk", "float64", 22, 7, 4)]


@pytest.fixture(scope="module")
def two_ranks():
    results = launch(sharded_worker, 2, (CASES_2,), timeout_s=120, collective_timeout_s=30)
    assert all(r.ok for r in results), [(r.rank, r.error, r.traceback) for r in results]
    return [r.value for r in results]


@pytest.fixture(scope="module")
def four_ranks():
    results = launch(sharded_worker, 4, (CASES_4,), timeout_s=120, collective_timeout_s=30)
    assert all(r.ok for r in results), [(r.rank, r.error, r.traceback) for r in results]
    return [r.value for r in results]


@pytest.mark.parametrize("i", range(len(CASES_2)), ids=[f"{c[0]}-{c[1]}" for c in CASES_2])
def test_two_shards_match_single_process(two_ranks, i):
    _compare(CASES_2[i], [rank[i] for rank in two_ranks], replicas=1)


@pytest.mark.parametrize("i", range(len(CASES_4)), ids=[f"{c[0]}-k{c[3]}-shards{c[4]}" for c in CASES_4])
def test_four_ranks_match_single_process(four_ranks, i):
    case = CASES_4[i]
    _compare(case, [rank[i] for rank in four_ranks], replicas=4 // case[4])


def row_sparse_worker():
    """2 replicas x 2 shards: the explicit sparse backward + row-sparse reduction."""
    sae, batches = make_case("topk", "float64")
    layout = build_layout(shards=2)
    model = ShardedSAE.from_full(sae, layout)
    rows = slice(layout.replica * 4, layout.replica * 4 + 4)
    x = batches[0][rows]
    sel = model.select(x, train=True)
    x_hat = model.decode_selection(sel).detach()
    grad_out = 2.0 / 4 * (x_hat - x)  # d(this replica's mean loss over its 4 rows)/d x_hat
    grads, db_dec = model.sparse_backward(x, sel, grad_out)
    grads, db_dec = reduce_row_sparse(grads, db_dec, layout)
    dense = grads.to_dense()
    # broadcast_parameters: every rank starts from a different init, then takes replica 0's shard
    # and shard 0's b_dec
    other = ShardedSAE(sae.cfg, layout, seed=layout.rank)
    with torch.no_grad():
        other.b_dec.fill_(float(layout.rank))
    broadcast_parameters(other, layout)
    start, end = model.shard_start, model.shard_end
    reseeded = ShardedSAE(sae.cfg, layout, seed=layout.shard).W_dec  # what replica 0 of this shard drew
    return {"range": (start, end), "db_dec": db_dec, **dense,
            "broadcast_ok": bool(torch.equal(other.W_dec, reseeded)) and float(other.b_dec.max()) == 0.0}


def test_row_sparse_backward_matches_reference():
    results = launch(row_sparse_worker, 4, timeout_s=60, collective_timeout_s=30)
    assert all(r.ok for r in results), [(r.rank, r.error, r.traceback) for r in results]
    sae, batches = make_case("topk", "float64")
    x = batches[0]
    with torch.no_grad():
        acts = sae.encode(x)
        grad_out = 2.0 / 8 * (sae.decode(acts) - x)
        want = reference.topk_sae_backward(x, acts.values, acts.indices, grad_out, sae.W_enc, sae.W_dec, sae.b_dec)
    for r in results:
        start, end = r.value["range"]
        torch.testing.assert_close(r.value["dW_enc"], want["dW_enc"][:, start:end], atol=1e-12, rtol=0)
        torch.testing.assert_close(r.value["db_enc"], want["db_enc"][start:end], atol=1e-12, rtol=0)
        torch.testing.assert_close(r.value["dW_dec"], want["dW_dec"][start:end], atol=1e-12, rtol=0)
        torch.testing.assert_close(r.value["db_dec"], want["db_dec"], atol=1e-12, rtol=0)
        assert r.value["broadcast_ok"]


def test_single_process_sharded_module_is_the_sae():
    """Without torch.distributed, a 1-shard ShardedSAE is the plain SAE, and to_full gives it back."""
    for arch in ARCHS:
        sae, batches = make_case(arch)
        model = ShardedSAE.from_full(sae)
        x = batches[0]
        torch.testing.assert_close(model(x), sae(x), atol=1e-12, rtol=0)
        a, b = model.training_forward(x), sae.training_forward(x)
        assert float(a.loss.detach()) == pytest.approx(float(b.loss.detach()), abs=1e-12)
        back = model.to_full()
        assert type(back) is type(sae)
        for name, t in sae.state_dict().items():
            torch.testing.assert_close(back.state_dict()[name], t)
