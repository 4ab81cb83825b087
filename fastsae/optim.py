"""Optimizers for SAEs: dense Adam (torch's fused kernel where it has one), a row-sparse
Adam that touches only the latents that fired, fed by RowSparseGrads, and their compact
forms. `build_optimizer` picks one.

By default both keep their state in fp32, and for bf16 (or fp16) weights fp32 master
weights: an Adam step of lr·1 on a weight of size ~0.1 is below bf16's resolution (2^-8
relative), so updating bf16 weights in place would silently drop most steps. The master
is updated and then rounded into the module's weights. The compact forms
(fastsae.optim_state) keep the moments in bf16 or 8-bit blocks and replace the fp32 master
by a Kahan compensation buffer or by stochastic rounding: 4 bytes per parameter (bf16
weights, int8 moments, stochastic rounding) instead of 14. CompactAdam is the dense path's
compact optimizer; RowSparseAdam takes the same `state`/`master` options. Signum (sign of
the momentum, one state; signSGD with betas[0] = 0) is the other algorithm of both.

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

from . import ops
from .config import OPTIMIZERS
from .constraints import normalize_rows_, remove_parallel_component_
from .errors import ConfigError
from .optim_state import Moments, WeightRows, check_forms
from .sparse import RowSparseGrads

ALGORITHMS = ("adam", "signum")


def merge_row_sparse(a: RowSparseGrads, b: RowSparseGrads) -> RowSparseGrads:
    """a + b as one RowSparseGrads over the union of their latents."""
    ids = torch.cat([a.latents, b.latents])
    latents, inverse = torch.unique(ids, return_inverse=True)
    u, d = latents.numel(), a.W_dec.shape[1]
    ia, ib = inverse[:a.latents.numel()], inverse[a.latents.numel():]

    def add(x, y, shape):  # two scatters: concatenating the rows first would copy them all once more
        return x.new_zeros(shape).index_add_(0, ia, x).index_add_(0, ib, y.to(x.dtype))

    W_enc = add(a.W_enc.t(), b.W_enc.t(), (u, d)).t()
    return RowSparseGrads(latents, W_enc, add(a.b_enc, b.b_enc, (u,)), add(a.W_dec, b.W_dec, (u, d)), a.d_sae)


def copy_columns_(dst: torch.Tensor, latents: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """dst[:, latents] = cols, for a row-sparse gradient's encoder columns cols [d, u] (a
    transposed view of [u, d] rows). On CPU the extension scatters the rows straight into the
    columns: index_copy_ needs a transposed copy first, and the two cost the dense optimizer's
    step as much as Adam itself at d_sae = 4096."""
    op = ops.native("scatter_columns_", dst.device) if dst.is_contiguous() else None
    if op is None:
        return dst.index_copy_(1, latents, cols.to(dst.dtype).contiguous())
    op(dst, latents, cols.t().to(dst.dtype).contiguous())
    return dst


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
        self._grads: dict[str, torch.Tensor] | None = None  # step_row_sparse's buffers (where it needs them)
        self._rows_shapes_ok: bool | None = None  # _rows_kernel_applies' static part, once known
        self.native = True  # False: the plain-PyTorch bookkeeping around Adam (tests, benchmarks)
        self.direct = self._kernel_applies()  # False: through torch.optim.Adam.step() (tests, benchmarks)
        self.rows_fed = True  # False: step_row_sparse always fills gradient buffers (tests, benchmarks)
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

    def flush(self) -> None:
        """Nothing is pending in a dense optimizer (the row-sparse one's interface)."""

    @torch.no_grad()
    def step(self) -> None:
        for name, p in self.params.items():
            m = self.master[name]
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        for name in self.unit_norm_rows:
            m = self.master[name]
            if m.grad is not None:
                remove_parallel_component_(m.grad, m, native=self.native)
        self._apply()

    @torch.no_grad()
    def step_row_sparse(self, rows: RowSparseGrads, db_dec: torch.Tensor) -> None:
        """step() for an SAE's row-sparse gradient (the TopK family's explicit backward): the
        gradient is zero outside rows.latents, and the unit-norm projection touches those rows
        only. Dense Adam still moves every latent (its momentum). On CPU Adam is fed the rows
        directly where _rows_kernel_applies (no gradient buffers, torch's kernel's bits); else
        the gradient is written into fp32 buffers kept between steps (no [d_in, d_sae]
        allocation and scatter per step) for torch's fused kernel."""
        unit = "W_dec" in self.unit_norm_rows
        if self._rows_kernel_applies():
            self._fused_rows_step(rows, db_dec, unit)
            return
        if self._grads is None:
            self._grads = {n: torch.zeros_like(m, dtype=torch.float32) for n, m in self.master.items()}
        g, u = self._grads, rows.latents
        fill = self._native_grads_from_rows(unit)
        if fill is not None:  # one pass writes the three latent-indexed buffers (zeros elsewhere)
            fill(g["W_enc"], g["b_enc"], g["W_dec"], u, rows.W_enc.t(), rows.b_enc, rows.W_dec,
                 self.master["W_dec"] if unit else None)
            for name, buf in g.items():
                if name not in ("W_enc", "b_enc", "W_dec", "b_dec"):  # b_dec is copied below
                    buf.zero_()
        else:
            for buf in g.values():
                buf.zero_()
            copy_columns_(g["W_enc"], u, rows.W_enc)
            g["b_enc"].index_copy_(0, u, rows.b_enc.float())
            w_dec = rows.W_dec.to(torch.float32, copy=True)  # projected in place: not the caller's rows
            if unit:
                remove_parallel_component_(w_dec, self.master["W_dec"][u], native=self.native)
            g["W_dec"].index_copy_(0, u, w_dec)
        g["b_dec"].copy_(db_dec)
        self._apply([g[name] for name in self.master])

    def _rows_kernel_applies(self) -> bool:
        """Whether step_row_sparse may run the C++ op adam_rows_step_ (Adam fed the rows
        directly, no gradient buffers): torch's fused kernel called directly (`direct`), no
        weight decay, the four fp32 contiguous CPU masters W_enc, b_enc, W_dec, b_dec of sizes
        rows_fed_sizes allows, and the op matching torch's kernel bit for bit on this machine
        (checked once per process, _rows_kernel_matches_torch)."""
        if not (self.rows_fed and self.native and self.direct) or self.opt.param_groups[0]["weight_decay"] != 0:
            return False
        if self._rows_shapes_ok is None:
            m = self.master
            self._rows_shapes_ok = (
                tuple(m) == _ROW_PARAMS and set(self.unit_norm_rows) <= {"W_dec"}
                and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in m.values())
                and rows_fed_sizes(t.numel() for t in m.values())
                and ops.native("adam_rows_step_", "cpu") is not None)
        if not self._rows_shapes_ok:
            return False
        group = self.opt.param_groups[0]
        return _rows_kernel_matches_torch(*group["betas"], group["eps"])

    def _fused_rows_step(self, rows: RowSparseGrads, db_dec: torch.Tensor, unit: bool) -> None:
        """step_row_sparse's Adam (and unit-norm projection and renormalisation) in one C++
        pass over each parameter: what dense_grads_from_rows_, _adam and normalize_rows_ give."""
        masters = list(self.master.values())
        states = [self.opt.state[m] for m in masters]
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1)
        group = self.opt.param_groups[0]
        beta1, beta2 = group["betas"]
        ops.native("adam_rows_step_", "cpu")(
            masters, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], rows.latents,
            rows.W_enc.t(), rows.b_enc, rows.W_dec, db_dec.to(torch.float32).contiguous(),
            [float(t) for t in steps], float(group["lr"]), beta1, beta2, group["eps"], unit)
        self._finish(normalized=True)

    def _native_grads_from_rows(self, unit: bool):
        """The C++ op that builds step_row_sparse's buffers in one pass, where it applies
        (contiguous CPU buffers, and an fp32 decoder master when it projects), else None: the
        zero/scatter/gather/project sequence of torch ops costs three times the Adam step."""
        g = self._grads
        if not self.native or any(k not in g or not g[k].is_contiguous() for k in ("W_enc", "b_enc", "W_dec")):
            return None
        if unit and not self.master["W_dec"].is_contiguous():
            return None
        return ops.native("dense_grads_from_rows_", g["W_dec"].device)

    @torch.no_grad()
    def reset_latents(self, u: torch.Tensor, latent_dims: dict[str, int]) -> None:
        """Forget the moments of latents u (their weights were re-drawn outside the optimizer,
        e.g. resampled) and re-read those weights into the fp32 masters. latent_dims: the
        latent axis of each latent-indexed parameter (BaseSAE.latent_dims)."""
        for name, dim in latent_dims.items():
            master = self.master.get(name)
            if master is None:
                continue
            state = self.opt.state.get(master, {})
            for buf in ("exp_avg", "exp_avg_sq"):
                if buf in state:
                    state[buf].index_fill_(dim, u, 0)
            if master is not self.params[name]:
                master.index_copy_(dim, u, self.params[name].detach().index_select(dim, u).float())

    def _kernel_applies(self) -> bool:
        """Whether _adam may call torch's fused Adam kernel itself: one group of CPU tensors,
        fused, plain Adam (no amsgrad, maximize or decoupled decay)."""
        groups = self.opt.param_groups
        if len(groups) != 1 or not hasattr(torch, "_fused_adam_"):
            return False
        g = groups[0]
        return (bool(g.get("fused")) and all(p.device.type == "cpu" for p in g["params"]) and not g["amsgrad"]
                and not g["maximize"] and not g.get("decoupled_weight_decay", False))

    def _adam(self, grads: list[torch.Tensor]) -> None:
        """What torch.optim.Adam(fused=True).step() computes for these gradients (self.master's
        order), bit for bit: the same step-count increment and aten kernel with the same
        arguments, without the Python around them (grouping by device, hooks, checks), which
        costs as much as the kernel itself at half a million parameters."""
        group = self.opt.param_groups[0]
        masters = list(self.master.values())
        states = [self.opt.state[m] for m in masters]
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        torch._fused_adam_(masters, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], [],
                           steps, amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
                           weight_decay=group["weight_decay"], eps=group["eps"], maximize=False, grad_scale=None,
                           found_inf=None)

    def _apply(self, grads: list[torch.Tensor] | None = None) -> None:
        """Adam on the masters with `grads` (self.master's order) or their .grad, then the
        unit-norm rows and the copies back into low-precision parameters."""
        # (a master without .grad, which torch.optim would skip, takes torch.optim's path)
        if grads is None and self.direct and all(m.grad is not None for m in self.master.values()):
            grads = [m.grad for m in self.master.values()]
        if grads is not None and self.direct:
            self._adam(grads)
        elif grads is None:
            self.opt.step()
        else:
            for m, g in zip(self.master.values(), grads):
                m.grad = g
            self.opt.step()
            for m in self.master.values():
                m.grad = None
        self._finish()

    def _finish(self, normalized: bool = False) -> None:
        """After Adam: the unit-norm rows renormalised (unless the step did it), and the masters
        copied into low-precision parameters."""
        if not normalized:
            for name in self.unit_norm_rows:
                normalize_rows_(self.master[name], native=self.native)
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


