"""The widest TopK SAE this CPU trains: d_in=256, d_sae=2^22 by default, compact optimizer state.

    python -m bench.wide_cpu --log-2-d-sae 22 --steps 300 --batch-size 16 --out bench/results/wide_cpu.json

Runs fastsae.Trainer steps on toy data (fastsae.toy.ToyData) and reports the peak RSS (VmHWM),
the RSS after set-up (and the set-up's own peak: initialisation draws an fp32 [d_sae, d_in]
matrix), the memory model's prediction (fastsae.memory), the step time (median,
and against one encoder GEMM of the same batch timed in the same process) and the FVU. The
weights are fp32 here: torch's bf16 matmul on CPUs without bf16 instructions is ~35x slower
than fp32 (measured on this machine), so bf16 weights are for GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time


def _chunked_init() -> None:
    """Initialise SAEs a block of rows at a time (same distribution: unit-norm random decoder
    rows, W_enc = W_decᵀ), so set-up does not hold fp32 [d_sae, d_in] temporaries beside the
    weights (at d_sae = 2^22 those are 8 GiB more than the weights)."""
    import torch

    from fastsae.sae import BaseSAE

    @torch.no_grad()
    def reset_parameters(self, rows: int = 1 << 16) -> None:
        for a in range(0, self.d_sae, rows):
            w = torch.randn(min(rows, self.d_sae - a), self.d_in, device=self.W_dec.device)
            w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.W_dec[a:a + w.shape[0]] = w
            self.W_enc[:, a:a + w.shape[0]] = w.t()
        self.b_enc.zero_()
        self.b_dec.zero_()

    BaseSAE.reset_parameters = reset_parameters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.wide_cpu")
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--log-2-d-sae", type=int, default=22)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--optimizer", default="row_sparse_adam")
    p.add_argument("--state", default="int8")
    p.add_argument("--master", default="fp32")
    p.add_argument("--dead-tokens", type=int, default=800, help="tokens without firing before AuxK revives a latent")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import torch

    from fastsae import memory
    from fastsae.toy.data import ToyData
    from fastsae.trainer import TrainConfig, Trainer

    torch.set_num_threads(a.threads)
    n = 1 << a.log_2_d_sae
    _chunked_init()
    toy = ToyData(d=a.d_in, n_features=4 * a.d_in, mean_active=8.0, seed=0)
    x = toy.sample(a.batch_size * (a.steps + 2))
    memory._release_freed_memory()
    base = memory._status("VmRSS")
    chosen = dict(optimizer=a.optimizer, optimizer_state=a.state, master_weights=a.master)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(sae=dict(d_in=a.d_in, d_sae=n, architecture="topk", k=a.k, dtype=a.dtype, backend="cpp"),
                          steps=a.steps, batch_size=a.batch_size, lr=2e-4, b_dec_init="zeros", log_every=10**9,
                          checkpoint_every=0, progress=False, console=False, plot=False, dead_tokens=a.dead_tokens,
                          out_dir=out, **chosen)
        t0 = time.perf_counter()
        tr = Trainer(cfg, x)
        setup_s = time.perf_counter() - t0
        setup_peak = memory._status("VmHWM") - base  # the initialisation's own transients (fp32 randn [n, d])
        memory._release_freed_memory()
        set_up = memory._status("VmRSS") - base
        open("/proc/self/clear_refs", "w").write("5")  # from here the peak is the training steps'
        print(f"set up in {setup_s:.0f} s: RSS +{set_up / 2**30:.2f} GiB (peak during set-up "
              f"+{setup_peak / 2**30:.2f} GiB)", flush=True)
        times, fvus, auxk = [], [], []
        batches = iter(tr.source)
        for step in range(a.steps):
            xb = next(batches)
            t = time.perf_counter()
            s = tr.train_step(xb)
            times.append(time.perf_counter() - t)
            fvus.append(s["fvu"])
            auxk.append(s["auxk"])
            if a.out and step % 10 == 0:  # a partial record survives a timeout
                with open(a.out, "w", encoding="utf-8") as f:
                    json.dump({"partial": True, "steps_done": step + 1, "step_s": times, "fvu": fvus,
                               "setup_rss_gib": set_up / 2**30, "setup_peak_rss_gib": setup_peak / 2**30,
                               "peak_rss_gib": (memory._status("VmHWM") - base) / 2**30,
                               "load_average": os.getloadavg()}, f)
            if step % 25 == 0 or step == a.steps - 1:
                print(f"step {step}: {times[-1]:.2f} s, fvu {s['fvu']:.3f}, auxk {s['auxk']:.3f}, "
                      f"peak RSS +{(memory._status('VmHWM') - base) / 2**30:.2f} GiB", flush=True)
        peak = memory._status("VmHWM") - base
        W = tr.sae.W_enc.detach()
        gemm = []
        for _ in range(3):
            t = time.perf_counter()
            torch.mm(xb, W)
            gemm.append(time.perf_counter() - t)
        dead = float(tr.tracker.dead_fraction())
    est = memory.estimate(a.d_in, n, a.dtype, a.optimizer, 1, a.batch_size, a.k, "topk", True, state=a.state,
                          master=a.master, k_aux=a.d_in // 2, dead_fraction=dead, device="cpu", threads=a.threads)
    med = statistics.median(times[1:])
    result = {
        "d_in": a.d_in, "d_sae": n, "k": a.k, "batch_size": a.batch_size, "steps": a.steps, "dtype": a.dtype,
        "optimizer": a.optimizer, "state": a.state, "master": a.master, "threads": a.threads,
        "setup_rss_gib": set_up / 2**30, "setup_peak_rss_gib": setup_peak / 2**30,
        "peak_rss_gib": peak / 2**30, "model_static_gib": est.static / 2**30,
        "model_total_gib": est.total / 2**30, "model_error": est.total / peak - 1,
        "step_s_median": med, "encoder_gemm_s": min(gemm), "step_over_gemm": med / min(gemm),
        "fvu_first": fvus[0], "fvu_last10": statistics.mean(fvus[-10:]), "dead_fraction_end": dead,
        "auxk_last": auxk[-1], "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(), "note": "machine shared with other jobs during the run",
    }
    print(json.dumps(result, indent=2))
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
