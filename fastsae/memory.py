"""Memory model: the bytes one rank holds while training an SAE, and the widest d_sae that fits.

Per rank, with n = ceil(d_sae / shards) latents, d = d_in, P = (2d + 1)·n + d parameters
(+ n JumpReLU thresholds), b = bytes(dtype). Static (held for the whole run):

    parameters   P·b
    gradients    dense Adam (torch's, fp32 state): autograd .grad P·b, + 4·P fp32 copies
                 when b != 4; on the TopK sparse path fp32 buffers 4·P kept between steps,
                 except on CPU where every parameter has a multiple of 16 entries (Adam is
                 then fed the rows directly: DenseAdam's adam_rows_step_).
                 Compact dense Adam: autograd .grad P·b; sparse path nothing kept.
                 Row-sparse: nothing kept (the fired rows' gradients are transient).
    optimizer    per moment (Adam 2, Signum 1, signSGD 0): 4 bytes/value (fp32), 2 (bf16),
                 1 + 4/block for matrices (int8; vectors stay fp32); + 8·n row step counts
                 for row-sparse optimizers
    masters      4·P (fp32 copies), P·b (Kahan compensation), 0 (stochastic or nearest
                 rounding, or fp32 weights)
    bookkeeping  16·n: the trainer's two int64 per-latent counters (dead-latent tracking)

Transient (the largest of a step's phases, TopK family on the sparse path; E = B·k
(row, latent) entries, u = min(E, n) fired latents (the worst case: all distinct),
E' = B·k' and u' = min(E', n_dead) for AuxK over k' = min(k_aux, n_dead) dead latents):

    batch        the source's fp32 batch, its copy in the SAE's dtype, the reconstruction,
                 the fp32 error and the output gradient: ~B·d·(12 + 3b)
    encode       CPU (C++): per-thread tiles and heaps (small); GPU (Triton): S·B·k
                 candidates (S <= 64 latent splits); the selection E·(b + 8)
    AuxK         the dead-latent scan (n·(b + 1), 8·n_dead ids, the dead latents' encoder
                 columns gathered a chunk of at most 16 MiB at a time, the running top-k'
                 values and ids), then the sparse backward of its selection: the picked
                 latents' row-sparse gradients 2·u'·d·b and the op's working set
                 (losses.top_dead_preacts, BaseSAE.auxk_grads: no [B, k', d] gathers)
    backward     row-sparse gradients 2·u·d·b (+ u·b), the op's gathered encoder columns
                 u·d·b and dx B·d·b, its CSR index (8·n + 16·E)
    merge        the main and AuxK rows and their union, 2·(u + u')·d·b each
    optimizer    the fired rows' gradients and ~10 fp32 working copies of one chunk of rows
                 (2^20 values; fastsae.optim)

Without the sparse path (ReLU/JumpReLU autograd, or an encode without a fused top-k) the
activations are ~3 tensors [B, n] in dtype. The static part is exact (tests count the bytes of
the real tensors); the whole model is checked against the peak RSS of real CPU training steps
(`python -m fastsae.memory --check`, tests/test_memory_model.py), not against GPU
measurements: `reserve_gib` covers the CUDA context, the caching allocator's fragmentation and
NCCL buffers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field

from .config import dtype_from_str
from .errors import ConfigError
from .optim_state import MASTER_MODES, STATE_FORMS
from .quantize import BLOCK, block_layout

OPTIMIZERS = ("adam", "row_sparse_adam", "signum", "row_sparse_signum", "none")
GIB = 1 << 30
OPT_CHUNK = 1 << 20  # values per fp32 working chunk of the optimizers (fastsae.optim's default)


@dataclass
class MemoryEstimate:
    """Bytes per rank, by kind; `phases` are the transient candidates (activations = the largest)."""

    parameters: int
    gradients: int
    optimizer: int
    masters: int
    activations: int
    bookkeeping: int = 0
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def static(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.masters + self.bookkeeping

    @property
    def total(self) -> int:
        return self.static + self.activations


def _bytes(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype_from_str(dtype)).element_size()


def _moment_bytes(rows: int, cols: int, form: str, matrix: bool) -> int:
    """Bytes of one moment of a [rows, cols] tensor (fastsae.optim_state.Moments)."""
    if form == "int8" and matrix and cols > 1:
        return rows * cols + 4 * rows * block_layout(cols, BLOCK)[0]
    return rows * cols * (2 if form == "bf16" else 4)


def estimate(d_in: int, d_sae: int, dtype: str = "float32", optimizer: str = "adam", shards: int = 1,
             batch_size: int = 4096, k: int = 32, architecture: str = "topk", fused_encode: bool = True,
             state: str = "fp32", master: str = "fp32", k_aux: int | None = None, dead_fraction: float = 0.0,
             device: str = "cuda", threads: int = 1, betas=(0.9, 0.999)) -> MemoryEstimate:
    """Bytes per rank of training (optimizer="none": inference) a d_in × d_sae SAE split over
    `shards` ranks. k_aux None = d_in // 2 (the trainer's default); dead_fraction: the share of
    this rank's latents AuxK picks from (0: AuxK idle)."""
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer {optimizer!r} is unknown: use one of {', '.join(OPTIMIZERS)}")
    if state not in STATE_FORMS or master not in MASTER_MODES:
        raise ConfigError(f"state must be one of {STATE_FORMS} and master one of {MASTER_MODES}")
    b = _bytes(dtype)
    d, n, B = d_in, math.ceil(d_sae / shards), batch_size
    topk = architecture in ("topk", "batchtopk")
    sparse_path = topk and fused_encode
    row_sparse = optimizer.startswith("row_sparse")
    vectors = [n, d] + ([n] if architecture == "jumprelu" else [])  # b_enc, b_dec, threshold
    elems = 2 * d * n + sum(vectors)
    params = elems * b
    low = b != 4

    grads = opt = masters = 0
    if optimizer != "none":
        torch_adam = optimizer == "adam" and state == "fp32" and master == "fp32"
        if row_sparse:
            grads = 0
        elif torch_adam:
            from .optim import rows_fed_sizes

            rows_fed = sparse_path and device == "cpu" and rows_fed_sizes((d * n, *vectors))
            grads = (0 if rows_fed else 4 * elems) if sparse_path else elems * b + (4 * elems if low else 0)
        else:
            grads = 0 if sparse_path else elems * b
        n_mom = 2 if optimizer.endswith("adam") else (1 if betas[0] > 0 else 0)
        form = "fp32" if torch_adam else state
        # the matrices W_enc [d, n] and W_dec [n, d]: latent-major [n, d] rows for row-sparse
        mats = [(n, d), (n, d)] if row_sparse else [(d, n), (n, d)]
        per_moment = sum(_moment_bytes(r, c, form, True) for r, c in mats)
        per_moment += sum(_moment_bytes(1, v, form, False) for v in vectors)
        opt = n_mom * per_moment + (8 * n if row_sparse else 0)
        if low:
            m_mode = "fp32" if torch_adam or (row_sparse and state == "fp32" and master == "fp32") else master
            masters = {"fp32": 4 * elems, "kahan": elems * b}.get(m_mode, 0)
            if row_sparse and m_mode != "fp32" and state == "fp32" and master == "fp32":
                masters += 4 * d
    bookkeeping = 16 * n if optimizer != "none" else 0

    phases = _transients(d, n, B, k, b, sparse_path, optimizer, row_sparse, state, master,
                         k_aux if k_aux is not None else max(1, d // 2), dead_fraction, device, threads)
    return MemoryEstimate(params, grads, opt, masters, max(phases.values()), bookkeeping, phases)


def _transients(d, n, B, k, b, sparse_path, optimizer, row_sparse, state, master, k_aux, dead_fraction,
                device, threads) -> dict[str, int]:
    """Bytes on top of the static part at each phase of a step, in the trainer's order (what
    an earlier phase leaves alive is counted in the later ones)."""
    batch = B * d * (4 + 4 + 3 * b)  # fp32 batch, fp32 error, its copy in dtype, x_hat, grad_out
    if optimizer == "none":
        if sparse_path:
            return {"encode": B * d * (4 + 2 * b) + B * k * (b + 8)}
        return {"encode": B * d * (4 + 2 * b) + B * n * b}
    if not sparse_path:
        return {"autograd": batch + 3 * B * n * b}
    E = B * k
    u = min(E, n)
    base = batch + E * (b + 8)  # + the selection (values, int64 ids)
    if device == "cuda":
        splits = min(64, max(1, n // max(16 * k, 2048)))
        encode = B * splits * k * 8
    else:
        encode = threads * (128 * 512 * 4 + 128 * k * 16)
    n_dead = math.ceil(dead_fraction * n)
    k2 = min(k_aux, n_dead)
    E2, u2 = B * k2, min(B * k2, n_dead)
    saved = E2 * (b + 16) if k2 else 0  # AuxK's selected values, slots and ids
    aux_rows = 2 * u2 * d * b + u2 * (b + 8)  # AuxK's row-sparse gradients
    rows = 2 * u * d * b + u * b
    scan_chunk = min(n_dead, max(k2, (1 << 24) // (d * b))) * d * b  # losses.top_dead_preacts's gather
    phases = {
        "encode": base + encode,
        "auxk_scan": base + (n * (b + 1) + 8 * n_dead + scan_chunk + 2 * E2 * (b + 8) if k2 else 0),
        "backward": base + saved + aux_rows + rows + u * d * b + B * d * b + E * b + 8 * n + 16 * E + 16 * u,
    }
    # what follows the scan also holds its last chunk's bytes: measured on CPU, where glibc keeps
    # the freed chunk in the heap (RSS) after raising its mmap threshold to the chunk's size
    base += scan_chunk if k2 else 0
    phases["backward"] += scan_chunk if k2 else 0
    if k2:
        # before the main backward: its op's input copy, dvalues and CSR index beside its output
        phases["auxk_backward"] = base + saved + aux_rows + B * d * b + E2 * b + 8 * n + 16 * E2 + 16 * u2
        phases["merge"] = base + rows + aux_rows + 3 * (u + u2) * d * b
    merged = 2 * (u + u2) * d * b
    if optimizer == "adam" and state == "fp32" and master == "fp32":  # torch's fused Adam on kept buffers
        work = 2 * (u + u2) * d * 4
    else:  # fp32 working copies of one chunk of rows (measured: 9 for fp32 moments, 12 compact, +3 stochastic)
        chunk = min(u + u2, max(1, OPT_CHUNK // d)) * d if row_sparse else OPT_CHUNK
        copies = (9 if state == "fp32" else 12) + (3 if master == "stochastic" and b != 4 else 0) + (not row_sparse)
        work = copies * chunk * 4
    phases["optimizer"] = base + merged + aux_rows + work
    return phases


def widest_d_sae(d_in: int, gpu_gib: float, gpus: int = 1, dtype: str = "float32", optimizer: str = "adam",
                 batch_size: int = 4096, k: int = 32, architecture: str = "topk", fused_encode: bool = True,
                 reserve_gib: float = 4.0, multiple: int = 1024, **model) -> int:
    """The widest d_sae (a multiple of `multiple`·gpus) whose per-GPU estimate fits in
    gpu_gib - reserve_gib, with every GPU one latent shard. `model`: estimate()'s other
    options (state, master, k_aux, dead_fraction, device)."""
    budget = (gpu_gib - reserve_gib) * GIB

    def fits(n: int) -> bool:
        return estimate(d_in, n, dtype, optimizer, gpus, batch_size, k, architecture, fused_encode,
                        **model).total <= budget

    step = multiple * gpus
    if not fits(step):
        return 0
    lo, hi = 1, 2
    while fits(hi * step):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # largest m with fits(m·step)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid)
    return lo * step


WIDE_CONFIGS = (
    ("float32", "adam", "fp32", "fp32"),
    ("bfloat16", "adam", "fp32", "fp32"),
    ("bfloat16", "row_sparse_adam", "fp32", "fp32"),
    ("bfloat16", "row_sparse_adam", "bf16", "kahan"),
    ("bfloat16", "row_sparse_adam", "int8", "kahan"),
    ("bfloat16", "row_sparse_adam", "int8", "stochastic"),
    ("bfloat16", "row_sparse_signum", "int8", "stochastic"),
)


def table(d_ins=(768, 2048, 4096, 8192), gpus=((80.0, 1), (140.0, 1), (80.0, 8)), configs=WIDE_CONFIGS,
          **model) -> str:
    """Markdown table of widest_d_sae (TopK, fused encode, B=4096, k=32) per (GPU GiB, count)."""
    head = ("| d_in | dtype | optimizer | state | master | "
            + " | ".join(f"{g} x {gib:g} GiB" for gib, g in gpus) + " |")
    lines = [head, "|" + "---|" * (5 + len(gpus))]
    for d in d_ins:
        for dtype, opt, state, master in configs:
            cells = [_human(widest_d_sae(d, gib, g, dtype, opt, state=state, master=master, **model))
                     for gib, g in gpus]
            lines.append(f"| {d} | {dtype} | {opt} | {state} | {master} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _human(n: int) -> str:
    """1,234,567 as "1.23M (2^20.2)": decimal millions and the power of two."""
    if n <= 0:
        return "0"
    return f"{n / 1e6:.2f}M (2^{math.log2(n):.1f})" if n >= 10**5 else f"{n} (2^{math.log2(n):.1f})"


# ---------------------------------------------------------------------------------- the check
def _status(key: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


def _release_freed_memory() -> None:
    """Hand memory freed so far back to the OS (glibc keeps small freed blocks in its heap)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(d_in: int, d_sae: int, dtype: str = "bfloat16", optimizer: str = "row_sparse_adam",
            batch_size: int = 256, k: int = 8, state: str = "int8", master: str = "stochastic",
            k_aux: int | None = None, dead_fraction: float = 0.0, steps: int = 3, threads: int = 1,
            seed: int = 0) -> dict:
    """Run `steps` real Trainer steps (TopK, C++ backend, CPU) in THIS process and return the
    RSS they take: `static` = resident bytes after the SAE, optimizer and trainer exist (minus
    the baseline before), `peak` = the highest resident bytes during the steps (minus the
    baseline). Linux only. Run it in a fresh process (python -m fastsae.memory --measure)."""
    import tempfile

    import torch

    from . import trainer as trainer_mod

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    x = torch.randn(batch_size * (steps + 1), d_in)
    kw = dict(steps=steps, batch_size=batch_size, lr=1e-3, b_dec_init="zeros", log_every=10**9,
              checkpoint_every=0, progress=False, console=False, plot=False, k_aux=k_aux,
              dead_tokens=batch_size * 10**6)

    def sae(n):
        return dict(d_in=d_in, d_sae=n, architecture="topk", k=k, dtype=dtype, backend="cpp")

    chosen = dict(optimizer=optimizer, optimizer_state=state, master_weights=master)

    with tempfile.TemporaryDirectory() as out:
        # one-time costs of the process (code paths loaded, thread pools) are not the SAE's:
        # two steps of a small SAE pay them before the baseline is taken
        warm = trainer_mod.Trainer(trainer_mod.TrainConfig(sae=sae(max(4 * k, 4096)), out_dir=out, **kw, **chosen), x)
        warm.tracker.tokens_since_fired[::2] = warm.cfg.dead_tokens  # AuxK's paths too
        for b in itertools.islice(warm.source, 2):
            warm.train_step(b)
        del warm, b
        _release_freed_memory()
        base = _status("VmRSS")
        cfg = trainer_mod.TrainConfig(sae=sae(d_sae), out_dir=out, **kw, **chosen)
        tr = trainer_mod.Trainer(cfg, x)
        n_dead = math.ceil(dead_fraction * d_sae)
        dead = torch.randperm(d_sae, generator=torch.Generator().manual_seed(seed))[:n_dead]
        batches = iter(tr.source)
        first = next(batches)
        _release_freed_memory()
        open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
        static = _status("VmRSS") - base
        stats = []
        for i in range(steps):
            tr.tracker.tokens_since_fired.zero_()
            tr.tracker.tokens_since_fired[dead] = cfg.dead_tokens  # the same AuxK load every step
            stats.append(tr.train_step(first if i == 0 else next(batches)))
        peak = _status("VmHWM") - base
    return {"static": static, "peak": peak, "l0": stats[-1]["l0"] if stats[-1] else None,
            "auxk": stats[-1]["auxk"] if stats[-1] else None}


# (d_in, d_sae, dtype, optimizer, B, k, state, master, k_aux, dead_fraction): the transient part
# is 5-35 % of each total; AuxK idle and busy; row-sparse and dense; fp32 and bf16 weights (kept
# tiny: torch's bf16 matmul is slow on CPUs without bf16 instructions)
CHECK_SHAPES = (
    (64, 1 << 18, "float32", "row_sparse_adam", 2048, 16, "int8", "fp32", 32, 0.0),
    (64, 1 << 18, "float32", "row_sparse_adam", 1024, 32, "int8", "fp32", 32, 0.5),
    (256, 1 << 17, "float32", "row_sparse_adam", 256, 16, "bf16", "fp32", 64, 0.1),
    (64, 1 << 17, "float32", "adam", 512, 16, "int8", "fp32", 32, 0.25),
    (32, 1 << 17, "bfloat16", "row_sparse_adam", 64, 8, "int8", "stochastic", 16, 0.5),
)


def check(shapes=CHECK_SHAPES, threads: int = 1, timeout: float = 600) -> list[dict]:
    """Measure each shape in a fresh subprocess and set the model beside it."""
    rows = []
    for d, n, dtype, opt, B, k, state, master, k_aux, dead in shapes:
        args = dict(d_in=d, d_sae=n, dtype=dtype, optimizer=opt, batch_size=B, k=k, state=state, master=master,
                    k_aux=k_aux, dead_fraction=dead, threads=threads)
        env = {key: v for key, v in os.environ.items() if key != "FASTSAE_BACKEND"}
        proc = subprocess.run([sys.executable, "-m", "fastsae.memory", "--measure", json.dumps(args)],
                              capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"measuring {args} failed: {proc.stderr[-2000:]}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        est = estimate(d, n, dtype, opt, 1, B, k, "topk", True, state=state, master=master, k_aux=k_aux,
                       dead_fraction=dead, device="cpu", threads=threads)
        rows.append({**args, **got, "model_static": est.static, "model_total": est.total, "phases": est.phases})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastsae.memory",
                                description="Widest d_sae that fits per the memory model (checked against CPU "
                                            "peak RSS, not against GPUs)")
    p.add_argument("--d-in", type=int)
    p.add_argument("--gpu-gib", type=float, default=80.0)
    p.add_argument("--gpus", type=int, default=1, help="latent shards (one per GPU)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    p.add_argument("--state", default="fp32", choices=STATE_FORMS, help="optimizer moments' form")
    p.add_argument("--master", default="fp32", choices=MASTER_MODES, help="master-weight mode for bf16 weights")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--k-aux", type=int, default=None)
    p.add_argument("--dead-fraction", type=float, default=0.0, help="share of latents AuxK picks from")
    p.add_argument("--architecture", default="topk")
    p.add_argument("--unfused", action="store_true", help="encode materialises [B, n_s] (ReLU/JumpReLU)")
    p.add_argument("--reserve-gib", type=float, default=4.0)
    p.add_argument("--table", action="store_true", help="print the widest-d_sae table")
    p.add_argument("--check", action="store_true", help="measure CPU training steps against the model")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.measure:
        print(json.dumps(measure(**json.loads(a.measure))))
        return 0
    if a.check:
        for r in check():
            print(f"d_in={r['d_in']} d_sae={r['d_sae']} {r['dtype']} {r['optimizer']} {r['state']}/{r['master']} "
                  f"B={r['batch_size']} k={r['k']} dead={r['dead_fraction']}: measured peak "
                  f"{r['peak'] / 2**20:.0f} MiB, model {r['model_total'] / 2**20:.0f} MiB "
                  f"({(r['model_total'] / r['peak'] - 1) * 100:+.1f}%)")
        return 0
    if a.table:
        print(table(**({"d_ins": (a.d_in,)} if a.d_in else {})))
        return 0
    if a.d_in is None:
        p.error("--d-in is required (or --table / --check)")
    model = dict(state=a.state, master=a.master, k_aux=a.k_aux, dead_fraction=a.dead_fraction)
    n = widest_d_sae(a.d_in, a.gpu_gib, a.gpus, a.dtype, a.optimizer, a.batch_size, a.k, a.architecture,
                     not a.unfused, a.reserve_gib, **model)
    est = estimate(a.d_in, n, a.dtype, a.optimizer, a.gpus, a.batch_size, a.k, a.architecture, not a.unfused,
                   **model)
    print(f"widest d_sae: {n} ({_human(n)}) over {a.gpus} GPU(s) of {a.gpu_gib:g} GiB; per GPU: "
          + ", ".join(f"{name} {getattr(est, name) / GIB:.2f} GiB"
                      for name in ("parameters", "gradients", "optimizer", "masters", "bookkeeping", "activations")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