_ROW_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def rows_fed_sizes(numels: Iterable[int]) -> bool:
    """Whether tensors of these sizes can take DenseAdam's step fed the rows (adam_rows_step_):
    each a multiple of 16 entries, where torch's fused kernel takes its vector body throughout
    (the last numel % 16 entries go through a scalar double path the op does not reproduce)."""
    return all(n % 16 == 0 for n in numels)


_rows_kernel_checks: dict[tuple[float, float, float], bool] = {}


def _rows_kernel_matches_torch(beta1: float, beta2: float, eps: float) -> bool:
    """Whether adam_rows_step_ gives the bits of dense_grads_from_rows_ + torch's fused Adam
    kernel + normalize_rows_ on this machine and torch build for these hyperparameters,
    checked once per process on small random tensors over steps 1, 2 and 1000 and two learning
    rates: the op reproduces the kernel's fp32 arithmetic, which depends on how torch was
    compiled (which multiply-adds are fused) and could differ elsewhere. On a mismatch
    DenseAdam keeps the buffered path."""
    key = (float(beta1), float(beta2), float(eps))
    if key not in _rows_kernel_checks:
        _rows_kernel_checks[key] = _check_rows_kernel(*key)
    return _rows_kernel_checks[key]


@torch.no_grad()
def _check_rows_kernel(beta1: float, beta2: float, eps: float) -> bool:
    if ops.native("adam_rows_step_", "cpu") is None:
        return False
    gen = torch.Generator().manual_seed(0)
    d, n, u = 32, 96, 40
    shapes = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
    init = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    init["W_dec"] = torch.nn.functional.normalize(init["W_dec"], dim=1)
    ok = True
    for unit in (False, True):
        pair = [DenseAdam({k: nn.Parameter(v.clone()) for k, v in init.items()}, lr=1e-3, betas=(beta1, beta2),
                          eps=eps, unit_norm_rows=("W_dec",) if unit else ()) for _ in range(2)]
        pair[1].rows_fed = False  # the reference: gradient buffers and torch's kernel
        for step, lr in ((1, 1e-3), (2, 3e-4), (1000, 1e-3)):
            lat = torch.randperm(n, generator=gen)[:u].sort().values
            scale = 10.0 ** torch.randint(-6, 2, (u, 1), generator=gen)  # gradients of several magnitudes
            grads = [torch.randn(u, d, generator=gen) * scale, torch.randn(u, generator=gen),
                     torch.randn(u, d, generator=gen) * scale]
            grads[0][0] = 0.0
            db = torch.randn(d, generator=gen)
            rows = RowSparseGrads(lat, grads[0].t(), grads[1], grads[2], n)
            for opt in pair:
                for st in opt.opt.state.values():
                    st["step"].fill_(step - 1)
                opt.set_lr(lr)
            pair[0]._fused_rows_step(rows, db, unit)
            pair[1].step_row_sparse(rows, db)
        a, b = pair
        ok = ok and all(torch.equal(a.master[k], b.master[k]) and
                        all(torch.equal(a.opt.state[a.master[k]][s], b.opt.state[b.master[k]][s])
                            for s in ("exp_avg", "exp_avg_sq")) for k in shapes)
    return ok


