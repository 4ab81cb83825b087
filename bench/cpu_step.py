"""CPU benchmark of one TopK SAE training step (forward + backward + Adam), in one process.

Times, side by side at the same shape (default d=256, d_sae=16384, k=32, B=2048, fp32):
  - the encoder GEMM alone (x @ W_enc): the floor a step is measured against;
  - fastsae TopKSAE on the "cpp" backend (autograd through the C++ ops), with a breakdown;
  - fastsae with the explicit sparse backward (topk_sae_backward, no autograd);
  - a plain dense PyTorch TopK SAE;
  - SAELens TopKTrainingSAE and sparsify SparseCoder (a peer that fails to import or run is
    reported as such, not dropped).
Then, at d_sae=2^20, d=256, B=4096: the peak resident memory of fastsae steps against the
parameters + Adam state. Every model uses torch.optim.Adam(fused=True).

    nice .venv/bin/python bench/cpu_step.py            # writes bench/results/cpu_step-<machine>.md/.json

On a machine shared with other jobs, OpenMP threads that spin while waiting for a descheduled
sibling inflate every parallel region; OMP_WAIT_POLICY=PASSIVE (or --threads 1) measures the
code rather than the contention.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import threading
import time
import traceback
from pathlib import Path

# sparsify's Triton decoder cannot run on CPU tensors; its eager decoder can.
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import psutil  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import fastsae  # noqa: E402
from fastsae import ops  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/cpu_step.py` too
from bench.report import device_info  # noqa: E402
from bench.timing import measure  # noqa: E402

GiB = 2**30


def machine_name() -> str:
    return f"{device_info('cpu')['slug'].removeprefix('cpu-')}-{os.cpu_count()}c"


def adam(params):
    return torch.optim.Adam(params, lr=1e-4, fused=True)


# ---------------------------------------------------------------- the contenders
# Each builder returns (step, parts): step() runs one training step; parts maps a
# breakdown name to a callable timed on its own, or to (setup, fn): fn(setup()) with setup
# untimed (optional).
def gemm_alone(x, a):
    W_enc = torch.randn(a.d_in, a.d_sae) / a.d_in**0.5
    return (lambda: torch.mm(x, W_enc)), {}


def fastsae_autograd(x, a):
    sae = fastsae.TopKSAE(d_in=a.d_in, d_sae=a.d_sae, k=a.k, backend="cpp")
    opt = adam(sae.parameters())

    def step():
        opt.zero_grad(set_to_none=True)
        sae.training_forward(x).loss.backward()
        opt.step()

    encode = ops.get("topk_encode", "cpp")

    def forward_only():
        with torch.no_grad():
            sae.training_forward(x)

    def forward_for_backward():  # untimed: the graph the timed backward consumes
        opt.zero_grad(set_to_none=True)
        return sae.training_forward(x)

    def backward_only(out):
        out.loss.backward()

    def adam_only():
        opt.step()

    def encode_only():
        with torch.no_grad():
            encode(x, sae.W_enc, sae.b_enc, sae.b_dec, a.k)

    return step, {"topk_encode (fused chunked encoder)": encode_only, "training_forward": forward_only,
                  "backward (autograd, C++ ops)": (forward_for_backward, backward_only), "Adam step (fused)": adam_only}


def fastsae_explicit(x, a):
    """Forward without autograd, e = dL/dx_hat by hand, one topk_sae_backward call."""
    sae = fastsae.TopKSAE(d_in=a.d_in, d_sae=a.d_sae, k=a.k, backend="cpp")
    opt = adam(sae.parameters())
    encode, decode = ops.get("topk_encode", "cpp"), ops.get("sparse_decode", "cpp")
    backward = ops.get("topk_sae_backward", "cpp")

    def step():
        with torch.no_grad():
            vals, idx = encode(x, sae.W_enc, sae.b_enc, sae.b_dec, a.k)
            x_hat = decode(vals, idx, sae.W_dec, sae.b_dec)
            e = (x_hat - x) * (2.0 / x.shape[0])  # d/dx_hat of sum((x_hat-x)^2)/B
            g = backward(x, vals, idx, e, sae.W_enc, sae.W_dec, sae.b_dec)
        sae.W_enc.grad, sae.b_enc.grad, sae.W_dec.grad = g["dW_enc"], g["db_enc"], g["dW_dec"]
        sae.b_dec.grad = g["db_dec"]
        opt.step()

    return step, {}


class DenseTopKSAE(torch.nn.Module):
    """The textbook dense TopK SAE: materialises [B, d_sae] pre-activations and activations."""

    def __init__(self, d_in, d_sae, k):
        super().__init__()
        self.k = k
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae) / d_in**0.5)
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.W_dec = torch.nn.Parameter(self.W_enc.detach().t().clone())
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))

    def forward(self, x):
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        top = pre.topk(self.k, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        x_hat = acts @ self.W_dec + self.b_dec
        return (x_hat - x).pow(2).sum(-1).mean()


def dense_pytorch(x, a):
    sae = DenseTopKSAE(a.d_in, a.d_sae, a.k)
    opt = adam(sae.parameters())

    def step():
        opt.zero_grad(set_to_none=True)
        sae(x).backward()
        opt.step()

    return step, {}


def saelens(x, a):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=a.d_in, d_sae=a.d_sae, k=a.k, device="cpu"))
    opt = adam(sae.parameters())
    inp = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0,
                         is_logging_step=False)

    def step():
        opt.zero_grad(set_to_none=True)
        sae.training_forward_pass(inp).loss.backward()
        opt.step()

    return step, {}


def sparsify(x, a):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(a.d_in, SparseCoderConfig(num_latents=a.d_sae, k=a.k), device="cpu")
    opt = adam(sae.parameters())

    def step():
        opt.zero_grad(set_to_none=True)
        sae(x).fvu.backward()
        opt.step()

    return step, {}


CONTENDERS = [
    ("encoder GEMM alone (x @ W_enc)", gemm_alone),
    ("fastsae TopKSAE, cpp backend (autograd)", fastsae_autograd),
    ("fastsae, explicit topk_sae_backward", fastsae_explicit),
    ("plain dense PyTorch TopK SAE", dense_pytorch),
    ("SAELens TopKTrainingSAE", saelens),
    ("sparsify SparseCoder", sparsify),
]


# ---------------------------------------------------------------- timing
def time_it(fn, warmup: int, repeats: int) -> dict:
    setup = None
    if isinstance(fn, tuple):
        setup, fn = fn
    t = measure(fn, "cpu", warmup=warmup, repeats=repeats, setup=setup, min_sample_s=0)
    # CPU seconds of all threads: less swayed than wall time when other jobs share the cores
    return {"median_ms": t.median_ms, "min_ms": t.min_ms, "cpu_ms": t.cpu_median_ms,
            "runs_ms": [round(v, 2) for v in t.samples_ms]}


def run_speed(a) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(a.batch, a.d_in)
    rows = []
    for name, build in tqdm(CONTENDERS, desc="contenders", file=sys.stderr):
        row = {"name": name}
        try:
            step, parts = build(x, a)
            row.update(time_it(step, a.warmup, a.repeats))
            row["parts"] = {p: time_it(f, 1, a.repeats) for p, f in parts.items()}
        except Exception as e:  # a peer that fails is reported, not dropped
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            traceback.print_exc()
        rows.append(row)
        gc.collect()
    gemm, gemm_cpu = rows[0].get("median_ms"), rows[0].get("cpu_ms")
    for row in rows:
        for r in [row, *row.get("parts", {}).values()]:
            if gemm and "median_ms" in r:
                r["x_gemm"] = r["median_ms"] / gemm
                r["x_gemm_cpu"] = r["cpu_ms"] / gemm_cpu
    return rows


# ---------------------------------------------------------------- memory at d_sae = 2^20
class PeakRSS:
    """Samples this process's resident set size in a thread; .peak is the largest seen."""

    def __init__(self, period_s: float = 0.002):
        self.proc, self.period, self.peak = psutil.Process(), period_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.period)

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def run_memory(a) -> dict:
    gc.collect()
    torch.manual_seed(0)
    x = torch.randn(a.big_batch, a.d_in)
    baseline = psutil.Process().memory_info().rss
    sae = fastsae.TopKSAE(d_in=a.d_in, d_sae=a.big_d_sae, k=a.k, backend="cpp")
    opt = adam(sae.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in sae.parameters())
    adam_bytes = 2 * param_bytes  # exp_avg + exp_avg_sq
    times = []
    with PeakRSS() as rss:
        for _ in tqdm(range(a.big_steps), desc=f"d_sae={a.big_d_sae} steps", file=sys.stderr):
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            sae.training_forward(x).loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
    used = rss.peak - baseline
    out = {
        "d_sae": a.big_d_sae, "d_in": a.d_in, "batch": a.big_batch, "k": a.k, "steps": a.big_steps,
        "step_s": [round(t, 2) for t in times],
        "params_GiB": param_bytes / GiB, "adam_state_GiB": adam_bytes / GiB,
        "baseline_rss_GiB": baseline / GiB, "peak_rss_GiB": rss.peak / GiB,
        "peak_rss_over_baseline_GiB": used / GiB,
        "ratio_to_params_plus_adam": used / (param_bytes + adam_bytes),
        "dense_preacts_would_be_GiB": a.big_batch * a.big_d_sae * 4 / GiB,
    }
    del sae, opt
    gc.collect()
    return out


