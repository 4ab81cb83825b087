"""Optimizers for SAEs: dense Adam (torch's fused kernel where it has one) and a row-sparse
Adam that touches only the latents that fired, fed by RowSparseGrads.

Both keep their state in fp32. For bf16 (or fp16) weights they also keep fp32 master
weights: an Adam step of lr·1 on a weight of size ~0.1 is below bf16's resolution (2^-8
relative), so updating bf16 weights in place would silently drop most steps. The master
is updated and then rounded into the module's weights.

Both can keep decoder rows at unit norm: the gradient's component parallel to each row is
removed before the moments are updated, and the rows are renormalised after the step
(fastsae.constraints).

Row-sparse Adam semantics, against dense Adam (torch.optim.Adam):
  * lazy moments: a latent's moments (m, v) and its parameters change only on steps where it
    fired. Dense Adam decays m and v of every latent every step and keeps moving a latent
    along its momentum m/√v after it stops firing; row-sparse Adam does neither. For a
    latent that fires every step the two are identical.
  * bias correction per row: each latent counts its own updates t_j, and its step uses
    1-β1^t_j and 1-β2^t_j. A latent that first fires at global step 1000 gets the same
    first step (≈ lr·sign(g)) as under dense Adam at step 1; with a global count it would
    take a (1-β1)/√(1-β2) ≈ 3.2× larger first step.
  * parameters not indexed by latent (b_dec) use ordinary dense Adam.
The memory cost is the same as dense Adam (moments for every latent); the time per step is
O(touched latents · d_in) instead of O(d_sae · d_in).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .constraints import normalize_rows_, remove_parallel_component_
from .errors import ConfigError
from .sparse import RowSparseGrads


def merge_row_sparse(a: RowSparseGrads, b: RowSparseGrads) -> RowSparseGrads:
    """a + b as one RowSparseGrads over the union of their latents."""
    ids = torch.cat([a.latents, b.latents])
    latents, inverse = torch.unique(ids, return_inverse=True)
    u, d = latents.numel(), a.W_dec.shape[1]

    def add(x, y, shape):
        return x.new_zeros(shape).index_add_(0, inverse, torch.cat([x, y.to(x.dtype)]))

    W_enc = add(a.W_enc.t(), b.W_enc.t(), (u, d)).t()
    return RowSparseGrads(latents, W_enc, add(a.b_enc, b.b_enc, (u,)), add(a.W_dec, b.W_dec, (u, d)), a.d_sae)


class DenseAdam:
    """torch.optim.Adam over named parameters, with fp32 masters for low-precision weights
    and an optional unit-norm constraint on named [n, d] weights (decoder rows).

    Call `step()` after `loss.backward()`; gradients are read from the parameters' .grad.
    """

    def __init__(self, params: dict[str, nn.Parameter], lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 unit_norm_rows: Iterable[str] = ()):
        self.params = dict(params)
        self.unit_norm_rows = [n for n in unit_norm_rows if n in self.params]
        self.master = {
            name: p if p.dtype == torch.float32 else nn.Parameter(p.detach().float().clone())
            for name, p in self.params.items()
        }
        masters = list(self.master.values())
        fused = all(p.device.type in ("cpu", "cuda") for p in masters)
        try:
            self.opt = torch.optim.Adam(masters, lr=lr, betas=betas, eps=eps, fused=fused)
        except (RuntimeError, TypeError):  # a torch without a fused kernel for this device
            self.opt = torch.optim.Adam(masters, lr=lr, betas=betas, eps=eps)
        fused = bool(self.opt.defaults.get("fused"))
        for p in masters:  # allocate the state now, so memory does not jump at step 1
            self.opt.state[p]["step"] = torch.tensor(0.0, device=p.device if fused else "cpu")
            self.opt.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self.opt.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        for p in (*self.params.values(), *self.master.values()):
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for name, p in self.params.items():
            m = self.master[name]
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        for name in self.unit_norm_rows:
            m = self.master[name]
            if m.grad is not None:
                remove_parallel_component_(m.grad, m)
        self.opt.step()
        for name in self.unit_norm_rows:
            normalize_rows_(self.master[name])
        for name, p in self.params.items():
            if self.master[name] is not p:
                p.copy_(self.master[name])

    def state_dict(self) -> dict:
        masters = {n: m.detach() for n, m in self.master.items() if m is not self.params[n]}
        return {"opt": self.opt.state_dict(), "masters": masters}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        with torch.no_grad():
            for n, m in state["masters"].items():
                self.master[n].copy_(m)


class RowSparseAdam:
    """Adam over an SAE's latent-indexed parameters (W_enc columns, b_enc, W_dec rows) that
    updates only the latents in each step's RowSparseGrads; see the module docstring for
    how this differs from dense Adam. b_dec gets ordinary dense Adam.

    step(rows, db_dec): rows = the RowSparseGrads of ops "topk_sae_backward"(row_sparse=True).
    """

    LATENT_PARAMS = ("W_enc", "b_enc", "W_dec")

    def __init__(self, sae, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, unit_norm_decoder: bool = True):
        names = {n for n, _ in sae.named_parameters()}
        extra = sorted(names - set(self.LATENT_PARAMS) - {"b_dec"})
        if extra:
            raise ConfigError(
                f"row-sparse Adam handles W_enc, b_enc, W_dec and b_dec, but this {type(sae).__name__} "
                f"also trains {extra}: use optimizer='adam' for it"
            )
        self.sae = sae
        self.lr, self.betas, self.eps = lr, betas, eps
        self.unit_norm_decoder = unit_norm_decoder
        n, d = sae.d_sae, sae.d_in
        dev = sae.device
        f32 = dict(dtype=torch.float32, device=dev)
        # Latent-major fp32 state: row j of each [n, d] tensor belongs to latent j, so a step
        # gathers and scatters whole contiguous rows (W_enc's state is kept transposed).
        self.state = {
            "W_enc": (torch.zeros(n, d, **f32), torch.zeros(n, d, **f32)),
            "b_enc": (torch.zeros(n, **f32), torch.zeros(n, **f32)),
            "W_dec": (torch.zeros(n, d, **f32), torch.zeros(n, d, **f32)),
        }
        self.row_steps = torch.zeros(n, dtype=torch.int64, device=dev)
        low = sae.dtype != torch.float32
        self.master = {
            "W_enc": sae.W_enc.detach().t().float().contiguous(),
            "b_enc": sae.b_enc.detach().float().clone(),
            "W_dec": sae.W_dec.detach().float().clone(),
        } if low else None
        self.dense = DenseAdam({"b_dec": sae.b_dec}, lr=lr, betas=betas, eps=eps)

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        self.dense.set_lr(lr)

    def _rows(self, name: str, u: torch.Tensor) -> torch.Tensor:
        """Current fp32 values of parameter `name` for latents u, latent-major [u, ...]."""
        if self.master is not None:
            return self.master[name][u]
        p = getattr(self.sae, name)
        return p[:, u].t() if name == "W_enc" else p[u]

    def _write(self, name: str, u: torch.Tensor, rows: torch.Tensor) -> None:
        if self.master is not None:
            self.master[name][u] = rows
        p = getattr(self.sae, name)
        if name == "W_enc":
            p.index_copy_(1, u, rows.t().to(p.dtype))
        else:
            p.index_copy_(0, u, rows.to(p.dtype))

    @torch.no_grad()
    def step(self, rows: RowSparseGrads, db_dec: torch.Tensor | None) -> None:
        u = rows.latents
        if u.numel():
            b1, b2 = self.betas
            self.row_steps[u] += 1
            t = self.row_steps[u].double()
            c1 = (1 - b1 ** t).float()
            c2 = (1 - b2 ** t).float()
            grads = {"W_enc": rows.W_enc.t().float(), "b_enc": rows.b_enc.float(), "W_dec": rows.W_dec.float()}
            for name, g in grads.items():
                w = self._rows(name, u)
                if name == "W_dec" and self.unit_norm_decoder:
                    g = remove_parallel_component_(g.clone(), w)
                m_all, v_all = self.state[name]
                m = m_all[u].mul_(b1).add_(g, alpha=1 - b1)
                v = v_all[u].mul_(b2).addcmul_(g, g, value=1 - b2)
                m_all[u], v_all[u] = m, v
                shape = (-1,) + (1,) * (g.dim() - 1)
                denom = (v / c2.view(shape)).sqrt_().add_(self.eps)
                w = w - self.lr * (m / c1.view(shape)) / denom
                if name == "W_dec" and self.unit_norm_decoder:
                    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
                self._write(name, u, w)
        if db_dec is not None:
            self.sae.b_dec.grad = db_dec.to(self.sae.b_dec.dtype)
            self.dense.step()
            self.sae.b_dec.grad = None

    def state_dict(self) -> dict:
        return {"lr": self.lr, "state": self.state, "row_steps": self.row_steps,
                "master": self.master, "dense": self.dense.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.lr = state["lr"]
        for name, (m, v) in state["state"].items():
            self.state[name][0].copy_(m)
            self.state[name][1].copy_(v)
        self.row_steps.copy_(state["row_steps"])
        if self.master is not None and state["master"] is not None:
            for name, t in state["master"].items():
                self.master[name].copy_(t)
        self.dense.load_state_dict(state["dense"])