def _adam_rows(moments: list[Moments], rows, g: torch.Tensor, w: torch.Tensor, lr: float, betas, eps: float,
               c1, c2, gen) -> torch.Tensor:
    """One Adam step of rows w [r, C] (fp32) with gradient g: the moments are read, updated
    and stored back, and the new weights returned. The update uses the fp32 moments, before
    they are rounded for storage. c1, c2: bias corrections (scalars or [r, 1])."""
    b1, b2 = betas
    m_store, v_store = moments
    m = m_store.get(rows).mul_(b1).add_(g, alpha=1 - b1)
    v = v_store.get(rows).mul_(b2).addcmul_(g, g, value=1 - b2)
    m_store.put(rows, m, gen)
    v_store.put(rows, v, gen)
    return w - lr * (m / c1) / (v / c2).sqrt_().add_(eps)


def _signum_rows(moments: list[Moments], rows, g: torch.Tensor, w: torch.Tensor, lr: float, beta: float,
                 gen) -> torch.Tensor:
    """Signum: m = β·m + (1-β)·g, w -= lr·sign(m); with β = 0 (no stored moment) signSGD."""
    if not moments:
        return w - lr * g.sign()
    m = moments[0].get(rows).mul_(beta).add_(g, alpha=1 - beta)
    moments[0].put(rows, m, gen)
    return w - lr * m.sign()


