"""ShardedSAE: one SAE whose latents are split over the ranks of a replica group.

Each rank holds a contiguous latent slice [start, end): W_enc[:, start:end], b_enc[start:end],
W_dec[start:end] (and JumpReLU's threshold[start:end]); b_dec is replicated. One step:

    x_in = x - b_dec                   replicated; its gradient is summed over the shards
    TopK:      local top-k over the slice (the backend's fused op), candidates all-gathered,
               the global top-k picked from them: exact, since every global winner is among
               its own shard's local top-k
    BatchTopK: local top-(N·k) over the slice, the candidates' values all-gathered, the
               global (N·k)-th largest is the threshold every shard keeps at or above
    ReLU/JumpReLU: no selection, each shard activates its own latents
    x_hat = Σ_shards (own acts @ own W_dec rows) + b_dec      (one all_reduce of [N, d])

The backward is local: a latent's gradients are computed only by the rank that owns it,
from the reconstruction error every rank holds; only b_dec's encoder-side gradient (the
[d] sum over shards) and nothing else crosses ranks. Losses are computed identically on
every rank of the group, so each optimizer steps its own slice.

The module has the single-process SAEs' surface (encode / decode / forward /
training_forward, d_in, d_sae, cfg), with d_sae the global width: encode returns global
latent ids, and TrainOutput.acts is always a SparseActs over global ids (detached), on
every rank, so dead-latent tracking sees the whole dictionary.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import SAEConfig
from ..errors import InputError
from ..init import tied_init_
from ..ops import reference
from ..sae import BaseSAE, BatchTopKSAE, TrainOutput, build_sae, check_latent_ids
from ..sparse import RowSparseGrads, Selection, SparseActs
from .collectives import all_gather, all_gather_padded, all_reduce_, enter_group, group_rank, sum_over_group
from .groups import ParallelLayout, shard_range, single_process_layout

TOPK_FAMILY = ("topk", "batchtopk")


def is_latent(name: str, architecture: str) -> bool:
    """Whether state-dict entry `name` is indexed by latent (so split over the shards)."""
    return name in ("W_enc", "b_enc", "W_dec") or (name == "threshold" and architecture == "jumprelu")


def latent_slice(name: str, t: torch.Tensor, start: int, end: int, architecture: str) -> torch.Tensor:
    """Latents [start, end) of a whole SAE's state-dict entry (replicated entries whole)."""
    if name == "W_enc":
        return t[:, start:end]
    return t[start:end] if is_latent(name, architecture) else t


ShardSelection = Selection  # the name this module exported first


class LocalView:
    """A shard's latents seen as an SAE of width d_sae_local, for the single-process helpers
    that index latents from 0 (RowSparseAdam, init_from_data_)."""

    def __init__(self, sae: ShardedSAE):
        self.sae = sae
        self.d_sae, self.d_in = sae.d_sae_local, sae.d_in
        self.device, self.dtype = sae.device, sae.dtype
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec

    def named_parameters(self):
        return self.sae.named_parameters()


