"""Where the optimizers keep what they keep: moments in fp32, bf16 or 8-bit blockwise form,
and a parameter's weights read and written in fp32 under a master-weight mode.

Both see a tensor as rows [R, C] and read or write whole rows (an index tensor or a slice):
the row-sparse optimizer passes latent-major views (row j = latent j), the dense one the
parameter's own rows.

Moment forms ("state"):
  fp32  4 bytes per value.
  bf16  2 bytes; written with stochastic rounding, since a second moment decaying by
        β2 = 0.999 per step changes by less than half a bf16 ulp (2^-9) and would never
        decay under round-to-nearest.
  int8  1 byte + 4 bytes per block of <= 256 values in a row (fastsae.quantize); applies to
        matrices, while vectors (biases: d_sae or d_in values) keep fp32 moments.
Master-weight modes ("master"), for bf16/fp16 weights (fp32 weights are their own master):
  fp32        an fp32 copy of the weights is updated and rounded into them (4 bytes/param).
  kahan       a compensation buffer in the weights' dtype holds what rounding dropped; the
              next write adds it back (2 bytes/param for bf16, ~16 significant bits).
  stochastic  the new fp32 value is rounded to the weights' dtype at random, unbiased (0 bytes).
  none        round to nearest (0 bytes); steps below half an ulp are lost (lr·1 on a bf16
              weight of ~0.1 is below its resolution), so it is for comparison only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import ConfigError
from .quantize import BLOCK, block_layout, dequantize_rows, quantize_rows, round_stochastic

STATE_FORMS = ("fp32", "bf16", "int8")
MASTER_MODES = ("fp32", "kahan", "stochastic", "none")

Rows = torch.Tensor | slice


def check_forms(state: str, master: str) -> None:
    if state not in STATE_FORMS:
        raise ConfigError(f"optimizer state {state!r} is unknown: use one of {', '.join(STATE_FORMS)}")
    if master not in MASTER_MODES:
        raise ConfigError(f"master weights {master!r} are unknown: use one of {', '.join(MASTER_MODES)}")


class Moments:
    """One moment (first: signed, second: unsigned) of a [R, C] tensor in `form`."""

    def __init__(self, rows: int, cols: int, form: str, signed: bool, device, block: int = BLOCK):
        if form == "int8" and cols == 1:
            form = "fp32"  # a vector seen as [n, 1]: one block per value would save nothing
        self.form, self.signed, self.shape = form, signed, (rows, cols)
        if form == "int8":
            nb, _ = block_layout(cols, block)
            self.codes = torch.zeros(rows, cols, dtype=torch.uint8, device=device)
            self.scales = torch.zeros(rows, nb, dtype=torch.float32, device=device)
            self.block = block
        else:
            self.values = torch.zeros(rows, cols, dtype=torch.float32 if form == "fp32" else torch.bfloat16,
                                      device=device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scales] if self.form == "int8" else [self.values]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def get(self, rows: Rows) -> torch.Tensor:
        """fp32 copy of the given rows."""
        if self.form == "int8":
            return dequantize_rows(self.codes[rows], self.scales[rows], self.signed)
        return _fp32_copy(self.values, rows)

    def put(self, rows: Rows, vals: torch.Tensor, gen: torch.Generator | None) -> None:
        if self.form == "int8":
            codes, scales = quantize_rows(vals, self.signed, self.block)
            _assign(self.codes, rows, codes)
            _assign(self.scales, rows, scales)
        elif self.form == "bf16":
            _assign(self.values, rows, round_stochastic(vals, torch.bfloat16, gen))
        else:
            _assign(self.values, rows, vals)

    def scale_rows_(self, rows: torch.Tensor, factor: torch.Tensor, gen: torch.Generator | None) -> None:
        """Multiply the given rows by factor [r, 1] (> 0): 8-bit rows by their block scales
        alone (the codes are scale-free), so the decay is exact and nothing is re-quantised."""
        if self.form == "int8":
            self.scales.index_copy_(0, rows, self.scales[rows] * factor)
        else:
            self.put(rows, self.get(rows) * factor, gen)

    def zero_(self, ids: torch.Tensor, axis: int, chunk_rows: int = 4096) -> None:
        """Zero rows (axis 0) or columns (axis 1) `ids`; columns a chunk of rows at a time."""
        if axis == 0:
            self.put(ids, torch.zeros(ids.numel(), self.shape[1], device=ids.device), None)
            return
        for a in range(0, self.shape[0], chunk_rows):
            sl = slice(a, min(self.shape[0], a + chunk_rows))
            vals = self.get(sl)
            vals[:, ids] = 0
            self.put(sl, vals, None)

    def state_dict(self) -> dict:
        return {"form": self.form, "tensors": self.tensors()}

    def load_state_dict(self, state) -> None:
        if isinstance(state, torch.Tensor):  # a checkpoint from before the compact forms: fp32
            state = {"form": "fp32", "tensors": [state]}
        if state["form"] != self.form:
            raise ConfigError(f"this checkpoint's optimizer moments are {state['form']}, this run keeps them "
                              f"{self.form}: resume with the same optimizer state form")
        for mine, saved in zip(self.tensors(), state["tensors"]):
            mine.copy_(saved)


def _fp32_copy(t: torch.Tensor, rows: Rows) -> torch.Tensor:
    """t[rows] as a new fp32 tensor (a slice of an fp32 tensor is a view: copy it)."""
    sel = t[rows]
    return sel.clone() if isinstance(rows, slice) and sel.dtype == torch.float32 else sel.float()


def _assign(dst: torch.Tensor, rows: Rows, src: torch.Tensor) -> None:
    if isinstance(rows, slice):
        dst[rows].copy_(src)
    else:
        dst.index_copy_(0, rows, src.to(dst.dtype))


class WeightRows:
    """fp32 reads and writes of a parameter's rows through `view` (a [R, C] view of it),
    under a master-weight mode; `gen` drives stochastic rounding."""

    def __init__(self, param: torch.Tensor, view: Callable[[torch.Tensor], torch.Tensor], mode: str,
                 gen: torch.Generator | None):
        self.param, self.view, self.gen = param, view, gen
        low = param.dtype not in (torch.float32, torch.float64)
        self.mode = mode if low else "exact"
        w = view(param.detach())
        self.master = w.float().contiguous() if self.mode == "fp32" else None
        self.comp = torch.zeros(w.shape, dtype=param.dtype, device=param.device) if self.mode == "kahan" else None

    def extra_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.master, self.comp) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.extra_tensors())

    def get(self, rows: Rows) -> torch.Tensor:
        if self.master is not None:
            return _fp32_copy(self.master, rows)
        w = _fp32_copy(self.view(self.param.detach()), rows)
        return w.add_(self.comp[rows].float()) if self.comp is not None else w

    def put(self, rows: Rows, vals: torch.Tensor) -> None:
        dst = self.view(self.param.detach())
        if self.mode == "stochastic":
            _assign(dst, rows, round_stochastic(vals, self.param.dtype, self.gen))
            return
        low = vals.to(self.param.dtype)
        if self.master is not None:
            _assign(self.master, rows, vals)
        if self.comp is not None:
            _assign(self.comp, rows, (vals - low.float()).to(self.param.dtype))
        _assign(dst, rows, low)

    @torch.no_grad()
    def refresh_(self, ids: torch.Tensor, axis: int) -> None:
        """Re-read rows (axis 0) or columns (axis 1) `ids` from the parameter, after it was
        written outside the optimizer (a resampled latent): its master copy, no compensation."""
        if self.master is not None:
            w = self.view(self.param.detach())
            self.master.index_copy_(axis, ids, w.index_select(axis, ids).float())
        if self.comp is not None:
            self.comp.index_fill_(axis, ids, 0)

    def state_dict(self) -> dict:
        return {"mode": self.mode, "master": self.master, "comp": self.comp}

    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.mode:
            raise ConfigError(f"this checkpoint's weights were updated with master={state['mode']!r}, this run "
                              f"uses {self.mode!r}: resume with the same master-weight mode")
        for mine, saved in ((self.master, state["master"]), (self.comp, state["comp"])):
            if mine is not None:
                mine.copy_(saved)
