"""The end-to-end worked example of docs/in_model.md: the tiny GPT-2 of example.py (the same
model: same corpus, seed and training), a TopK SAE on its residual stream after block 0 trained
three ways at each k (so at the same L0), each scored with `fastsae eval` on held-out sentences:

  local      reconstruction MSE, on activations streamed from the model (fastsae.streaming)
  e2e        KL(clean output ‖ output with the SAE spliced in) (fastsae.e2e)
  e2e + ds   that KL plus the MSE of the next block's output against the clean one

    .venv/bin/python docs/in_model/e2e_example.py              # a few minutes on one CPU thread
    .venv/bin/python docs/in_model/e2e_example.py --quick      # seconds: a smoke run

Writes into docs/in_model/ (or --out): model/ and the SAEs (e2e_runs/, not committed), the eval
reports (e2e_eval/<run>/) and e2e_results.md, the table docs/in_model.md shows (--tag suffixes
these names: `--d-sae 16 --tag _d16` gives the second table).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from fastsae.cli import main as cli
from fastsae.e2e import E2ESource, E2ETrainer
from fastsae.streaming import ModelSource, TokenStream
from fastsae.trainer import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example import trained_model  # noqa: E402

HERE = Path(__file__).resolve().parent
HOOK, DOWNSTREAM = "transformer.h.0", "transformer.h.1"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE))
    p.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke run)")
    p.add_argument("--ks", default="1,2,4")
    p.add_argument("--d-sae", type=int, default=64)
    p.add_argument("--tokens", type=int, default=400_000, help="training tokens per SAE (every way the same)")
    p.add_argument("--tag", default="", help="suffix of the output names: e2e_results<tag>.md, e2e_eval<tag>/, ...")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    os.chdir(args.out)  # paths relative to the output folder, so the committed reports name no machine
    out = Path(".")
    quick = args.quick
    torch.set_num_threads(1)
    started = time.time()

    lm, tok, train_texts, eval_texts, losses = trained_model(out, quick)  # the model of example.py

    budget = 20_000 if quick else args.tokens
    rows, seqs = 256, 16  # rows per local step; sequences per end-to-end step
    tokens_per_seq = sum(len(tok(t)["input_ids"]) - 1 for t in train_texts) / len(train_texts)  # without <bos>
    local_steps, e2e_steps = max(1, budget // rows), max(1, round(budget / (seqs * tokens_per_seq)))

    def config(run: str, k: int, steps: int, batch_size: int, **kw) -> TrainConfig:
        meta = {"model": str(out / "model"), "hook": HOOK, "training": run}
        return TrainConfig(sae=dict(d_in=64, d_sae=args.d_sae, architecture="topk", k=k, metadata=meta),
                           steps=steps, batch_size=batch_size, lr=1e-3, log_every=max(1, steps // 10),
                           checkpoint_every=0, out_dir=str(out / f"e2e_runs{args.tag}" / run), progress=False,
                           console=False, plot=False, overwrite=True, **kw)

    def tokens(batch_size: int) -> TokenStream:
        return TokenStream(tokenizer=tok, texts=train_texts, batch_size=batch_size, context_length=64)

    results = []
    for k in [int(v) for v in args.ks.split(",")]:
        runs = {
            f"local_k{k}": lambda k=k: Trainer(
                config(f"local_k{k}", k, local_steps, rows),
                ModelSource(lm, HOOK, tokens(64), batch_size=rows, buffer_rows=1 << 14)),
            f"e2e_k{k}": lambda k=k: E2ETrainer(
                config(f"e2e_k{k}", k, e2e_steps, seqs, extra={"e2e": {}}), E2ESource(lm, HOOK, tokens(seqs))),
            f"e2e_ds_k{k}": lambda k=k: E2ETrainer(
                config(f"e2e_ds_k{k}", k, e2e_steps, seqs, extra={"e2e": {"downstream": [DOWNSTREAM]}}),
                E2ESource(lm, HOOK, tokens(seqs))),
        }
        for name, build in runs.items():
            t0 = time.time()
            res = build().fit()
            seconds = time.time() - t0
            cli(["eval", "--sae", str(res.final_dir), "--model", str(out / "model"), "--text", str(out / "eval.txt"),
                 "--out", str(out / f"e2e_eval{args.tag}" / name), "--batch-size", "32", "--no-progress"])
            m = json.loads((out / f"e2e_eval{args.tag}" / name / "eval.json").read_text())
            results.append((name.rsplit("_k", 1)[0], k, res.tokens, seconds, m))
            print(f"{name}: {res.steps} steps, {res.tokens} tokens, {seconds:.0f} s, CE-loss score "
                  f"{m['ce_loss_score']:.4f}, KL score {m['kl_div_score']:.4f}, FVU {m['fvu']:.4f}")
    # lm(...) is frozen by end-to-end training: nothing here trains it again

    label = {"local": "local (MSE)", "e2e": "e2e (KL)", "e2e_ds": "e2e + downstream"}
    lines = [f"Tiny GPT-2 of the example above (2 blocks, d=64, trained {len(losses)} steps, loss {losses[0]:.2f} -> "
             f"{losses[-1]:.2f}); TopK SAEs, d_sae={args.d_sae}, on `{HOOK}`, each trained on about {budget} tokens "
             f"(local: {local_steps} steps of {rows} rows; end to end: {e2e_steps} steps of {seqs} sentences); "
             f"scored on {len(eval_texts)} held-out sentences ({results[0][4]['tokens']} tokens).", "",
             "| k | training | L0 | FVU | CE-loss score | KL score | Δ LM loss | KL with SAE | dead | γ | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run, k, _, seconds, m in results:
        lines.append(f"| {k} | {label[run]} | {m['l0']:.2f} | {m['fvu']:.4f} | {m['ce_loss_score']:.4f} | "
                     f"{m['kl_div_score']:.4f} | {m['delta_lm_loss']:.4f} | {m['kl_div_with_sae']:.4f} | "
                     f"{m['dead_latents']} | {m['relative_reconstruction_bias']:.3f} | {seconds:.0f} |")
    lines += ["", f"Run in {time.time() - started:.0f} s on {torch.get_num_threads()} thread "
              "(`python docs/in_model/e2e_example.py`)."]
    (out / f"e2e_results{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
