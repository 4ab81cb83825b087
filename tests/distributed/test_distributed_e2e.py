"""End-to-end training with the SAE sharded over 2 processes (gloo) equals it on one process:
the same float64 model, token batches and initial SAE; after 6 steps (AuxK on, a downstream
term, a checkpoint) each rank holds its slice of the single-process weights (1e-6 absolute, as
the sharded Trainer's tests) and rank 0's log has the same losses.

The model is a small causal LM in plain torch with the interface end-to-end training uses
(model(input_ids=, attention_mask=).logits, hook points by module name), so the ranks need not
import transformers (seconds each on a loaded machine); tests/test_e2e.py runs GPT-2."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import fastsae
from fastsae.distributed import build_layout, launch
from fastsae.sae import latent_slice
from fastsae.trainer import TrainConfig

TOL = 1e-6
VOCAB, D = 40, 16


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mix = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)
        x = x + self.mix(x.cumsum(1) / steps[:, None])  # each position mixes in the mean of those before it
        return x + self.mlp(x)


class CausalLM(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.wte = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Block(D) for _ in range(2)])
        self.head = nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        x = self.wte(input_ids)
        for b in self.blocks:
            x = b(x)
        return SimpleNamespace(logits=self.head(x))


def _run(out, tokens, layout=None):
    from fastsae.e2e import E2ESource, E2ETrainer
    from fastsae.streaming import TokenStream

    torch.set_num_threads(1)
    model = CausalLM().double()
    source = E2ESource(model, "blocks.0", TokenStream(token_files=[tokens], batch_size=4, context_length=10))
    cfg = TrainConfig(sae=dict(d_in=D, d_sae=40, architecture="topk", k=4, dtype="float64"), steps=6, batch_size=4,
                      lr=1e-2, optimizer="row_sparse_adam", dead_tokens=40, k_aux=6, log_every=2, checkpoint_every=3,
                      out_dir=str(out), progress=False, console=False, plot=False,
                      extra={"e2e": {"downstream": ["blocks.1"], "downstream_coefficient": 0.5}})
    torch.manual_seed(0)
    sae = fastsae.build_sae(cfg.sae)  # every rank passes the same whole SAE; the trainer keeps its slice
    trainer = E2ETrainer(cfg, source, sae, layout=layout)
    trainer.fit()
    s = trainer.sae
    return {"state": {k: v.clone() for k, v in s.state_dict().items()}, "range": (s.shard_start, s.shard_end),
            "sharded": s.sharded}


def sharded_e2e(root, tokens):
    return _run(f"{root}/sharded", tokens, build_layout(shards=2))


def test_sharded_e2e_equals_single_process_e2e(tmp_path):
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, VOCAB, (16, 10)))
    results = launch(sharded_e2e, 2, (str(tmp_path), str(tokens)), timeout_s=120, collective_timeout_s=30)
    assert all(r.ok for r in results), [(r.error, r.traceback) for r in results]
    ref = _run(tmp_path / "single", tokens)
    want = ref["state"]
    assert all(r.value["sharded"] for r in results)
    for r in results:
        start, end = r.value["range"]
        for name, t in r.value["state"].items():
            torch.testing.assert_close(t, latent_slice(name, want[name], start, end, "topk"), atol=TOL, rtol=0,
                                       msg=name)
    log = [json.loads(line) for line in open(tmp_path / "sharded" / "log.jsonl")]
    ref_log = [json.loads(line) for line in open(tmp_path / "single" / "log.jsonl")]
    assert [r["step"] for r in log] == [2, 4, 6]
    assert any(r["auxk"] > 0 for r in ref_log), "AuxK never ran"
    for got, exp in zip(log, ref_log):
        for key in ("loss", "kl", "downstream", "auxk"):
            assert got[key] == pytest.approx(exp[key], rel=1e-6, abs=1e-12), key
