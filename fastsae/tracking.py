"""Training metrics: which latents fire, and the curves every N steps (JSONL + console + plot).

tokens_since_fired[j] counts the tokens since latent j last fired; a latent is dead once
that reaches `dead_tokens`. Every `log_every` steps one JSON line is written with the
window's means of loss, MSE, FVU and L0, the dead fraction, the dense fraction (latents
firing on more than `dense_threshold` of the window's tokens), the relative reconstruction
bias γ = Σ‖x̂‖²/Σ⟨x̂,x⟩ (shrinkage: γ < 1) and tokens/s.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .errors import CheckpointError

SCALARS = ("loss", "mse", "fvu", "l0", "sparsity", "auxk")


class Tracker:
    def __init__(self, d_sae: int, device, log_path: str | Path | None, log_every: int = 100,
                 dead_tokens: int = 10_000_000, dense_threshold: float = 0.1, console=None):
        self.d_sae = d_sae
        self.log_path = Path(log_path) if log_path is not None else None
        self.log_every = max(1, int(log_every))
        self.dead_tokens = int(dead_tokens)
        self.dense_threshold = dense_threshold
        self.console = console  # callable(str) or None
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.window_fires = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.skipped_batches = 0
        self.history: list[dict] = []
        self._reset_window()

    def _reset_window(self) -> None:
        self.sums = {k: 0.0 for k in SCALARS}
        self.steps_in_window = 0
        self.tokens_in_window = 0
        self.xhat_sq = 0.0
        self.xhat_dot_x = 0.0
        self.window_fires.zero_()
        self.window_start = time.perf_counter()

    @torch.no_grad()
    def record(self, fired: torch.Tensor, n_tokens: int, scalars: dict[str, float],
               x_hat: torch.Tensor, x: torch.Tensor) -> None:
        """One training step: `fired` holds the latent id of every activation that fired
        (repeats allowed), `scalars` the step's loss terms."""
        self.tokens_since_fired += n_tokens
        if fired.numel():
            self.tokens_since_fired.index_fill_(0, fired, 0)
            self.window_fires.index_add_(0, fired, torch.ones_like(fired))
        for k in SCALARS:
            self.sums[k] += float(scalars.get(k, 0.0))
        self.steps_in_window += 1
        self.tokens_in_window += n_tokens
        xh, xf = x_hat.float().reshape(-1), x.float().reshape(-1)
        self.xhat_sq += float(torch.dot(xh, xh))
        self.xhat_dot_x += float(torch.dot(xh, xf))

    def dead_latents(self) -> torch.Tensor:
        """Ids of latents that have not fired for `dead_tokens` tokens."""
        return torch.nonzero(self.tokens_since_fired >= self.dead_tokens).flatten()

    def revive(self, latents: torch.Tensor) -> None:
        """Give latents (e.g. just resampled) a fresh dead window."""
        self.tokens_since_fired[latents] = 0

    def dead_fraction(self) -> float:
        return float((self.tokens_since_fired >= self.dead_tokens).float().mean())

    def maybe_log(self, step: int, total_tokens: int, extra: dict | None = None) -> dict | None:
        """After step `step` (1-based count of steps done): write the window's line if due."""
        if self.steps_in_window == 0 or step % self.log_every != 0:
            return None
        return self.flush(step, total_tokens, extra)

    def flush(self, step: int, total_tokens: int, extra: dict | None = None) -> dict | None:
        if self.steps_in_window == 0:
            return None
        n = self.steps_in_window
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        freq = self.window_fires.float() / max(1, self.tokens_in_window)
        rec = {"step": step, "tokens": total_tokens}
        rec.update({k: self.sums[k] / n for k in SCALARS})
        rec.update({
            "dead_fraction": self.dead_fraction(),
            "dense_fraction": float((freq > self.dense_threshold).float().mean()),
            "shrinkage": self.xhat_sq / self.xhat_dot_x if self.xhat_dot_x else math.nan,
            "tokens_per_s": self.tokens_in_window / elapsed,
            "skipped_batches": self.skipped_batches,
        })
        rec.update(extra or {})
        self.history.append(rec)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        if self.console is not None:
            self.console(
                f"step {step:>7}  loss {rec['loss']:.4g}  fvu {rec['fvu']:.4f}  l0 {rec['l0']:.1f}  "
                f"dead {rec['dead_fraction']:.3f}  dense {rec['dense_fraction']:.3f}  "
                f"shrink {rec['shrinkage']:.3f}  {rec['tokens_per_s']:.3g} tok/s"
            )
        self._reset_window()
        return rec

    def state_dict(self) -> dict:
        return {
            "tokens_since_fired": self.tokens_since_fired.cpu(), "window_fires": self.window_fires.cpu(),
            "sums": dict(self.sums), "steps_in_window": self.steps_in_window,
            "tokens_in_window": self.tokens_in_window, "xhat_sq": self.xhat_sq,
            "xhat_dot_x": self.xhat_dot_x, "skipped_batches": self.skipped_batches,
        }

    def load_state_dict(self, s: dict) -> None:
        self.tokens_since_fired.copy_(s["tokens_since_fired"])
        self.window_fires.copy_(s["window_fires"])
        self.sums = dict(s["sums"])
        self.steps_in_window = s["steps_in_window"]
        self.tokens_in_window = s["tokens_in_window"]
        self.xhat_sq, self.xhat_dot_x = s["xhat_sq"], s["xhat_dot_x"]
        self.skipped_batches = s["skipped_batches"]
        self.window_start = time.perf_counter()


def read_log(path: str | Path) -> list[dict]:
    """The records of a log.jsonl. A torn last line (a write cut short by a full disk or a kill:
    no newline at its end, or not JSON) is dropped; a bad line elsewhere is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        last = i == len(lines) - 1  # text after the final newline: never finished
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if last or all(not rest.strip() for rest in lines[i + 1:]):
                break
            raise CheckpointError(f"{path} line {i + 1} is not JSON: the log is corrupt (delete that line to "
                                  "resume)") from None
        records.append(rec)
    return records


def plot_curves(log_path: str | Path, out_path: str | Path) -> Path | None:
    """PNG of loss, FVU, L0, dead/dense fractions and shrinkage against step."""
    records = read_log(log_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_write

    panels = [("loss", "mse"), ("fvu",), ("l0",), ("dead_fraction", "dense_fraction"), ("shrinkage",)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    steps = [r["step"] for r in records]
    for ax, keys in zip(axes, panels):
        for k in keys:
            ax.plot(steps, [r.get(k, math.nan) for r in records], label=k)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        if keys[0] in ("loss", "fvu") and all(r[keys[0]] > 0 for r in records):
            ax.set_yscale("log")
    fig.tight_layout()
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)
    return Path(out_path)