def _moment_count(algorithm: str, betas) -> int:
    return 2 if algorithm == "adam" else (1 if betas[0] > 0 else 0)


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"optimizer algorithm {algorithm!r} is unknown: use one of {', '.join(ALGORITHMS)}")


def _generator(device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


class CompactAdam:
    """Dense Adam (or Signum) with compact moments and master-weight modes
    (fastsae.optim_state), the same driving interface as DenseAdam: step() after backward,
    or step_row_sparse(rows, db_dec) for the TopK family's explicit backward.

    Every parameter is seen as rows (a matrix as itself, a vector as one row) and stepped a
    chunk of about `chunk_elems` values at a time, so the fp32 working copies of gradients,
    moments and weights are one chunk, never a parameter; step_row_sparse builds each chunk's
    gradient from the touched rows and keeps no dense gradient buffer between steps.
    """

    def __init__(self, params: dict[str, nn.Parameter], lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 unit_norm_rows: Iterable[str] = (), state: str = "bf16", master: str = "stochastic",
                 algorithm: str = "adam", seed: int = 0, chunk_elems: int = 1 << 20):
        check_forms(state, master)
        _check_algorithm(algorithm)
        self.params = dict(params)
        self.unit_norm_rows = [n for n in unit_norm_rows if n in self.params]
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        self.algorithm, self.form, self.chunk_elems = algorithm, state, chunk_elems
        device = next(iter(self.params.values())).device
        self.gen = _generator(device, seed)
        self.steps = dict.fromkeys(self.params, 0)
        self.moments: dict[str, list[Moments]] = {}
        self.weights: dict[str, WeightRows] = {}
        for name, p in self.params.items():
            view = _as_rows
            rows, cols = view(p.detach()).shape
            form = "fp32" if state == "int8" and p.dim() < 2 else state  # vectors keep fp32 under int8
            self.moments[name] = [Moments(rows, cols, form, signed=i == 0, device=device)
                                  for i in range(_moment_count(algorithm, self.betas))]
            self.weights[name] = WeightRows(p, view, master, self.gen)

    def set_lr(self, lr: float) -> None:
        self.lr = lr

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def flush(self) -> None:
        """Nothing is pending in a dense optimizer (the row-sparse one's interface)."""

    @torch.no_grad()
    def step(self) -> None:
        for name, p in self.params.items():
            if p.grad is not None:
                grad = _as_rows(p.grad)
                self._update(name, lambda rows, grad=grad: grad[rows].float())

    @torch.no_grad()
    def step_row_sparse(self, rows: RowSparseGrads, db_dec: torch.Tensor | None) -> None:
        """step() for a gradient that is zero outside rows.latents (sorted): each chunk's
        dense gradient is built from the touched latents inside it."""
        u = rows.latents
        for name, p in self.params.items():
            if name == "W_enc":  # [d_in, d_sae]: a chunk is some input dims, all latents
                def grad(sl, p=p):
                    g = torch.zeros(sl.stop - sl.start, p.shape[1], dtype=torch.float32, device=p.device)
                    return copy_columns_(g, u, rows.W_enc[sl])
            elif name == "W_dec":  # [d_sae, d_in]: a chunk is a latent range
                def grad(sl, p=p):
                    lo, hi = (int(i) for i in torch.searchsorted(u, torch.tensor([sl.start, sl.stop],
                                                                                 device=u.device)))
                    g = torch.zeros(sl.stop - sl.start, p.shape[1], dtype=torch.float32, device=p.device)
                    return g.index_copy_(0, u[lo:hi] - sl.start, rows.W_dec[lo:hi].float())
            elif name == "b_enc":
                def grad(sl, p=p):
                    return torch.zeros(1, p.numel(), device=p.device).index_copy_(1, u, rows.b_enc.float()[None])
            elif name == "b_dec":
                def grad(sl, p=p):
                    return (db_dec.float() if db_dec is not None else torch.zeros(p.shape, device=p.device)).view(1, -1)
            else:
                raise ConfigError(f"step_row_sparse steps W_enc, b_enc, W_dec and b_dec, not {name!r}: "
                                  "use step() after backward for this SAE")
            self._update(name, grad)

    def _update(self, name: str, grad) -> None:
        """Step parameter `name` chunk by chunk; grad(slice of rows) -> fp32 gradient rows
        (possibly a view of .grad: never written)."""
        self.steps[name] += 1
        t, (b1, b2) = self.steps[name], self.betas
        weights, moments = self.weights[name], self.moments[name]
        n_rows, cols = weights.view(self.params[name].detach()).shape
        per = max(1, self.chunk_elems // max(cols, 1))
        unit = name in self.unit_norm_rows
        for a in range(0, n_rows, per):
            sl = slice(a, min(n_rows, a + per))
            g, w = grad(sl), weights.get(sl)
            if unit:
                g = remove_parallel_component_(g.clone(), w)
            if self.algorithm == "adam":
                w = _adam_rows(moments, sl, g, w, self.lr, self.betas, self.eps, 1 - b1 ** t, 1 - b2 ** t, self.gen)
            else:
                w = _signum_rows(moments, sl, g, w, self.lr, b1, self.gen)
            if unit:
                w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
            weights.put(sl, w)

    @torch.no_grad()
    def reset_latents(self, u: torch.Tensor, latent_dims: dict[str, int]) -> None:
        """DenseAdam.reset_latents: zero latents u's moments, re-read their weights."""
        for name, dim in latent_dims.items():
            if name not in self.params:
                continue
            axis = dim if self.params[name].dim() >= 2 else 1  # a vector is one row: its latents are columns
            cols = _as_rows(self.params[name].detach()).shape[1]
            for m in self.moments[name]:
                m.zero_(u, axis, chunk_rows=max(1, self.chunk_elems // max(cols, 1)))
            self.weights[name].refresh_(u, axis)

    def state_nbytes(self) -> dict[str, int]:
        """Bytes of the moments and of the master/compensation copies."""
        return {"moments": sum(m.nbytes for ms in self.moments.values() for m in ms),
                "masters": sum(w.nbytes for w in self.weights.values())}

    def state_dict(self) -> dict:
        return {"kind": "compact", "algorithm": self.algorithm, "lr": self.lr, "steps": dict(self.steps),
                "moments": {n: [m.state_dict() for m in ms] for n, ms in self.moments.items()},
                "weights": {n: w.state_dict() for n, w in self.weights.items()}, "rng": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "compact" or state["algorithm"] != self.algorithm:
            raise ConfigError("this checkpoint's optimizer is not this run's (a different optimizer or state "
                              "form): resume with the optimizer settings it was saved with")
        self.lr, self.steps = state["lr"], dict(state["steps"])
        for n, ms in self.moments.items():
            for m, saved in zip(ms, state["moments"][n]):
                m.load_state_dict(saved)
        for n, w in self.weights.items():
            w.load_state_dict(state["weights"][n])
        self.gen.set_state(state["rng"])


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A parameter as rows: a matrix itself, a vector (or scalar) one row."""
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


class RowSparseAdam:
    """Adam (or Signum) over an SAE's latent-indexed parameters (W_enc columns, b_enc, W_dec
    rows) that reads and writes only the latents in each step's RowSparseGrads; see the
    module docstring for its two modes. b_dec gets ordinary dense Adam (or Signum).

    step(rows, db_dec): rows = the RowSparseGrads of ops "topk_sae_backward"(row_sparse=True).
    flush(): apply every latent's pending momentum (catch-up mode), e.g. before saving the
    final weights.

    state / master: the moments' form and the master-weight mode (fastsae.optim_state). The
    state is latent-major (row j of every [d_sae, d_in] store belongs to latent j, W_enc's
    transposed), so a step gathers and scatters whole rows, and 8-bit blocks never straddle
    two latents: a step re-quantises the fired latents' blocks only.
    algorithm="signum": m = β1·m + (1-β1)·g, w -= lr·sign(m) on the fired latents only (lazy;
    catch_up does not apply: dense Signum would keep moving a silent latent along sign(m)
    until m underflows). With betas[0] = 0 it is signSGD and keeps no state at all.
    """

    LATENT_PARAMS = ("W_enc", "b_enc", "W_dec")
    VIEWS = {"W_enc": lambda p: p.t(), "b_enc": lambda p: p.unsqueeze(1), "W_dec": lambda p: p}

    def __init__(self, sae, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, unit_norm_decoder: bool = True,
                 catch_up: bool = True, catch_up_horizon: int = 128, chunk_elems: int = 1 << 20,
                 state: str = "fp32", master: str = "fp32", algorithm: str = "adam", seed: int = 0):
        names = {n for n, _ in sae.named_parameters()}
        extra = sorted(names - set(self.LATENT_PARAMS) - {"b_dec"})
        if extra:
            raise ConfigError(
                f"row-sparse Adam handles W_enc, b_enc, W_dec and b_dec, but this {type(sae).__name__} "
                f"also trains {extra}: use optimizer='adam' for it"
            )
        check_forms(state, master)
        _check_algorithm(algorithm)
        self.sae = sae
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        self.unit_norm_decoder = unit_norm_decoder
        self.algorithm, self.form = algorithm, state
        self.catch_up = catch_up and algorithm == "adam"
        self.horizon, self.chunk_elems = catch_up_horizon, chunk_elems
        self.t = 0  # global steps taken
        n = sae.d_sae
        dev = sae.device
        self.gen = _generator(dev, seed)
        self.moments: dict[str, list[Moments]] = {}
        self.weights: dict[str, WeightRows] = {}
        for name in self.LATENT_PARAMS:
            p = getattr(sae, name)
            cols = self.VIEWS[name](p.detach()).shape[1]
            self.moments[name] = [Moments(n, cols, state, signed=i == 0, device=dev)
                                  for i in range(_moment_count(algorithm, self.betas))]
            self.weights[name] = WeightRows(p, self.VIEWS[name], master, self.gen)
        # catch-up mode: the global step each row is up to date with; lazy mode: its update count
        self.row_steps = torch.zeros(n, dtype=torch.int64, device=dev)
        b_dec = {"b_dec": sae.b_dec}
        if state == "fp32" and master == "fp32" and algorithm == "adam":
            self.dense = DenseAdam(b_dec, lr=lr, betas=betas, eps=eps)
        else:
            self.dense = CompactAdam(b_dec, lr, betas, eps, state=state, master=master, algorithm=algorithm,
                                     seed=seed + 1)

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        self.dense.set_lr(lr)

    def zero_grad(self) -> None:
        self.dense.zero_grad()

    def _rows(self, name: str, u: torch.Tensor) -> torch.Tensor:
        """Current fp32 values of parameter `name` for latents u, latent-major [u, C]."""
        return self.weights[name].get(u)

    def _write(self, name: str, u: torch.Tensor, rows: torch.Tensor) -> None:
        if name == "W_dec" and self.unit_norm_decoder:
            rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.weights[name].put(u, rows)

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
        per = self._rows_per_chunk()
        for a in range(0, u.numel(), per):
            uu, L = u[a:a + per], last[a:a + per]
            gap = upto - L
            S = self._momentum_factor(L, gap).unsqueeze(1)
            d1, d2 = (b1 ** gap.double()).float().unsqueeze(1), (b2 ** gap.double()).float().unsqueeze(1)
            for name, (m_store, v_store) in self.moments.items():
                m, v = m_store.get(uu), v_store.get(uu)
                step = torch.where(v > 0, m / v.sqrt().clamp_min(1e-30), torch.zeros_like(m))
                self._write(name, uu, self._rows(name, uu) - S * step)
                m_store.scale_rows_(uu, d1, self.gen)
                v_store.scale_rows_(uu, d2, self.gen)
            self.row_steps[uu] = upto

    @torch.no_grad()
    def flush(self) -> None:
        """Catch every row up to the current step (catch-up mode; a no-op in lazy mode)."""
        if self.catch_up and self.t > 0:
            self._catch_up(torch.arange(self.row_steps.numel(), device=self.row_steps.device), self.t)

    @torch.no_grad()
    def step(self, rows: RowSparseGrads, db_dec: torch.Tensor | None) -> None:
        self.t += 1
        per = self._rows_per_chunk()
        for a in range(0, rows.latents.numel(), per):  # fp32 working copies of one chunk of rows at a time
            self._step_rows(rows.latents[a:a + per], {"W_enc": rows.W_enc[:, a:a + per].t(),
                                                      "b_enc": rows.b_enc[a:a + per].unsqueeze(1),
                                                      "W_dec": rows.W_dec[a:a + per]})
        if db_dec is not None:
            self.sae.b_dec.grad = db_dec.to(self.sae.b_dec.dtype)
            self.dense.step()
            self.sae.b_dec.grad = None

    @torch.no_grad()
    def reset_latents(self, u: torch.Tensor, latent_dims: dict[str, int] | None = None) -> None:
        """Forget latents u's moments (their weights were re-drawn, e.g. resampled): no catch-up
        for them, fresh moments, masters re-read from the weights. The state is latent-major,
        so latent_dims is not needed."""
        for name in self.LATENT_PARAMS:
            for m in self.moments[name]:
                m.zero_(u, 0)
            self.weights[name].refresh_(u, 0)
        self.row_steps[u] = self.t if self.catch_up else 0

    def _rows_per_chunk(self) -> int:
        return max(1, self.chunk_elems // self.sae.d_in)

    def _step_rows(self, u: torch.Tensor, grads: dict[str, torch.Tensor]) -> None:
        b1, b2 = self.betas
        if self.catch_up:
            self._catch_up(u, self.t - 1)
            self.row_steps[u] = self.t
            t = torch.full((u.numel(),), float(self.t), dtype=torch.float64, device=u.device)
        else:
            self.row_steps[u] += 1
            t = self.row_steps[u].double()
        c1 = (1 - b1 ** t).float().unsqueeze(1)
        c2 = (1 - b2 ** t).float().unsqueeze(1)
        for name, g in grads.items():
            g = g.float()
            w = self._rows(name, u)
            if name == "W_dec" and self.unit_norm_decoder:
                g = remove_parallel_component_(g.clone(), w)
            if self.algorithm == "adam":
                w = _adam_rows(self.moments[name], u, g, w, self.lr, self.betas, self.eps, c1, c2, self.gen)
            else:
                w = _signum_rows(self.moments[name], u, g, w, self.lr, b1, self.gen)
            self._write(name, u, w)

    def state_nbytes(self) -> dict[str, int]:
        """Bytes of the moments (with the per-row step counts) and of the master/compensation
        copies, b_dec's optimizer included."""
        if isinstance(self.dense, CompactAdam):
            dense = self.dense.state_nbytes()
        else:
            st = self.dense.opt.state.values()
            dense = {"moments": sum(t.numel() * t.element_size() for s in st for k, t in s.items() if k != "step"),
                     "masters": sum(m.numel() * m.element_size() for n, m in self.dense.master.items()
                                    if m is not self.dense.params[n])}
        return {"moments": sum(m.nbytes for ms in self.moments.values() for m in ms)
                + self.row_steps.numel() * 8 + dense["moments"],
                "masters": sum(w.nbytes for w in self.weights.values()) + dense["masters"]}

    def state_dict(self) -> dict:
        return {"lr": self.lr, "t": self.t, "catch_up": self.catch_up, "algorithm": self.algorithm,
                "moments": {n: [m.state_dict() for m in ms] for n, ms in self.moments.items()},
                "weights": {n: w.state_dict() for n, w in self.weights.items()},
                "row_steps": self.row_steps, "rng": self.gen.get_state(), "dense": self.dense.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("algorithm", "adam") != self.algorithm:
            raise ConfigError(f"this checkpoint's row-sparse optimizer is {state.get('algorithm', 'adam')!r}, "
                              f"this run's is {self.algorithm!r}: resume with the same optimizer")
        if state.get("catch_up", False) != self.catch_up:
            raise ConfigError(
                "this checkpoint's row-sparse Adam ran in the other mode (catch_up): resume with the same setting")
        self.lr, self.t = state["lr"], state["t"]
        if "moments" in state:
            for name, ms in self.moments.items():
                for m, saved in zip(ms, state["moments"][name]):
                    m.load_state_dict(saved)
            for name, w in self.weights.items():
                w.load_state_dict(state["weights"][name])
            self.gen.set_state(state["rng"])
        else:  # the format before compact state: fp32 (m, v) pairs and optional fp32 masters
            for name, ms in self.moments.items():
                for m, saved in zip(ms, state["state"][name]):
                    m.load_state_dict(saved.reshape(m.shape))
            for name, w in self.weights.items():
                if w.master is not None and state["master"] is not None:
                    w.master.copy_(state["master"][name].reshape(w.master.shape))
        self.row_steps.copy_(state["row_steps"])
        self.dense.load_state_dict(state["dense"])




def build_optimizer(sae, *, name: str = "adam", lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                    state: str = "fp32", master: str = "fp32", unit_norm_decoder: bool = True,
                    catch_up: bool = True, seed: int = 0):
    """The optimizer a training loop drives for `sae` (an SAE, or a ShardedSAE's local_view()).

    name: "adam" / "signum" (dense: step() after backward, or step_row_sparse(rows, db_dec))
        or "row_sparse_adam" / "row_sparse_signum" (TopK family: step(rows, db_dec), flush()).
    state: moments in "fp32", "bf16" or "int8" (8-bit blockwise); master: for bf16/fp16
        weights, "fp32" copies, "kahan" compensation, "stochastic" rounding or "none"
        (fastsae.optim_state). Dense fp32 Adam with fp32 masters is torch's fused Adam.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer {name!r} is unknown: use one of {', '.join(OPTIMIZERS)}")
    check_forms(state, master)
    dtype = getattr(sae, "dtype", None) or next(p for _, p in sae.named_parameters()).dtype
    if master != "fp32" and dtype in (torch.float32, torch.float64):
        raise ConfigError(f"master={master!r} rounds bfloat16/float16 weights, but these are {dtype} (their own "
                          "master): use master='fp32', or train in bfloat16")
    algorithm = "signum" if name.endswith("signum") else "adam"
    if name.startswith("row_sparse"):
        return RowSparseAdam(sae, lr, betas, eps, unit_norm_decoder=unit_norm_decoder, catch_up=catch_up,
                             state=state, master=master, algorithm=algorithm, seed=seed)
    params = dict(sae.named_parameters())
    unit = ("W_dec",) if unit_norm_decoder else ()
    if algorithm == "adam" and state == "fp32" and master == "fp32":
        return DenseAdam(params, lr, betas, eps, unit_norm_rows=unit)
    return CompactAdam(params, lr, betas, eps, unit_norm_rows=unit, state=state, master=master,
                       algorithm=algorithm, seed=seed)