# ---------------------------------------------------------------- report
def markdown(info: dict, rows: list[dict], mem: dict | None) -> str:
    a = info["args"]
    lines = [
        f"# CPU training step: fastsae vs the encoder GEMM and peers ({info['machine']})",
        "",
        f"d_in={a['d_in']}, d_sae={a['d_sae']}, k={a['k']}, B={a['batch']}, fp32, Adam(fused=True); "
        f"median of {a['repeats']} runs after {a['warmup']} warm-up. torch {info['torch']}, "
        f"{info['threads']} threads, OMP_WAIT_POLICY={info['omp_wait_policy']}, {info['date']}.",
        f"Load average before/after: {info['load_before']} / {info['load_after']}"
        + (" (machine shared with other jobs: timings are noisy)" if info["shared"] else ""),
        "",
        "x GEMM = median wall time / the GEMM's; CPU x GEMM = the same with process CPU time "
        "(all threads), steadier when the cores are shared.",
        "",
        "| step | median ms | min ms | x GEMM | CPU ms | CPU x GEMM |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | failed: {row['error']} | | | | |")
            continue
        for name, r in [(row["name"], row)] + [(f"&nbsp;&nbsp;↳ {p}", r) for p, r in row.get("parts", {}).items()]:
            lines.append(f"| {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['x_gemm']:.2f} | "
                         f"{r['cpu_ms']:.1f} | {r['x_gemm_cpu']:.2f} |")
    step = next((r for r in rows if r["name"].startswith("fastsae TopKSAE") and "x_gemm" in r), None)
    if step:
        met = "met" if step["x_gemm"] <= 1.3 else "NOT met"
        lines += ["", f"Target step <= 1.3x GEMM: {met} ({step['x_gemm']:.2f}x wall, "
                      f"{step['x_gemm_cpu']:.2f}x CPU time)."]
    if mem:
        met = "met" if mem["ratio_to_params_plus_adam"] <= 1.5 else "NOT met"
        lines += [
            "",
            f"## Memory at d_sae={mem['d_sae']}, d_in={mem['d_in']}, B={mem['batch']}, k={mem['k']}",
            "",
            f"- parameters {mem['params_GiB']:.2f} GiB + Adam state {mem['adam_state_GiB']:.2f} GiB",
            f"- peak RSS {mem['peak_rss_GiB']:.2f} GiB, of which {mem['peak_rss_over_baseline_GiB']:.2f} GiB "
            f"above the process before the SAE was built = {mem['ratio_to_params_plus_adam']:.2f}x "
            f"params + Adam (target <= 1.5x: {met}); dense pre-activations alone would be "
            f"{mem['dense_preacts_would_be_GiB']:.1f} GiB",
            f"- step times (s): {mem['step_s']} (the first step also allocates the Adam state)",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--big-d-sae", type=int, default=2**20)
    p.add_argument("--big-batch", type=int, default=4096)
    p.add_argument("--big-steps", type=int, default=2)
    p.add_argument("--skip-memory", action="store_true", help="skip the d_sae=2^20 memory run")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--machine", default=machine_name())
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-save", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    load_before = [round(v, 2) for v in os.getloadavg()]
    rows = run_speed(a)
    mem = None if a.skip_memory else run_memory(a)
    load_after = [round(v, 2) for v in os.getloadavg()]
    info = {
        "machine": a.machine, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "niceness": os.nice(0),
        "load_before": load_before, "load_after": load_after,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "shared": max(load_before[0], load_after[0]) > 1.5 * torch.get_num_threads(),
        "args": vars(a),
    }
    md = markdown(info, rows, mem)
    print(md)
    if not a.no_save:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"cpu_step-{a.machine}.md").write_text(md)
        (out / f"cpu_step-{a.machine}.json").write_text(json.dumps(
            {"info": info, "speed": rows, "memory": mem}, indent=2))
        print(f"wrote {out / f'cpu_step-{a.machine}.md'} and .json")


if __name__ == "__main__":
    main()