class ShardedSAE(nn.Module):
    """The latent slice this rank owns of an SAE configured by `cfg` (global d_sae)."""

    def __init__(self, cfg: SAEConfig, layout: ParallelLayout | None = None, seed: int | None = 0,
                 init: bool = True):
        super().__init__()
        self.cfg = cfg
        self.layout = layout if layout is not None else single_process_layout()
        self.shard_start, self.shard_end = shard_range(cfg.d_sae, self.layout.shards, self.layout.shard)
        d, n = cfg.d_in, self.d_sae_local
        f = dict(dtype=cfg.torch_dtype, device=cfg.device)
        self.W_enc = nn.Parameter(torch.empty(d, n, **f))
        self.b_enc = nn.Parameter(torch.zeros(n, **f))
        self.W_dec = nn.Parameter(torch.empty(n, d, **f))
        self.b_dec = nn.Parameter(torch.zeros(d, **f))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.full((n,), cfg.jumprelu_init_threshold, **f))
        elif cfg.architecture == "batchtopk":
            self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32, device=cfg.device))
        # ReLU SAEs' L1 weights each |f_j| by ‖W_dec[j]‖ (False: plain Σ|f_j|, TrainConfig.l1_decoder_norm)
        self.l1_decoder_norm = True
        if init:
            self.reset_parameters(seed)

    # ------------------------------------------------------------------ building
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = 0) -> None:
        """Unit-norm random decoder rows and a tied encoder, as BaseSAE. Each shard draws from
        its own generator (seed, shard): replicas of a shard start identical, and no rank
        ever generates the whole dictionary."""
        gen = torch.Generator(device=self.W_dec.device)
        gen.manual_seed((0 if seed is None else seed) * 1_000_003 + self.layout.shard)
        tied_init_(self, torch.randn(self.d_sae_local, self.d_in, generator=gen, device=self.W_dec.device))

    @classmethod
    @torch.no_grad()
    def from_full(cls, sae: BaseSAE, layout: ParallelLayout | None = None) -> ShardedSAE:
        """This rank's slice of a whole (single-process) SAE; every rank passes the same SAE."""
        shard = cls(sae.cfg, layout, init=False)
        lo, hi, arch = shard.shard_start, shard.shard_end, sae.cfg.architecture
        shard.load_state_dict({k: latent_slice(k, t, lo, hi, arch).clone() for k, t in sae.state_dict().items()})
        return shard

    def _is_latent(self, name: str) -> bool:
        """Whether state-dict entry `name` is indexed by latent (and so split over shards)."""
        return is_latent(name, self.cfg.architecture)

    @torch.no_grad()
    def to_full(self) -> BaseSAE:
        """Gather the whole SAE (every rank of the replica group must call this; each gets a copy).
        For small SAEs, tests and export; wide ones are exported with save_sharded instead."""
        group = self.layout.replica_group
        sizes = [shard_range(self.d_sae, self.layout.shards, s) for s in range(self.layout.shards)]
        state = {}
        for name, t in self.state_dict().items():
            if not self._is_latent(name):
                state[name] = t.clone()
                continue
            rows = t.t() if name == "W_enc" else t  # latent-major
            width = max(e - s for s, e in sizes)
            padded = torch.cat([rows, rows.new_zeros((width - rows.shape[0], *rows.shape[1:]))])
            parts = all_gather(padded, group, f"gathering {name} from the shards")
            full = torch.cat([p[: e - s] for p, (s, e) in zip(parts, sizes)])
            state[name] = full.t().contiguous() if name == "W_enc" else full
        sae = build_sae(self.cfg)
        sae.load_state_dict(state)
        return sae

    # ------------------------------------------------------------------ properties
    @property
    def d_sae_local(self) -> int:
        return self.shard_end - self.shard_start

    # d_in, d_sae (the whole dictionary's width: global latent ids run over [0, d_sae)),
    # device, dtype, backend, op lookup, input checks, normalisation and the b_dec switch
    # are the single-process SAE's own
    d_in, d_sae, device, dtype, backend = BaseSAE.d_in, BaseSAE.d_sae, BaseSAE.device, BaseSAE.dtype, BaseSAE.backend
    _op = BaseSAE._op
    _check_input = BaseSAE._check_input
    _normalize_input = BaseSAE._normalize_input
    _input_b_dec = BaseSAE._input_b_dec

    def local_view(self) -> LocalView:
        return LocalView(self)

    @property
    def _group(self):
        return self.layout.replica_group

    def extra_repr(self) -> str:
        k = f", k={self.cfg.k}" if self.cfg.k is not None else ""
        return (f"d_in={self.d_in}, d_sae={self.d_sae}{k}, latents [{self.shard_start}, {self.shard_end}) "
                f"of shard {self.layout.shard}/{self.layout.shards}, replica {self.layout.replica}/"
                f"{self.layout.replicas}, dtype={self.dtype}, device={self.device}")

    # ------------------------------------------------------------------ the sharded steps
    def encoder_input(self, x2: torch.Tensor) -> torch.Tensor:
        """x - b_dec (when applied), entering the group: its gradient sums over the shards."""
        x_in = x2 - self.b_dec if self.cfg.apply_b_dec_to_input else x2
        return enter_group(x_in, self._group, "summing the encoder input's gradient over the shards")

    def _global_topk(self, vals: torch.Tensor, idx: torch.Tensor, k: int, width: int, what: str):
        """The group-wide top-k of each row from every shard's candidates (vals [N, m <= width],
        local ids idx): (values [N, k] differentiable through this shard's own entries,
        global ids [N, k], own mask [N, k]). Exact: each global winner is among its shard's
        local top-k. Every shard pads to `width` candidates so all_gather fits."""
        if vals.shape[1] < width:
            fill = width - vals.shape[1]
            vals = torch.cat([vals, vals.new_full((vals.shape[0], fill), float("-inf"))], 1)
            idx = torch.cat([idx, idx.new_zeros((idx.shape[0], fill))], 1)
        group = self._group
        cand_v = all_gather(vals, group, f"all_gather of the {what} candidate values")
        cand_i = all_gather(idx + self.shard_start, group, f"all_gather of the {what} candidate ids")
        me = group_rank(group)
        cand_v[me] = vals  # this shard's own candidates keep their autograd history
        top_v, pos = torch.cat(cand_v, 1).topk(k, dim=1)
        return top_v, torch.cat(cand_i, 1).gather(1, pos), (pos // width) == me

    def _select_topk(self, x_in: torch.Tensor) -> ShardSelection:
        k = self.cfg.k
        vals, idx = self._op("topk_encode")(x_in, self.W_enc, self.b_enc, None, min(k, self.d_sae_local))
        if self._group is None:
            return ShardSelection(vals, idx, SparseActs(vals.detach(), idx + self.shard_start, self.d_sae))
        widest = max(e - s for s, e in (shard_range(self.d_sae, self.layout.shards, i)
                                        for i in range(self.layout.shards)))
        top_v, gidx, own = self._global_topk(vals, idx, k, min(k, widest), "top-k")
        values = top_v.masked_fill(~own, 0)
        local = torch.where(own, gidx - self.shard_start, torch.zeros_like(gidx))
        return ShardSelection(values, local, SparseActs(top_v.detach(), gidx, self.d_sae))

    def auxk_loss(self, x_in: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, k_aux: int,
                  scale: float = 1.0):
        """AuxK (fastsae.losses.auxk_loss) across the shards: each row's k_aux largest
        pre-activations among the `dead` global latent ids, chosen group-wide, reconstruct the
        (detached) residual. The gradient goes to leaf copies of the few local latents that
        were candidates, so nothing of the dictionary's size is allocated: returns (loss,
        local latent ids u, (W_enc[:, u], b_enc[u], W_dec[u]) leaves); after loss.backward()
        their .grad are the aux gradients of latents u. Every rank of the group must call it
        with the same `dead` (the trackers are replicated)."""
        from ..losses import top_dead_latents, total_variance

        x_in = x_in.detach()
        mine = dead[(dead >= self.shard_start) & (dead < self.shard_end)] - self.shard_start
        k_here = min(k_aux, mine.numel())
        idx = top_dead_latents(x_in, self.W_enc.detach(), self.b_enc.detach(), mine, k_here) if k_here else \
            mine.new_zeros((x_in.shape[0], 0))
        u, local = torch.unique(idx, return_inverse=True)
        We = self.W_enc.detach()[:, u].clone().requires_grad_()
        be = self.b_enc.detach()[u].clone().requires_grad_()
        Wd = self.W_dec.detach()[u].clone().requires_grad_()
        pre = torch.einsum("bd,dbk->bk", x_in.to(We.dtype), We[:, local]) + be[local]
        k_all = min(k_aux, dead.numel())
        widest = min(k_aux, max(int(((dead >= s) & (dead < e)).sum()) for s, e in (
            shard_range(self.d_sae, self.layout.shards, i) for i in range(self.layout.shards))))
        top_v, gidx, own = self._global_topk(pre, local, k_all, widest, "AuxK")
        # own slots: top_v is this shard's pre-activation of latent u[slot id]; gidx holds the
        # slot id (offset by shard_start), since the candidates were indexed into u
        slot = torch.where(own, gidx - self.shard_start, torch.zeros_like(gidx))
        acts = top_v.masked_fill(~own, 0).relu()
        partial = torch.einsum("bk,bkd->bd", acts, Wd[slot]) if u.numel() else acts.new_zeros(x_in.shape)
        recon = sum_over_group(partial.to(self.dtype), self._group, "all_reduce of the AuxK reconstruction")
        residual = residual.detach().float()
        loss = scale * (recon.float() - residual).pow(2).sum() / total_variance(residual)
        return loss, u, (We, be, Wd)

    def _select_batchtopk(self, x_in: torch.Tensor, update_threshold: bool) -> ShardSelection:
        k, n_rows = self.cfg.k, x_in.shape[0]
        acts = self._op("batchtopk_encode")(x_in, self.W_enc, self.b_enc, None, k)
        keep = min(k * n_rows, n_rows * self.d_sae)  # the global count, as the reference's
        flat = acts.values.detach().flatten()
        local_top = flat.topk(min(keep, flat.numel())).values
        if local_top.numel() < keep:
            local_top = torch.cat([local_top, local_top.new_zeros(keep - local_top.numel())])
        cands = torch.cat(all_gather(local_top, self._group, "all_gather of the batch top-k candidates"))
        top = cands.topk(keep).values  # the global top N·k values, the same on every rank
        tau = top[-1].clamp_min(0)
        values = acts.values * ((acts.values >= tau) & (acts.values > 0))
        if update_threshold:
            self._update_threshold(top[top > 0])
        return self._local_selection(values, acts.indices)

    def _local_selection(self, values: torch.Tensor, local: torch.Tensor) -> ShardSelection:
        """A selection each shard made alone (BatchTopK, thresholds): gather the global view."""
        gv = all_gather_padded(values.detach(), self._group, 0, "all_gather of the active values")
        gi = all_gather_padded(local + self.shard_start, self._group, 0, "all_gather of the active ids")
        return ShardSelection(values, local, SparseActs(gv, gi, self.d_sae))

    _update_batchtopk_threshold = BatchTopKSAE._update_threshold  # the EMA of the smallest kept value

    def _update_threshold(self, kept: torch.Tensor) -> None:
        """kept: the batch's kept activation values, the same on every rank."""
        self._update_batchtopk_threshold(SparseActs(kept, torch.zeros_like(kept, dtype=torch.long), self.d_sae))

    def select(self, x2: torch.Tensor, train: bool = False) -> ShardSelection:
        """TopK-family encode of normalised 2-D input x2 [N, d_in] across the shards."""
        x_in = self.encoder_input(x2)
        arch = self.cfg.architecture
        if arch == "topk":
            return self._select_topk(x_in)
        if arch != "batchtopk":
            raise InputError(f"select() is for topk/batchtopk SAEs, this one is {arch!r}")
        if train or self.training or float(self.threshold) < 0:
            return self._select_batchtopk(x_in, update_threshold=train)
        acts = self._op("threshold_encode")(x_in, self.W_enc, self.b_enc, None, self.threshold.to(self.dtype))
        return self._local_selection(acts.values, acts.indices)

    def _dense_encode_local(self, x2: torch.Tensor, train: bool):
        """ReLU / JumpReLU activations of this shard's latents [N, n_local], and the shard's
        part of the sparsity penalty (times its coefficient; zero outside training)."""
        x_in = self.encoder_input(x2)
        if self.cfg.architecture == "standard":
            acts = self._op("relu_encode")(x_in, self.W_enc, self.b_enc, None)
            if not train:
                return acts, None
            weighted = acts.abs() * self.W_dec.norm(dim=1) if self.l1_decoder_norm else acts.abs()
            l1 = weighted.sum(-1).mean()
            return acts, self.cfg.l1_coefficient * l1.float()
        eps = self.cfg.jumprelu_bandwidth
        if not train:
            return self._op("jumprelu_encode")(x_in, self.W_enc, self.b_enc, None, self.threshold, eps), None
        pre = reference.pre_activations(x_in, self.W_enc, self.b_enc, None)
        acts = reference.JumpReLU.apply(pre, self.threshold, eps)
        l0 = reference.Step.apply(pre, self.threshold, eps).sum(-1).mean()
        return acts, self.cfg.l0_coefficient * l0.float()

    def finish_decode(self, partial: torch.Tensor) -> torch.Tensor:
        """Σ over the shards of their partial reconstructions, + b_dec."""
        return sum_over_group(partial, self._group, "all_reduce of the partial reconstructions") + self.b_dec

    def _decode_selection(self, sel: ShardSelection) -> torch.Tensor:
        return self.finish_decode(self._op("sparse_decode")(sel.values.to(self.dtype), sel.indices, self.W_dec, None))

    def _gather_dense(self, acts: torch.Tensor) -> torch.Tensor:
        """[N, n_local] slices -> the whole [N, d_sae] (inference only: it is O(N·d_sae))."""
        if self._group is None:
            return acts
        sizes = [shard_range(self.d_sae, self.layout.shards, s) for s in range(self.layout.shards)]
        parts = all_gather_padded(acts, self._group, 0, "all_gather of the dense activations").split(
            max(e - s for s, e in sizes), dim=-1)
        return torch.cat([p[..., : e - s] for p, (s, e) in zip(parts, sizes)], -1)

    # ------------------------------------------------------------------ the SAE surface
    def encode(self, x: torch.Tensor, dense: bool = False):
        """As BaseSAE.encode, with global latent ids; ReLU/JumpReLU gather all [.., d_sae]
        activations to every rank (inference only)."""
        lead = x.shape[:-1] if isinstance(x, torch.Tensor) and x.dim() else ()
        x2 = self._normalize_input(self._check_input(x))[0]
        if self.cfg.architecture in TOPK_FAMILY:
            acts = self.select(x2).acts.reshape_rows(tuple(lead))
            return acts.to_dense() if dense else acts
        local, _ = self._dense_encode_local(x2, train=False)
        return self._gather_dense(local).reshape(*lead, self.d_sae)

    def decode(self, acts) -> torch.Tensor:
        """Reconstruction from a SparseActs over global ids or a dense [..., d_sae] tensor
        (the same on every rank of the group)."""
        if isinstance(acts, SparseActs):
            if acts.d_sae != self.d_sae:
                raise InputError(f"acts have d_sae={acts.d_sae} but this SAE has d_sae={self.d_sae}")
            lead = acts.values.shape[:-1]
            flat = acts.flatten_rows()
            check_latent_ids(flat.indices, self.d_sae)
            own = (flat.indices >= self.shard_start) & (flat.indices < self.shard_end)
            values = flat.values.to(self.dtype).masked_fill(~own, 0)
            local = torch.where(own, flat.indices - self.shard_start, torch.zeros_like(flat.indices))
            partial = self._op("sparse_decode")(values, local, self.W_dec, None)
            return self.finish_decode(partial).reshape(*lead, self.d_in)
        if not isinstance(acts, torch.Tensor) or acts.dim() == 0 or acts.shape[-1] != self.d_sae:
            shape = tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__
            raise InputError(f"decode takes a SparseActs or a dense tensor [..., d_sae={self.d_sae}], got {shape}")
        lead = acts.shape[:-1]
        mine = acts.reshape(-1, self.d_sae)[:, self.shard_start:self.shard_end].to(self.dtype)
        return self.finish_decode(self._op("dense_decode")(mine, self.W_dec, None)).reshape(*lead, self.d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, restore = self._normalize_input(self._check_input(x))
        if self.cfg.architecture in TOPK_FAMILY:
            x_hat = self._decode_selection(self.select(x2))
        else:
            local, _ = self._dense_encode_local(x2, train=False)
            x_hat = self.finish_decode(self._op("dense_decode")(local, self.W_dec, None))
        return restore(x_hat).reshape(x.shape)

    def training_forward(self, x: torch.Tensor) -> TrainOutput:
        """As BaseSAE.training_forward: every rank of the replica group gets the same loss
        (backpropagate it on every rank); `.acts` is the global selection, detached."""
        lead = x.shape[:-1] if isinstance(x, torch.Tensor) and x.dim() else ()
        x2 = self._normalize_input(self._check_input(x))[0]
        if self.cfg.architecture in TOPK_FAMILY:
            sel = self.select(x2, train=True)
            x_hat = self._decode_selection(sel)
            acts, sparsity = sel.acts, torch.zeros((), device=self.device)
        else:
            local, sparsity_part = self._dense_encode_local(x2, train=True)
            x_hat = self.finish_decode(self._op("dense_decode")(local, self.W_dec, None))
            sparsity = sum_over_group(sparsity_part, self._group, "all_reduce of the sparsity penalty")
            nz = SparseActs.from_dense(local.detach())
            gv = all_gather_padded(nz.values, self._group, 0, "all_gather of the active values")
            gi = all_gather_padded(nz.indices + self.shard_start, self._group, 0, "all_gather of the active ids")
            acts = SparseActs(gv, gi, self.d_sae)
        err = (x_hat - x2).float()
        mse = err.pow(2).sum(-1).mean()
        var = (x2.float() - x2.float().mean(0)).pow(2).sum()
        fvu = err.pow(2).sum() / var.clamp_min(torch.finfo(torch.float32).tiny)
        l0 = acts.l0().float().mean()
        return TrainOutput(
            loss=mse + sparsity, mse=mse, fvu=fvu, sparsity=sparsity, l0=l0,
            x_hat=x_hat.reshape(*lead, self.d_in), acts=acts.reshape_rows(tuple(lead)),
        )

    def save_pretrained(self, path) -> None:
        """Write a sharded checkpoint (collective: every rank calls it); see
        fastsae.distributed.checkpoint for the format and the loaders."""
        from .checkpoint import save_sharded

        save_sharded(self, path)

    # ------------------------------------------------------------------ explicit sparse backward
    @torch.no_grad()
    def sparse_backward(self, x2: torch.Tensor, sel: ShardSelection, grad_out: torch.Tensor):
        """The TopK-family backward outside autograd (ops "topk_sae_backward"), for this shard:
        (RowSparseGrads over *local* latent ids that this shard kept, db_dec). grad_out =
        ∂L/∂x_hat [N, d_in], the same on every rank of the group. db_dec's encoder part is
        summed over the shards, so it is the whole SAE's db_dec on every rank."""
        backward = self._op("topk_sae_backward")
        b_dec = self._input_b_dec()
        g = backward(x2, sel.values.to(self.dtype), sel.indices, grad_out.to(self.dtype), self.W_enc, self.W_dec,
                     b_dec, row_sparse=True)
        rows: RowSparseGrads = g["rows"]
        # padding / other shards' slots point at local id 0 with value 0: drop ids nobody kept here
        kept = torch.unique(sel.indices[sel.values != 0])
        keep = torch.isin(rows.latents, kept)
        rows = RowSparseGrads(rows.latents[keep], rows.W_enc[:, keep], rows.b_enc[keep], rows.W_dec[keep],
                              self.d_sae_local)
        decoder_part = grad_out.sum(0).to(g["db_dec"].dtype)
        encoder_part = all_reduce_((decoder_part - g["db_dec"]).contiguous(), self._group,
                                   what="all_reduce of b_dec's encoder gradient")
        return rows, decoder_part - encoder_part


__all__ = ["ShardedSAE", "ShardSelection", "LocalView", "is_latent", "latent_slice"]
