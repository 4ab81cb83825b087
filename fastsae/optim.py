"""Optimizers for SAEs: dense Adam (torch's fused kernel where it has one) and a row-sparse
Adam that touches only the latents that fired, fed by RowSparseGrads.

Both keep their state in fp32. For bf16 (or fp16) weights they also keep fp32 master
weights: an Adam step of lr·1 on a weight of size ~0.1 is below bf16's resolution (2^-8
relative), so updating bf16 weights in place would silently drop most steps. The master
is updated and then rounded into the module's weights.

Both can keep decoder rows at unit norm: the gradient's component parallel to each row is
removed before the moments are updated, and the rows are renormalised after the step
(fastsae.constraints).

Row-sparse Adam semantics, against dense Adam (torch.optim.Adam). It keeps moments for
every latent (the same memory as dense Adam) but a step reads and writes only the latents
that fired, O(touched · d_in) instead of O(d_sae · d_in). Parameters not indexed by latent
(b_dec) use ordinary dense Adam. Two modes:
  * catch_up=True (default): a latent that fired at step L and fires again at step t first
    receives, in closed form, the t-1-L zero-gradient steps dense Adam would have applied
    meanwhile (it keeps moving along m/√v with m decaying by β1 and v by β2 per step), then
    the ordinary update with the global step count t in the bias correction. This equals
    dense Adam except that (a) the missed steps use the current lr, not the lr of those
    steps, (b) eps is neglected inside the missed steps, (c) a unit-norm decoder row is
    renormalised once after them instead of after each, and (d) the missed movement is
    applied when the latent next fires (or at flush()), so a latent's weights can lag dense
    Adam's while it is silent. With every latent firing every step, it is dense Adam.
  * catch_up=False, "lazy" Adam (like torch.optim.SparseAdam, but with bias correction per
    row): moments and weights of a latent change only on steps where it fired; each latent
    counts its own updates t_j and uses 1-β1^t_j, 1-β2^t_j, so a latent that first fires at
    global step 1000 takes the same first step (≈ lr·sign(g)) as dense Adam at step 1 (with
    the global count it would take a (1-β1)/√(1-β2) ≈ 3.2× larger one). Silent latents do not
    coast on their momentum, which measurably weakens AuxK's revival of dead latents (see
    tests/test_optim.py and README's row-sparse Adam comparison).
"""

from __future__ import annotations

