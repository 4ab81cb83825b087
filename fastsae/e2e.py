"""End-to-end SAE training (Braun et al. 2024, "Identifying Functionally Important Features with
End-to-End Sparse Dictionary Learning"): the SAE is trained to keep the model's output, not to
reconstruct its input.

    source = E2ESource(model, "transformer.h.6", TokenStream(tokenizer=tok, text_files=["corpus.txt"],
                                                             batch_size=8))
    cfg = TrainConfig(sae=SAEConfig(d_in=768, d_sae=24576, k=32), batch_size=8,
                      extra={"e2e": {"downstream": ["transformer.h.8", "transformer.h.10"]}})
    E2ETrainer(cfg, source).fit()

Each step runs the frozen model twice on a batch of sequences: clean (no gradients), then with the
SAE spliced in at the hook (its reconstruction replaces the activation at the evaluated positions:
not padding, not special tokens, as `fastsae eval` scores). The loss is

    kl_coefficient · KL(P_clean ‖ P_spliced)                       mean over the evaluated positions
    + downstream_coefficient / |D| · Σ_{h ∈ D} MSE(a_h^spliced, a_h^clean)   "e2e + downstream"

with the MSE a mean over evaluated positions and dimensions at each later hook point h in D (as
Braun et al.'s e2e_sae: F.kl_div with batchmean, F.mse_loss, the downstream coefficient split
evenly over the hook points). The KL is the one `fastsae eval`'s KL score uses.

The gradient reaches the SAE through the model and then takes the TopK family's sparse backward:
the spliced hook runs `select` + `decode_selection` as one autograd node whose backward hands
∂L/∂x̂ to `sae.sparse_backward(x2, sel, grad)` (row-sparse gradients of the latents that fired), so
no [tokens, d_sae] tensor is stored and the Trainer's optimizers step as they do on reconstruction.
Nothing upstream of the hook is differentiated (the model is frozen and its input needs no
gradient). The Trainer's AuxK (on the reconstruction residual at the hook), schedules, tracking,
run folder and checkpoints are reused; TrainConfig.batch_size counts sequences here, and
the settings live in TrainConfig.extra["e2e"] (kept on resume).

With the SAE sharded (a fastsae.distributed layout with replicas = 1), every rank runs the model
on the same sequences and holds its slice of the SAE; the forward's top-k merge and the backward
are the sparse path's collectives, so the result is the single-process one. The model's forward
must then be deterministic across ranks (it is on CPU, and on identical GPUs without atomics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data import ActivationSource
from .errors import ConfigError, InputError
from .metrics import fired_latents
from .sae import BaseSAE, reconstruction_terms
from .sparse import RowSparseGrads, Selection
from .streaming import TokenStream, model_digest
from .tracking import Tracker
from .trainer import TrainConfig, Trainer

SETTINGS = {"kl_coefficient": 1.0, "downstream": [], "downstream_coefficient": 1.0}


def e2e_settings(cfg: TrainConfig) -> dict:
    """TrainConfig.extra["e2e"] completed with the defaults (SETTINGS), checked."""
    given = dict(cfg.extra.get("e2e", {}))
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"unknown end-to-end setting(s) {unknown}: known ones are {sorted(SETTINGS)}")
    s = {**SETTINGS, **given}
    if isinstance(s["downstream"], str):
        s["downstream"] = [s["downstream"]]
    for key in ("kl_coefficient", "downstream_coefficient"):
        if not isinstance(s[key], (int, float)) or s[key] < 0:
            raise ConfigError(f"{key} must be a number >= 0, got {s[key]!r}")
    if s["kl_coefficient"] == 0 and not (s["downstream"] and s["downstream_coefficient"] > 0):
        raise ConfigError("the end-to-end loss is empty: set kl_coefficient > 0, or downstream hook points with "
                          "downstream_coefficient > 0")
    return s


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def _recording(model: torch.nn.Module, hooks: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """{hook: the module's output [B, S, d]} of the forward passes run while open."""
    got: dict[str, torch.Tensor] = {}
    handles = []

    def make(hook):
        def on_output(_mod, _inp, out):
            got[hook] = _first(out)
        return on_output

    try:
        for hook in hooks:
            handles.append(model.get_submodule(hook).register_forward_hook(make(hook)))
        yield got
    finally:
        for h in handles:
            h.remove()


def _wide(logits: torch.Tensor) -> torch.Tensor:
    from .evaluate import _wide as wide  # float32 at least, float64 kept: evaluate's choice

    return wide(logits)


@dataclass
class CleanPass:
    """One batch's clean run: the tokens, the evaluated positions `valid` [B, S], the hook's
    activations there x [N, d], the log-probabilities and probabilities there [N, vocab], and
    the downstream hook points' activations there."""

    ids: torch.Tensor
    mask: torch.Tensor | None
    valid: torch.Tensor
    x: torch.Tensor
    logp: torch.Tensor
    p: torch.Tensor
    downstream: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def clean_pass(model: torch.nn.Module, hook: str, ids: torch.Tensor, mask: torch.Tensor | None,
               valid: torch.Tensor, downstream: Sequence[str] = ()) -> CleanPass:
    """Run `model` (with an LM head) on a batch without the SAE (names already resolved)."""
    from .model import _model_device

    device = _model_device(model)
    ids, valid = ids.to(device), valid.to(device)
    mask = None if mask is None else mask.to(device)
    with _recording(model, [hook, *downstream]) as got:
        logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(_wide(logits[valid]), -1)
    return CleanPass(ids, mask, valid, got[hook][valid], logp, logp.exp(), {h: got[h][valid] for h in downstream})


class _Holder:
    """What the spliced SAE saw and produced in one forward pass, and its sparse backward's result."""

    x2: torch.Tensor
    sel: Selection
    y: torch.Tensor
    grads: tuple[RowSparseGrads, torch.Tensor] | None = None


class _SparseDecode(torch.autograd.Function):
    """x̂ = decode_selection(select(x2)) as one autograd node: its backward hands ∂L/∂x̂ to the
    SAE's sparse backward and keeps the row-sparse gradients in the holder (no gradient flows
    to x2 or to the SAE's parameters through autograd). `anchor` is a scalar that requires grad,
    so that the node is part of the graph although nothing else it takes does."""

    @staticmethod
    def forward(ctx, anchor, x2, sae, holder):
        sel = sae.select(x2, train=True)
        y = sae.decode_selection(sel)
        holder.x2, holder.sel, holder.y = x2, sel, y.detach()
        ctx.sae, ctx.holder = sae, holder
        return y

    @staticmethod
    def backward(ctx, grad_y):
        h = ctx.holder
        h.grads = ctx.sae.sparse_backward(h.x2, h.sel, grad_y.contiguous())
        return None, None, None, None


class _SplicedSAE(torch.nn.Module):
    """What the spliced hook point calls (fastsae.model.splice): the SAE's prepare, the sparse
    forward as one autograd node, and the map back to the input's scale."""

    def __init__(self, sae: BaseSAE, holder: _Holder):
        super().__init__()
        self.sae, self.holder, self.d_in = sae, holder, sae.d_in
        self.anchor = torch.zeros((), requires_grad=True)

    @property
    def device(self):
        return self.sae.device

    @property
    def dtype(self):
        return self.sae.dtype

    def encode(self, x):
        return self.sae.encode(x)

    def decode(self, acts):
        return self.sae.decode(acts)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        x2, restore = self.sae.prepare(rows)
        return restore(_SparseDecode.apply(self.anchor, x2, self.sae, self.holder))


@dataclass
class E2ELoss:
    """The spliced pass of one batch: the loss (backpropagate with backward()), its terms, and
    what the SAE saw (x2, normalised), selected (sel) and reconstructed (y, normalised)."""

    loss: torch.Tensor
    kl: float
    downstream: float
    holder: _Holder

    @property
    def x2(self) -> torch.Tensor:
        return self.holder.x2

    @property
    def sel(self) -> Selection:
        return self.holder.sel

    @property
    def y(self) -> torch.Tensor:
        return self.holder.y

    def backward(self, sae: BaseSAE) -> tuple[RowSparseGrads, torch.Tensor]:
        """loss.backward(), then the SAE's row-sparse gradients and db_dec (every shard calls it)."""
        if self.loss.requires_grad:
            self.loss.backward()
        if self.holder.grads is None:  # the loss does not depend on x̂ (on any shard): zero gradients
            self.holder.grads = sae.sparse_backward(self.x2, self.sel, torch.zeros_like(self.y))
        return self.holder.grads


def e2e_loss(model: torch.nn.Module, sae: BaseSAE, hook: str, clean: CleanPass, kl_coefficient: float = 1.0,
             downstream_coefficient: float = 1.0) -> E2ELoss:
    """Run `model` with `sae` spliced at `hook` (a resolved name) at clean.valid's positions and
    score it against the clean pass: the module docstring's loss."""
    from .model import splice

    holder = _Holder()
    downstream = list(clean.downstream)
    with splice(model, {hook: _SplicedSAE(sae, holder)}, mask=clean.valid) as sp, \
            _recording(model, downstream) as got:
        logits = model(input_ids=clean.ids, attention_mask=clean.mask).logits
    if sp.calls.get(hook) != 1:
        raise ConfigError(f"module {hook!r} ran {sp.calls.get(hook, 0)} times in one forward pass: pick a hook "
                          "point that runs once")
    n = max(int(clean.valid.sum()), 1)
    logp = torch.log_softmax(_wide(logits[clean.valid]), -1)
    del logits
    kl = (clean.p * (clean.logp - logp)).sum() / n  # KL(P_clean ‖ P_spliced) per evaluated position
    loss = kl_coefficient * kl
    ds = torch.zeros((), dtype=kl.dtype, device=kl.device)
    for h in downstream:
        a = got[h]
        if not a.requires_grad:
            raise ConfigError(f"downstream hook point {h!r} runs before {hook!r} (its activations do not depend on "
                              "the SAE): name hook points after it")
        ds = ds + F.mse_loss(_wide(a[clean.valid]), _wide(clean.downstream[h])) / len(downstream)
    if downstream:
        loss = loss + downstream_coefficient * ds
    return E2ELoss(loss, float(kl.detach()), float(ds.detach()), holder)


# ---------------------------------------------------------------------- data


class E2ESource(ActivationSource):
    """Token batches for end-to-end training: (input_ids, attention_mask | None) of
    tokens.batch_size sequences in document order, epoch after epoch (or `epochs` passes), with
    its position for resume ({epoch, doc}). sample() gives activation rows at the hook (the
    trainer initialises the SAE from them); valid() the positions trained on."""

    def __init__(self, model: torch.nn.Module, hook: str, tokens: TokenStream, exclude_special: bool = True,
                 epochs: int | None = None):
        from .model import check_context_length, resolve_hook, special_token_ids

        self.model = model.eval()
        self.hook = resolve_hook(model, hook)
        self.tokens = tokens.with_context_length(check_context_length(model, tokens.context_length))
        tok = tokens.tokenizer
        self.special = special_token_ids(tok) if exclude_special and tok is not None else None
        self.exclude_special, self.epochs = exclude_special, epochs
        self.epoch, self.doc = 0, 0
        first = next(self.tokens.batches(0), None)
        if first is None:
            raise InputError("the documents are empty: pass text to read")
        self.d_in = int(self._rows(*first).shape[-1])

    def valid(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        from .model import valid_positions

        return valid_positions(ids, mask, self.special)

    def _rows(self, ids, mask) -> torch.Tensor:
        from .model import capture

        x = capture(self.model, [self.hook], ids, mask)[self.hook]
        return x[self.valid(ids, mask).to(x.device)]

    def __iter__(self):
        while self.epochs is None or self.epoch < self.epochs:
            for ids, mask in self.tokens.batches(self.doc):
                self.doc += ids.shape[0]
                yield ids, mask
            if self.doc == 0:
                raise InputError("the documents are empty: pass text to read")
            self.epoch, self.doc = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "doc": self.doc}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.doc = state["epoch"], state["doc"]

    def sample(self, n_rows: int) -> torch.Tensor:
        state, rows, got = self.state_dict(), [], 0
        for ids, mask in self:
            rows.append(self._rows(ids, mask).float().cpu())
            got += rows[-1].shape[0]
            if got >= n_rows:
                break
        self.load_state_dict(state)
        if not got:
            raise InputError("no activations: the documents hold only padding and special tokens")
        return torch.cat(rows)[:n_rows]

    def fingerprint(self) -> dict:
        return {"kind": "tokens", "model_weights": model_digest(self.model), "hook": self.hook,
                **self.tokens.fingerprint(), "exclude_special": self.exclude_special}


# ---------------------------------------------------------------------- the trainer


class _E2ETracker(Tracker):
    """The Trainer's tracker, also logging the window means of the loss's two terms."""

    TERMS = ("kl", "downstream")

    @classmethod
    def like(cls, t: Tracker) -> _E2ETracker:
        return cls(t.d_sae, t.tokens_since_fired.device, t.log_path, t.log_every, t.dead_tokens, t.dense_threshold,
                   console=t.console)

    def _reset_window(self) -> None:
        super()._reset_window()
        self.term_sums = dict.fromkeys(self.TERMS, 0.0)

    def record(self, fired, n_tokens, scalars, x_hat, x) -> None:
        super().record(fired, n_tokens, scalars, x_hat, x)
        for k in self.TERMS:
            self.term_sums[k] += float(scalars.get(k, 0.0))

    def flush(self, step, total_tokens, extra=None):
        if self.steps_in_window == 0:
            return None
        terms = {k: v / self.steps_in_window for k, v in self.term_sums.items()}
        return super().flush(step, total_tokens, {**terms, **(extra or {})})

    def state_dict(self) -> dict:
        return {**super().state_dict(), "term_sums": dict(self.term_sums)}

    def load_state_dict(self, s: dict) -> None:
        super().load_state_dict(s)
        self.term_sums = dict(s.get("term_sums", dict.fromkeys(self.TERMS, 0.0)))


class E2ETrainer(Trainer):
    """The Trainer with the end-to-end loss: `E2ETrainer(cfg, E2ESource(...)).fit()`, or
    `E2ETrainer.resume(out_dir, source)`. The recipe (optimizer, lr schedule, AuxK, unit-norm
    decoder, tracking, checkpoints) is the Trainer's; only the loss and so the gradient differ.
    TopK-family SAEs only (the sparse path); the model is frozen (requires_grad off)."""

    def __init__(self, cfg: TrainConfig, data, sae: BaseSAE | None = None, layout=None):
        if not isinstance(data, E2ESource):
            raise ConfigError("end-to-end training reads token batches: pass E2ESource(model, hook, tokens)")
        if not cfg.use_sparse_backward:
            raise ConfigError(f"end-to-end training takes the sparse path (architecture topk or batchtopk, "
                              f"sparse_backward not False), not {cfg.sae.architecture!r}")
        if cfg.sae.transcoder or cfg.sae.skip_connection or cfg.finetune_steps:
            raise ConfigError("end-to-end training trains a plain SAE (no transcoder, no skip connection) and has no "
                              "fine-tuning stage: drop those settings")
        self.settings = e2e_settings(cfg)
        super().__init__(cfg, data, sae=sae, layout=layout)
        if self.layout.replicas > 1:
            raise ConfigError("end-to-end training runs on one process or with the SAE sharded (replicas = 1); "
                              f"this layout has {self.layout.replicas} replicas")
        from .model import resolve_hook

        self.model, self.hook = data.model, data.hook
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.downstream = [resolve_hook(self.model, h) for h in self.settings["downstream"]]
        if self.hook in self.downstream:
            raise ConfigError(f"{self.hook!r} is the SAE's own hook point: downstream hook points come after it")
        self.tracker = _E2ETracker.like(self.tracker)
        self._clean: CleanPass | None = None

    def batch_stream(self):
        """The clean activations at the hook of each token batch (every rank runs the model on
        the same sequences); the batch's clean pass is kept for the step."""
        for ids, mask in self.source:
            self._clean = clean_pass(self.model, self.hook, ids, mask, self.source.valid(ids, mask), self.downstream)
            yield self._clean.x

    def _sparse_step(self, x: torch.Tensor, target: torch.Tensor | None, sf: float):
        sae, s = self.sae, self.settings
        out = e2e_loss(self.model, sae, self.hook, self._clean, s["kl_coefficient"], s["downstream_coefficient"])
        x2, y, sel = out.x2, out.y, out.sel
        with torch.no_grad():
            err, mse, fvu = reconstruction_terms(y, x2)
        aux, aux_rows = self._auxk(x2, err, self._auxk_dead())
        if not self._agree(bool(torch.isfinite(out.loss.detach() + aux)))[0]:
            return None
        self.step_row_sparse(*out.backward(sae), aux_rows)  # the Trainer's sparse update
        fired, l0 = fired_latents(sel.acts)
        loss = float(out.loss.detach()) + float(aux)
        scalars = {"loss": loss, "kl": out.kl, "downstream": out.downstream, "mse": float(mse), "fvu": float(fvu),
                   "l0": l0, "auxk": float(aux), "sparsity": 0.0}
        return scalars, y, x2, fired


__all__ = ["E2ESource", "E2ETrainer", "E2ELoss", "CleanPass", "clean_pass", "e2e_loss", "e2e_settings", "SETTINGS"]
