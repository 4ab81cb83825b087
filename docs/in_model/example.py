"""The worked example of docs/in_model.md: a tiny GPT-2 learns a small grammar, TopK SAEs are
trained on its residual stream after block 0, then spliced back in and scored.

    .venv/bin/python docs/in_model/example.py                 # a few minutes on one CPU thread
    .venv/bin/python docs/in_model/example.py --quick         # seconds: a smoke run

Writes into docs/in_model/ (or --out): the model and tokenizer (model/, not committed), the
harvested activations (acts/, not committed), one SAE per k (sae_k*/, not committed), the
`fastsae eval` report of each (eval_k*/) and results.md, the table docs/in_model.md shows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import fastsae
from fastsae.cli import main as cli
from fastsae.data import ShardSource
from fastsae.harvest import harvest
from fastsae.toy.tiny_lm import grammar_corpus, tiny_lm, train_lm, word_tokenizer

HERE = Path(__file__).resolve().parent
HOOK = "transformer.h.0"


def train_sae(source: ShardSource, d_sae: int, k: int, steps: int, metadata: dict, lr: float = 1e-3, seed: int = 0):
    """The simplest loop: Adam on training_forward's loss, decoder rows renormalised each step."""
    torch.manual_seed(seed)
    sae = fastsae.TopKSAE(d_in=source.d_in, d_sae=d_sae, k=k, metadata=metadata)
    with torch.no_grad():  # start b_dec at the data's mean, as most trainers do
        sae.b_dec.copy_(source.sample(4096).mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    batches = iter(source)
    for _ in range(steps):
        out = sae.training_forward(next(batches))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        with torch.no_grad():
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
    return sae


def trained_model(out: Path, quick: bool):
    """(lm, tokenizer, training texts, held-out texts, LM losses): the tiny GPT-2 trained on the
    grammar, saved with its tokenizer in out/model/, the held-out texts in out/eval.txt."""
    train_texts, eval_texts = grammar_corpus(200 if quick else 3000, seed=0), grammar_corpus(40 if quick else 400, 1)
    tok = word_tokenizer(train_texts + eval_texts)
    lm = tiny_lm("gpt2", len(tok), d_model=64, positions=64, initializer_range=0.02)
    losses = train_lm(lm, tok, train_texts, steps=5 if quick else 600, context_length=64)
    print(f"LM: {sum(p.numel() for p in lm.parameters())} parameters, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    (out / "model").mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    (out / "eval.txt").write_text("\n".join(eval_texts) + "\n")
    return lm, tok, train_texts, eval_texts, losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE))
    p.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke run)")
    p.add_argument("--ks", default="1,2,4")
    p.add_argument("--d-sae", type=int, default=64)
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    os.chdir(args.out)  # paths relative to the output folder, so the committed reports name no machine
    out = Path(".")
    quick = args.quick
    torch.set_num_threads(1)  # tiny shapes: one thread beats two contended ones on a shared machine
    started = time.time()

    lm, tok, train_texts, eval_texts, losses = trained_model(out, quick)

    manifest = harvest(lm.transformer, tok, train_texts, HOOK, out / "acts", context_length=64, batch_size=64,
                       progress=False, model_name=str(out / "model"), overwrite=True)
    source = ShardSource(out / "acts", batch_size=256, buffer_rows=1 << 16)
    print(f"harvested {manifest['rows']} rows of d={manifest['d_in']} at {manifest['hook']}")

    rows = []
    for k in [int(v) for v in args.ks.split(",")]:
        sae = train_sae(source, d_sae=args.d_sae, k=k, steps=20 if quick else 1500,
                        metadata={"model": str(out / "model"), "hook": HOOK})
        sae.save_pretrained(out / f"sae_k{k}")
        cli(["eval", "--sae", str(out / f"sae_k{k}"), "--model", str(out / "model"),
               "--text", str(out / "eval.txt"), "--out", str(out / f"eval_k{k}"), "--batch-size", "32",
               "--no-progress"])
        m = json.loads((out / f"eval_k{k}" / "eval.json").read_text())
        rows.append((k, m))
    random_sae = fastsae.TopKSAE(d_in=manifest["d_in"], d_sae=args.d_sae, k=4)
    random_sae.save_pretrained(out / "sae_random")
    cli(["eval", "--sae", str(out / "sae_random"), "--model", str(out / "model"), "--hook", HOOK, "--text",
         str(out / "eval.txt"), "--out", str(out / "eval_random"), "--no-progress"])
    rows.append(("4 (untrained)", json.loads((out / "eval_random" / "eval.json").read_text())))

    lines = [f"Tiny GPT-2 (2 blocks, d=64, {sum(p.numel() for p in lm.parameters())} parameters, vocabulary "
             f"{len(tok)}) trained {len(losses)} steps (loss {losses[0]:.2f} -> {losses[-1]:.2f}); TopK SAEs with "
             f"d_sae={args.d_sae} on `{HOOK}` ({manifest['rows']} training rows); scored on {len(eval_texts)} held-out "
             f"sentences ({rows[0][1]['tokens']} tokens, {rows[0][1]['ce_tokens']} next-token predictions).", "",
             "| k | L0 | FVU | explained var. | CE clean | CE with SAE | CE zero-abl. | CE-loss score | KL score | "
             "Δ LM loss | dead | γ |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, m in rows:
        lines.append(f"| {k} | {m['l0']:.2f} | {m['fvu']:.4f} | {m['explained_variance']:.4f} | "
                     f"{m['ce_loss_without_sae']:.4f} | {m['ce_loss_with_sae']:.4f} | "
                     f"{m['ce_loss_with_ablation']:.4f} | "
                     f"{m['ce_loss_score']:.4f} | {m['kl_div_score']:.4f} | {m['delta_lm_loss']:.4f} | "
                     f"{m['dead_latents']} | {m['relative_reconstruction_bias']:.3f} |")
    lines += ["", f"Run in {time.time() - started:.0f} s on {torch.get_num_threads()} thread "
              "(`python docs/in_model/example.py`)."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