from collections.abc import Iterable

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
        self._grads: dict[str, torch.Tensor] | None = None  # step_row_sparse's buffers
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
        self._apply()

    @torch.no_grad()
    def step_row_sparse(self, rows: RowSparseGrads, db_dec: torch.Tensor) -> None:
        """step() for an SAE's row-sparse gradient (the TopK family's explicit backward): the
        gradient is zero outside rows.latents, so it is written into fp32 buffers kept between
        steps (no [d_in, d_sae] allocation and scatter per step) and the unit-norm projection
        touches those rows only. Dense Adam still moves every latent (its momentum)."""
        if self._grads is None:
            self._grads = {n: torch.zeros_like(m, dtype=torch.float32) for n, m in self.master.items()}
        g, u = self._grads, rows.latents
        for buf in g.values():
            buf.zero_()
        # the backward's W_enc columns are a transposed view: a contiguous source copies ~3x faster
        g["W_enc"].index_copy_(1, u, rows.W_enc.float().contiguous())
        g["b_enc"].index_copy_(0, u, rows.b_enc.float())
        w_dec = rows.W_dec.float()
        if "W_dec" in self.unit_norm_rows:
            remove_parallel_component_(w_dec, self.master["W_dec"][u])
        g["W_dec"].index_copy_(0, u, w_dec)
        g["b_dec"].copy_(db_dec)
        for name, m in self.master.items():
            m.grad = g[name]
        self._apply()
        for m in self.master.values():
            m.grad = None

    def _apply(self) -> None:
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
    reads and writes only the latents in each step's RowSparseGrads; see the module docstring
    for its two modes. b_dec gets ordinary dense Adam.

    step(rows, db_dec): rows = the RowSparseGrads of ops "topk_sae_backward"(row_sparse=True).
    flush(): apply every latent's pending momentum (catch-up mode), e.g. before saving the
    final weights.
    """

    LATENT_PARAMS = ("W_enc", "b_enc", "W_dec")

    def __init__(self, sae, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, unit_norm_decoder: bool = True,
                 catch_up: bool = True, catch_up_horizon: int = 128, chunk_rows: int = 16384):
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
        self.catch_up, self.horizon, self.chunk_rows = catch_up, catch_up_horizon, chunk_rows
        self.t = 0  # global steps taken
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
        # catch-up mode: the global step each row is up to date with; lazy mode: its update count
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
        if name == "W_dec" and self.unit_norm_decoder:
            rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if self.master is not None:
            self.master[name][u] = rows
        p = getattr(self.sae, name)
        if name == "W_enc":
            p.index_copy_(1, u, rows.t().to(p.dtype))
        else:
            p.index_copy_(0, u, rows.to(p.dtype))

    def _momentum_factor(self, last: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
        """Σ_{s=1..min(gap,H)} lr·β1^s/(1-β1^(L+s)) · √(1-β2^(L+s))/β2^(s/2) per row: how far
        dense Adam moves a row along m_L/√v_L in the `gap` zero-gradient steps after step L
        (lr taken as the current lr; eps neglected; terms past H are below (β1/√β2)^H)."""
        b1, b2 = self.betas
        s = torch.arange(1, self.horizon + 1, dtype=torch.float64, device=last.device)
        tau = last.double().unsqueeze(1) + s
        f = b1 ** s / (1 - b1 ** tau) * (1 - b2 ** tau).sqrt() / b2 ** (s / 2)
        f = torch.where(s <= gap.unsqueeze(1), f, torch.zeros((), dtype=f.dtype, device=f.device))
        return (self.lr * f.sum(1)).float()

    @torch.no_grad()
    def _catch_up(self, u: torch.Tensor, upto: int) -> None:
        """Bring rows u up to global step `upto`: apply the momentum steps dense Adam would
        have taken while they sat out, and decay their moments to match."""
        last = self.row_steps[u]
        need = (last > 0) & (last < upto)
        u, last = u[need], last[need]
        b1, b2 = self.betas
        for a in range(0, u.numel(), self.chunk_rows):
            uu, L = u[a:a + self.chunk_rows], last[a:a + self.chunk_rows]
            gap = upto - L
            S = self._momentum_factor(L, gap)
            d1, d2 = (b1 ** gap.double()).float(), (b2 ** gap.double()).float()
            for name, (m_all, v_all) in self.state.items():
                m, v = m_all[uu], v_all[uu]
                shape = (-1,) + (1,) * (m.dim() - 1)
                step = torch.where(v > 0, m / v.sqrt().clamp_min(1e-30), torch.zeros_like(m))
                self._write(name, uu, self._rows(name, uu) - S.view(shape) * step)
                m_all[uu], v_all[uu] = m * d1.view(shape), v * d2.view(shape)
            self.row_steps[uu] = upto

    @torch.no_grad()
    def flush(self) -> None:
        """Catch every row up to the current step (catch-up mode; a no-op in lazy mode)."""
        if self.catch_up and self.t > 0:
            self._catch_up(torch.arange(self.row_steps.numel(), device=self.row_steps.device), self.t)

    @torch.no_grad()
    def step(self, rows: RowSparseGrads, db_dec: torch.Tensor | None) -> None:
        self.t += 1
        u = rows.latents
        if u.numel():
            b1, b2 = self.betas
            if self.catch_up:
                self._catch_up(u, self.t - 1)
                self.row_steps[u] = self.t
                t = torch.full((u.numel(),), float(self.t), dtype=torch.float64, device=u.device)
            else:
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
                self._write(name, u, w - self.lr * (m / c1.view(shape)) / denom)
        if db_dec is not None:
            self.sae.b_dec.grad = db_dec.to(self.sae.b_dec.dtype)
            self.dense.step()
            self.sae.b_dec.grad = None

    def state_dict(self) -> dict:
        return {"lr": self.lr, "t": self.t, "catch_up": self.catch_up, "state": self.state,
                "row_steps": self.row_steps, "master": self.master, "dense": self.dense.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("catch_up", False) != self.catch_up:
            raise ConfigError(
                "this checkpoint's row-sparse Adam ran in the other mode (catch_up): resume with the same setting")
        self.lr, self.t = state["lr"], state["t"]
        for name, (m, v) in state["state"].items():
            self.state[name][0].copy_(m)
            self.state[name][1].copy_(v)
        self.row_steps.copy_(state["row_steps"])
        if self.master is not None and state["master"] is not None:
            for name, t in state["master"].items():
                self.master[name].copy_(t)
        self.dense.load_state_dict(state["dense"])
