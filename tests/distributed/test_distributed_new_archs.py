"""Gated, Matryoshka BatchTopK and transcoders trained by the one Trainer on 2 gloo ranks (2
shards, or 2 replicas) equal the single-process run; their sharded checkpoints load whole; the
sparse step of a sharded Matryoshka SAE and of a sharded transcoder equals the whole one's.
One launch runs every case."""

from __future__ import annotations

import json

import pytest
import torch

import fastsae
from fastsae.data import PairedSource, TensorSource
from fastsae.distributed import ShardedSAE, build_layout, launch, load_full
from fastsae.sae import latent_slice
from fastsae.trainer import TrainConfig, Trainer

TOL = 1e-6
F64 = torch.float64

SAES = {
    "gated": dict(architecture="gated", l1_coefficient=0.1),
    "matryoshka": dict(architecture="matryoshka_batchtopk", k=3, matryoshka_widths=[3, 9, 20],
                       matryoshka_weights=[1.0, 0.5, 2.0]),
    "skip transcoder": dict(architecture="topk", k=3, transcoder=True, apply_b_dec_to_input=False,
                            skip_connection=True),
    "jumprelu transcoder d_out=4": dict(architecture="jumprelu", transcoder=True, d_out=4, apply_b_dec_to_input=False,
                                        skip_connection=True, l0_coefficient=0.1, jumprelu_init_threshold=0.05,
                                        jumprelu_bandwidth=0.1),
}
# (sae, shards of the 2 ranks, AuxK coefficient): AuxK only without replicas (see
# test_distributed_train); no BatchTopK family with replicas (each replica selects from its own batch)
CASES = [("gated", 2, 0.0), ("matryoshka", 2, 1 / 32), ("skip transcoder", 2, 1 / 32),
         ("jumprelu transcoder d_out=4", 2, 0.0), ("skip transcoder", 1, 0.0), ("gated", 1, 0.0)]


def sae_config(name):
    return fastsae.SAEConfig(d_in=6, d_sae=20, dtype="float64", **SAES[name])


def data(name, batch_size):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 6, dtype=F64, generator=g)
    cfg = sae_config(name)
    if not cfg.transcoder:
        return TensorSource(x, batch_size, shuffle=False)
    y = torch.tanh(x[:, :cfg.output_dim]) + 0.3 * torch.randn(96, cfg.output_dim, dtype=F64, generator=g)
    return PairedSource(x, y, batch_size, shuffle=False)


def train_config(name, aux, out, batch_size=16):
    return TrainConfig(sae=sae_config(name), steps=6, batch_size=batch_size, lr=1e-2, eps=1e-4, b_dec_init="zeros",
                       auxk_coefficient=aux, dead_tokens=16, k_aux=4, log_every=2, checkpoint_every=3,
                       out_dir=str(out), progress=False, console=False, plot=False)


def initial_sae(cfg):
    torch.manual_seed(0)
    sae = fastsae.build_sae(cfg.sae)
    with torch.no_grad():  # non-zero biases and skip weights
        for name, p in sae.named_parameters():
            if name not in ("W_enc", "W_dec", "threshold"):
                p.normal_(0, 0.1)
    return sae


def sparse_step(model, x, y):
    """One sparse step's gradients (Matryoshka's nested levels; a transcoder's skip)."""
    with torch.no_grad():
        sel = model.select(x, train=True)
        x_hat = model.decode_selection(sel, x)
        _, grad_out = model.sparse_loss(sel, x_hat, x if y is None else y)
        rows, db_dec = model.sparse_backward(x, sel, grad_out)
    dense = {"W_enc": model.W_enc.new_zeros(model.W_enc.shape), "b_enc": model.b_enc.new_zeros(model.b_enc.shape),
             "W_dec": model.W_dec.new_zeros(model.W_dec.shape)}
    dense["W_enc"][:, rows.latents], dense["b_enc"][rows.latents] = rows.W_enc, rows.b_enc
    dense["W_dec"][rows.latents] = rows.W_dec
    dense["b_dec"] = db_dec
    if model.W_skip is not None:
        dense["W_skip"] = model.W_skip.grad.clone()
    return dense


