"""Training on activations streamed from the model, beside harvest-then-train at the same shape.

    python -m bench.streaming                        # the tests' tiny GPT-2 ("tiny") and a small one, CPU
    python -m bench.streaming --models small --steps 8

For each model (random weights; documents of random words, every one of the model's context
length): a TopK SAE (d_sae = 16·d, k = 32) on the residual stream after the middle block, trained
`--steps` steps of `--batch-rows` rows with the Trainer (adam, no AuxK), four ways, in one process:

  streaming      Trainer on a ModelSource (the model runs while training)
  harvest+train  `harvest` to .npy shards, then the same Trainer on a ShardSource
  group (2 SAEs) one ModelSource feeding SAEs at two hook points (TrainerGroup), beside two
                 separate streaming runs
  e2e            end-to-end training (E2ETrainer), batches of the same number of tokens

Reports tokens/s of each, the share of the streaming run's time spent in the model's forward
passes (ModelSource.forward_seconds) and in filling the buffer (fill_seconds: the documents read
and tokenized, the forward passes, the rows gathered), and writes bench/results/streaming-<cpu>.json
and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (layers, d_model, vocab, context): the tests' tiny GPT-2, and a GPT-2-shaped small one
MODELS = {"tiny": (2, 32, 64, 32), "small": (4, 256, 8192, 128)}


def _texts(vocab: int, context: int, n_docs: int, seed: int = 0) -> list[str]:
    """Documents of context - 1 random words (the tokenizer adds <bos>): every one fills the context."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 3, (n_docs, context - 1), generator=g)
    return [" ".join(f"w{i}" for i in row.tolist()) for row in ids]


