"""What `fastsae eval` costs per million tokens, beside the model's own forward pass.

    python -m bench.eval_cost                       # the tests' tiny GPT-2 ("tiny") and a small one, CPU
    python -m bench.eval_cost --threads 1 --tokens 20000

For each model: random token ids (no special tokens, no padding) in batches of --batch
sequences of the model's context length; a TopK SAE (d_sae = 16·d, k = 32) on the residual
stream after the middle block. Times, in one process with the same batches: the clean forward
pass over the data (the floor: evaluation runs it three times, clean, spliced and ablated),
fastsae.evaluate.evaluate on the same data (CE/KL passes included) and with objective="none"
(the reconstruction metrics only: one forward pass stopped at the hook). Reports seconds per
million evaluated tokens and the multiple of the forward pass. Writes
bench/results/eval_cost-<cpu>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (layers, d_model, vocab, context): the tests' tiny GPT-2, and a GPT-2-shaped small one
MODELS = {"tiny": (2, 32, 64, 32), "small": (4, 256, 8192, 128)}


def _batches(vocab: int, context: int, batch: int, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = max(1, tokens // (batch * context))
    return [(torch.randint(4, vocab, (batch, context), generator=g), None) for _ in range(n)]


def bench_model(name: str, layers: int, d: int, vocab: int, context: int, batch: int, tokens: int,
                repeats: int) -> dict:
    import fastsae
    from fastsae.evaluate import evaluate
    from fastsae.model import hook_points
    from fastsae.toy.tiny_lm import tiny_lm

    lm = tiny_lm("gpt2", vocab, layers=layers, d_model=d, positions=context, initializer_range=0.02)
    hook = hook_points(lm)["resid"][layers // 2]
    sae = fastsae.TopKSAE(d_in=d, d_sae=16 * d, k=32)
    batches = _batches(vocab, context, batch, tokens)
    n_tokens = sum(ids.numel() for ids, _ in batches)

    @torch.no_grad()
    def forward():
        for ids, _ in batches:
            lm(input_ids=ids).logits  # noqa: B018

    def full():
        return evaluate(lm, sae, hook, batches, progress=False)

    def recon():
        return evaluate(lm, sae, hook, batches, objective="none", progress=False)

    out = {"model": name, "layers": layers, "d_model": d, "vocab": vocab, "context": context, "batch": batch,
           "hook": hook, "d_sae": 16 * d, "k": 32, "tokens": n_tokens,
           "parameters": sum(p.numel() for p in lm.parameters())}
    forward()  # warm-up
    for label, fn in (("forward", forward), ("eval", full), ("eval_recon_only", recon)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[f"{label}_s"] = sorted(times)[len(times) // 2]
        out[f"{label}_s_per_mtok"] = out[f"{label}_s"] / n_tokens * 1e6
    out["eval_over_forward"] = out["eval_s"] / out["forward_s"]
    out["recon_over_forward"] = out["eval_recon_only_s"] / out["forward_s"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=40_000, help="evaluated tokens per measurement")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench.report import device_info, git_info, machine_info, versions

    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    rows = [bench_model(m, *MODELS[m], args.batch, args.tokens, args.repeats) for m in args.models]
    rep = {"device": device_info("cpu"), "machine": machine_info(), "versions": versions(), "git": git_info(),
           "threads": torch.get_num_threads(), "load_average_at_end": list(os.getloadavg()) if load else None,
           "records": rows}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"eval_cost-{rep['device']['slug']}"
    (out_dir / f"{stem}.json").write_text(json.dumps(rep, indent=2) + "\n")
    lines = [f"# Cost of `fastsae eval` on {rep['device']['name']}, {rep['threads']} thread(s)", "",
             f"Load average at start {load}, at end {rep['load_average_at_end']} "
             f"({rep['machine']['logical_cpus']} logical CPUs, shared with other jobs: compare the ratios, "
             "which were measured in one process on the same batches, more than the absolute times).", "",
             "| model | params | d | vocab | ctx | tokens | forward s/Mtok | eval s/Mtok | eval ÷ forward | "
             "recon-only s/Mtok | recon ÷ forward |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['d_model']} | {r['vocab']} | {r['context']} | "
                     f"{r['tokens']:,} | {r['forward_s_per_mtok']:.1f} | {r['eval_s_per_mtok']:.1f} | "
                     f"{r['eval_over_forward']:.2f}× | {r['eval_recon_only_s_per_mtok']:.1f} | "
                     f"{r['recon_over_forward']:.2f}× |")
    lines += ["", "eval = clean + spliced + zero-ablated forward passes with CE, KL and the reconstruction "
              "metrics; recon-only = one forward pass stopped after the hook, then the SAE and the metrics. "
              f"SAE: TopK, d_sae = 16·d, k = 32, at the residual stream after the middle block; batch "
              f"{args.batch} sequences."]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