SPARSE_STEPS = [("matryoshka", None), ("skip transcoder", None),
                ("matryoshka transcoder d_out=4", dict(architecture="matryoshka_batchtopk", k=3,
                                                       matryoshka_widths=[7, 20], transcoder=True, d_out=4,
                                                       apply_b_dec_to_input=False))]


def step_case(name, override):
    cfg = fastsae.SAEConfig(d_in=6, d_sae=20, dtype="float64", **(override or SAES[name]))
    sae = initial_sae(TrainConfig(sae=cfg, steps=1, batch_size=8))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 6, dtype=F64, generator=g)
    y = torch.randn(8, cfg.output_dim, dtype=F64, generator=g) if cfg.transcoder else None
    return sae, x, y


def worker(root):
    out = {"train": [], "steps": []}
    for name, shards, aux in CASES:
        layout = build_layout(shards=shards)
        run = f"{root}/{name}-{shards}"
        cfg = train_config(name, aux, run, batch_size=16 // layout.replicas)
        trainer = Trainer(cfg, data(name, cfg.batch_size), initial_sae(cfg), layout=layout)
        trainer.fit()
        sae = trainer.sae
        span = (sae.shard_start, sae.shard_end) if shards > 1 else (0, sae.d_sae)
        out["train"].append({"state": {k: v.clone() for k, v in sae.state_dict().items()}, "range": span,
                             "out": run})
    layout = build_layout(shards=2)
    for name, override in SPARSE_STEPS:
        sae, x, y = step_case(name, override)
        model = ShardedSAE.from_full(sae, layout)
        out["steps"].append({"grads": sparse_step(model, x, y), "range": (model.shard_start, model.shard_end)})
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-new-archs")
    results = launch(worker, 2, (str(root),), timeout_s=240, collective_timeout_s=60)
    assert all(r.ok for r in results), [(r.error, r.traceback) for r in results]
    return [r.value for r in results]


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c[0]}-{c[1]}shards" for c in CASES])
def test_trainer_on_two_ranks_matches_one_process(two_ranks, i, tmp_path):
    name, shards, aux = CASES[i]
    cfg = train_config(name, aux, tmp_path / "ref")
    ref = Trainer(cfg, data(name, 16), sae=initial_sae(cfg))
    ref.fit()
    want = ref.sae.state_dict()
    arch = cfg.sae.architecture
    per_rank = [rank["train"][i] for rank in two_ranks]
    for res in per_rank:
        start, end = res["range"]
        for key, t in res["state"].items():
            torch.testing.assert_close(t, latent_slice(key, want[key], start, end, arch), atol=TOL, rtol=0,
                                       msg=f"{CASES[i]}: {key}")
    log = [json.loads(line) for line in open(f"{per_rank[0]['out']}/log.jsonl")]
    for got, exp in zip(log, ref.tracker.history, strict=True):
        assert got["loss"] == pytest.approx(exp["loss"], rel=1e-6)
    final = fastsae.load(f"{per_rank[0]['out']}/final")  # consolidated
    assert type(final) is type(ref.sae)
    for key, t in want.items():  # (a loaded BatchTopK threshold takes the weights' dtype)
        torch.testing.assert_close(final.state_dict()[key], t, atol=TOL, rtol=0, msg=key, check_dtype=False)
    if shards > 1:  # the sharded checkpoint, loaded whole
        whole = load_full(f"{per_rank[0]['out']}/final_sharded")
        for key, t in final.state_dict().items():
            torch.testing.assert_close(whole.state_dict()[key], t, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("i", range(len(SPARSE_STEPS)), ids=[s[0] for s in SPARSE_STEPS])
def test_sharded_sparse_step_matches_the_whole_sae(two_ranks, i):
    name, override = SPARSE_STEPS[i]
    sae, x, y = step_case(name, override)
    want = sparse_step(sae, x, y)
    # the plain MSE's gradient is taken in float32 (as the trainer's), Matryoshka's levels' in float64
    tol = 1e-12 if sae.cfg.architecture == "matryoshka_batchtopk" else 1e-6
    for rank in two_ranks:
        res = rank["steps"][i]
        start, end = res["range"]
        for key, g in res["grads"].items():
            torch.testing.assert_close(g, latent_slice(key, want[key], start, end, sae.cfg.architecture),
                                       atol=tol, rtol=0, msg=f"{name}: {key}")