def bench_model(name: str, layers: int, d: int, vocab: int, context: int, steps: int, batch_rows: int,
                docs_per_pass: int) -> dict:
    from fastsae.e2e import E2ESource, E2ETrainer
    from fastsae.group import TrainerGroup
    from fastsae.harvest import harvest
    from fastsae.model import hook_points
    from fastsae.streaming import ModelSource, TokenStream
    from fastsae.toy.tiny_lm import tiny_lm, word_tokenizer
    from fastsae.trainer import TrainConfig, Trainer

    n_docs = -(-steps * batch_rows // (context - 1)) + docs_per_pass  # one pass of the documents and a little
    texts = _texts(vocab, context, n_docs)
    tok = word_tokenizer(texts)
    lm = tiny_lm("gpt2", len(tok), layers=layers, d_model=d, positions=context, initializer_range=0.02)
    resid = hook_points(lm)["resid"]
    hook, hook2 = resid[layers // 2 - 1], resid[-1]
    work = Path(tempfile.mkdtemp(prefix="fastsae-bench-streaming-"))

    def cfg(out, bs=batch_rows, steps=steps, **kw):
        return TrainConfig(sae=dict(d_in=d, d_sae=16 * d, architecture="topk", k=32), steps=steps, batch_size=bs,
                           lr=1e-3, auxk_coefficient=0.0, b_dec_init="zeros", log_every=steps, checkpoint_every=0,
                           out_dir=str(work / out), progress=False, console=False, plot=False, **kw)

    def tokens(batch=docs_per_pass):
        return TokenStream(tokenizer=tok, texts=texts, batch_size=batch, context_length=context)

    def source(hooks):
        return ModelSource(lm, hooks, tokens(), batch_size=batch_rows, buffer_rows=4 * batch_rows)

    out = {"model": name, "layers": layers, "d_model": d, "vocab": len(tok), "context": context, "hook": hook,
           "d_sae": 16 * d, "k": 32, "steps": steps, "batch_rows": batch_rows, "docs_per_pass": docs_per_pass,
           "parameters": sum(p.numel() for p in lm.parameters()), "tokens": steps * batch_rows}
    try:
        warm = cfg("warm-up", steps=1)  # first-use costs (imports, op dispatch) out of the timed runs
        Trainer(warm, ModelSource(lm, hook, tokens(), batch_size=batch_rows, buffer_rows=batch_rows)).fit()
        src = source(hook)
        t0 = time.perf_counter()
        Trainer(cfg("stream"), src).fit()
        out["streaming_s"] = time.perf_counter() - t0
        out["streaming_forward_s"] = src.forward_seconds
        out["streaming_fill_s"] = src.fill_seconds
        out["forward_share"] = src.forward_seconds / out["streaming_s"]
        out["fill_share"] = src.fill_seconds / out["streaming_s"]

        t0 = time.perf_counter()
        harvest(lm, tok, texts, hook, work / "acts", context_length=context, batch_size=docs_per_pass,
                max_tokens=steps * batch_rows + batch_rows, progress=False)
        out["harvest_s"] = time.perf_counter() - t0
        from fastsae.data import ShardSource

        t0 = time.perf_counter()
        Trainer(cfg("shards"), ShardSource(work / "acts", batch_rows, buffer_rows=4 * batch_rows)).fit()
        out["train_on_shards_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        for h in (hook, hook2):
            Trainer(cfg(f"alone-{h}"), source(h)).fit()
        out["two_separate_s"] = time.perf_counter() - t0
        src2 = source([hook, hook2])
        t0 = time.perf_counter()
        TrainerGroup([Trainer(cfg(f"group-{h}"), src2.view(h)) for h in (hook, hook2)]).fit()
        out["group_of_two_s"] = time.perf_counter() - t0
        out["group_forward_s"] = src2.forward_seconds

        seqs = max(1, batch_rows // (context - 1))  # the same tokens per step
        e2e = cfg("e2e", bs=seqs, extra={"e2e": {}})
        t0 = time.perf_counter()
        E2ETrainer(e2e, E2ESource(lm, hook, tokens(seqs))).fit()
        out["e2e_s"] = time.perf_counter() - t0
        out["e2e_tokens"] = steps * seqs * (context - 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = out["tokens"]
    out["tok_per_s"] = {
        "streaming": n / out["streaming_s"],
        "harvest+train": n / (out["harvest_s"] + out["train_on_shards_s"]),
        "train on shards alone": n / out["train_on_shards_s"],
        "group of 2 (per SAE)": 2 * n / out["group_of_two_s"],
        "2 separate streaming runs (per SAE)": 2 * n / out["two_separate_s"],
        "e2e": out["e2e_tokens"] / out["e2e_s"],
    }
    return out


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# Streaming training vs harvest-then-train ({meta['cpu']})", "",
             f"torch {meta['torch']}, {meta['threads']} thread(s), {os.cpu_count()} cores; load average "
             f"{meta['load_before']} before, {meta['load_after']} after (a shared machine: compare within a row).",
             "", "TopK SAE, d_sae = 16·d, k = 32, on the residual stream after the middle block; every way trains "
             "the same steps × batch rows; adam, no AuxK.", "",
             "| model | params | d | ctx | tokens | streaming tok/s | forward share | buffer-fill share | "
             "harvest+train tok/s | train on shards tok/s | group of 2, per SAE tok/s | 2 separate, per SAE tok/s | "
             "e2e tok/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = r["tok_per_s"]
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['d_model']} | {r['context']} | {r['tokens']:,} | "
                     f"{t['streaming']:,.0f} | {r['forward_share']:.0%} | {r['fill_share']:.0%} | "
                     f"{t['harvest+train']:,.0f} | "
                     f"{t['train on shards alone']:,.0f} | {t['group of 2 (per SAE)']:,.0f} | "
                     f"{t['2 separate streaming runs (per SAE)']:,.0f} | {t['e2e']:,.0f} |")
    lines += ["", "Seconds:", "", "| model | streaming | of which buffer fills | of which forward | harvest | "
              "train on shards | group of 2 | 2 separate | e2e |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['streaming_s']:.2f} | {r['streaming_fill_s']:.2f} | "
                     f"{r['streaming_forward_s']:.2f} | "
                     f"{r['harvest_s']:.2f} | {r['train_on_shards_s']:.2f} | {r['group_of_two_s']:.2f} | "
                     f"{r['two_separate_s']:.2f} | {r['e2e_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,small", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-rows", type=int, default=4096)
    p.add_argument("--docs-per-pass", type=int, default=32, help="documents per forward pass")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="results file stem (default bench/results/streaming-<cpu>)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = {"cpu": _cpu(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_before": [round(v, 1) for v in os.getloadavg()]}
    results = []
    for name in args.models.split(","):
        r = bench_model(name, *MODELS[name], args.steps, args.batch_rows, args.docs_per_pass)
        print(json.dumps({k: v for k, v in r.items()}, default=str))
        results.append(r)
    meta["load_after"] = [round(v, 1) for v in os.getloadavg()]
    stem = Path(args.out) if args.out else RESULTS / f"streaming-cpu-{'-'.join(meta['cpu'].lower().split()[:2])}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    text = markdown(results, meta)
    stem.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
