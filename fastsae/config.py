"""The configs: SAEConfig (one dataclass for every SAE architecture, field names following
SAELens) and TrainConfig (everything about a training run except the data)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError
from .schedules import DECAY_SHAPES

OPTIMIZERS = ("adam", "row_sparse_adam", "signum", "row_sparse_signum")

NORMALIZATIONS = ("none", "layer_norm", "constant_norm_rescale")
INITS = ("tied", "data", "data_decoder")
DEAD_TOKENS_CAP = 10_000_000  # the usual fixed dead window (OpenAI, sparsify): the cap of the relative one
# The relative dead window: a fortieth of the run. A tenth started AuxK so late that TopK stopped
# at MMCS 0.97 on the toy acceptance (docs/toy_recovery.md); a fortieth reached 0.997.
DEAD_WINDOW_FRACTION = 40


def dtype_from_str(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = name.removeprefix("torch.")
    dt = getattr(torch, key, None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ConfigError(
            f"dtype {name!r} is not a floating torch dtype: use one of "
            "'float32', 'bfloat16', 'float16', 'float64'"
        )
    return dt


def dtype_to_str(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE; saved as cfg.json beside its weights.

    architecture: a registered architecture (fastsae.architectures()): "standard" (ReLU + L1),
        "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk".
    k: active latents per row (topk) or per row on average over a batch (batchtopk, matryoshka).
    apply_b_dec_to_input: subtract b_dec from x before encoding (SAELens default True).
    l1_coefficient: weight of the L1 penalty (standard).
    l0_coefficient, jumprelu_bandwidth, jumprelu_init_threshold: JumpReLU training.
    batchtopk_threshold_momentum: EMA momentum of the inference threshold (batchtopk, matryoshka).
    matryoshka_widths: the nested dictionary prefixes [w_1 < ... < w_G = d_sae] whose
        reconstructions are each scored (matryoshka_batchtopk, SAELens's name);
        matryoshka_weights: each level's loss weight (default 1 each: the losses are summed).
    transcoder: the SAE encodes one activation and reconstructs another (trained on a
        fastsae.PairedSource); its decoder maps to d_out (default d_in), and b_dec lives in the
        output space, so apply_b_dec_to_input must be False.
    skip_connection: a linear skip x @ W_skip.T added to the output (W_skip [d_out, d_in],
        zero at init; Paulo et al. 2025's skip transcoders, sparsify's skip_connection).
    check_finite: reject NaN/inf input with an error (one pass over x, O(B*d_in)).
    backend: "auto", "reference", "cpp" or "triton" ("auto" picks by device; the
        FASTSAE_BACKEND environment variable overrides "auto").
    metadata: free-form provenance (model, hook point, ...), saved as is.
    """

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = True
    l1_coefficient: float = 1.0
    l0_coefficient: float = 1.0
    jumprelu_bandwidth: float = 0.001
    jumprelu_init_threshold: float = 0.001
    batchtopk_threshold_momentum: float = 0.99
    check_finite: bool = True
    backend: str = "auto"
    metadata: dict[str, Any] = field(default_factory=dict)
    # Per-row input normalisation undone on the output ("none", "layer_norm" as OpenAI and
    # SAELens, "constant_norm_rescale" as SAELens). forward() undoes it; decode() alone cannot.
    normalize_activations: str = "none"
    matryoshka_widths: list[int] | None = None
    matryoshka_weights: list[float] | None = None
    transcoder: bool = False
    d_out: int | None = None
    skip_connection: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.dtype, torch.dtype):
            self.dtype = dtype_to_str(self.dtype)
        self.device = str(self.device)
        self.validate()

    def validate(self) -> None:
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.d_out is not None and (not isinstance(self.d_out, int) or isinstance(self.d_out, bool)
                                       or self.d_out < 1):
            raise ConfigError(f"d_out must be a positive integer (or None: d_in), got {self.d_out!r}")
        self._validate_transcoder()
        from .sae import architectures  # the registry (its modules import this one)

        known = architectures()
        if self.architecture not in known:
            raise ConfigError(f"unknown architecture {self.architecture!r}: use one of {', '.join(known)}")
        known[self.architecture].validate_config(self)
        dtype_from_str(self.dtype)
        if self.normalize_activations not in NORMALIZATIONS:
            raise ConfigError(
                f"normalize_activations {self.normalize_activations!r} is unknown: use one of "
                f"{', '.join(NORMALIZATIONS)}"
            )
        if self.backend not in ("auto", "reference", "cpp", "triton"):
            raise ConfigError(
                f"backend {self.backend!r} is unknown: use 'auto', 'reference', 'cpp' or 'triton'"
            )

    def _validate_transcoder(self) -> None:
        if self.output_dim != self.d_in and not self.transcoder:
            raise ConfigError(
                f"d_out={self.d_out} differs from d_in={self.d_in}, so the SAE cannot reconstruct its input: set "
                "transcoder=True (and train it on paired activations), or drop d_out"
            )
        if self.transcoder and self.apply_b_dec_to_input:
            raise ConfigError(
                "a transcoder's b_dec is in the output space, so it cannot be subtracted from the input: "
                "set apply_b_dec_to_input=False"
            )
        if self.transcoder and self.normalize_activations != "none":
            raise ConfigError(
                f"normalize_activations={self.normalize_activations!r} undoes the input's normalisation on the "
                "output, which a transcoder's output (another activation) does not share: use 'none' "
                "and scale the activations beforehand"
            )

    @property
    def output_dim(self) -> int:
        """The width of the reconstruction: d_out for a transcoder that sets it, else d_in."""
        return self.d_in if self.d_out is None else self.d_out

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_str(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        kwargs = {k: v for k, v in d.items() if k in known}
        if unknown:  # keep foreign fields rather than lose them
            kwargs.setdefault("metadata", {})
            kwargs["metadata"] = {**kwargs["metadata"], "extra_cfg": {k: d[k] for k in unknown}}
        return cls(**kwargs)

    def replace(self, **changes: Any) -> SAEConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class TrainConfig:
    """Everything about a training run except the data. `sae` is the SAEConfig (or a dict).

    optimizer: "adam" (dense, torch's fused kernel), "row_sparse_adam" (sparse architectures; see
        fastsae.optim for how it differs from dense Adam), "signum" or "row_sparse_signum"
        (sign of momentum, one state).
    optimizer_state: the moments in "fp32", "bf16" or "int8" (8-bit blockwise, row-aligned
        blocks); master_weights: how bf16/fp16 weights are updated: "fp32" copies, "kahan"
        compensation, "stochastic" rounding, or "none" (round to nearest: loses quality). See
        fastsae.optim_state and docs/wide.md.
    sparse_backward: None = on for the sparse architectures (required by row_sparse_adam), except
        transcoders whose d_out differs from d_in, which take the autograd path.
    row_sparse_catch_up: row_sparse_adam's mode (True: silent latents get dense Adam's
        momentum steps in closed form when they fire again; False: lazy Adam).
    lr schedule: linear warmup over warmup_steps, then flat, then from decay_start (fraction
        of steps) a linear/cosine decay to final_lr_fraction·lr. lr_anchor (set on resume when
        steps is extended after the decay began): the (step, factor) the decay continues from.
    sparsity_warmup_steps: the L1/L0 penalty ramps linearly from 0 over these steps.
    l1_decoder_norm: ReLU SAEs' L1 is Σ_j |f_j|·‖W_dec[j]‖ (True) or Σ_j |f_j| (False). The
        penalty is a sum over latents, never divided by d_sae, so a coefficient means the same
        at every width. Weighting by the decoder norm makes it invariant to trading scale
        between f_j and W_dec[j] (otherwise the SAE can shrink f and grow W_dec to dodge
        it); the unweighted form needs unit_norm_decoder=True for the same reason.
    auxk_coefficient, k_aux: AuxK for the sparse architectures (0 disables; k_aux None = d_in // 2):
        on whenever latents are dead.
    dead_tokens: a latent is dead after this many tokens without firing. None = relative to the
        run: a fortieth of its tokens, at most 10M (see `dead_window`), so AuxK and resampling start
        in a 1000-step toy run as in a billion-token one.
    resample_dead: resample dead latents as Anthropic's 2023 recipe (decoder row = the normalised
        residual of an input drawn with probability ∝ its squared error, encoder column the same
        direction at the mean live encoder norm, zero bias, fresh optimizer state). None = on for
        the architectures AuxK cannot revive (the dense ones: a dead ReLU has no gradient).
    resample_every: steps between resamplings (None: the dead window in steps); resampling
        stops when the lr decay starts, so the last latents settle.
    finetune_steps: after `steps`, this many steps of the shrinkage fix (Wright & Sharkey
        2024): the encoder (and so which latents fire, and how strongly) is frozen, and the
        decoder is refit by MSE alone, without the sparsity penalty or the unit-norm constraint.
        finetune: "scale" refits each decoder row's norm only, so the directions (the learned
        features) stay as trained and the norms absorb each latent's shrinkage; "decoder" refits
        the whole rows, as Wright & Sharkey (lower MSE, but the directions move too).
        finetune_lr: its peak lr (None: lr), decayed as the main run.
    unit_norm_decoder: None = on for the sparse architectures and unweighted L1 (keep decoder rows unit-norm, with the
        gradient's parallel component removed).
    init: "tied" (random unit decoder rows, W_enc = W_decᵀ), "data" (a data_init_fraction of
        decoder rows from activation samples centred at their geometric median, then tied) or
        "data_decoder" (decoder rows from samples, the encoder left random: keeps the early lead
        of a sample start on ReLU + L1, where the tied one falls behind; see docs/init_study.md).
        b_dec_init: "zeros" (the default, as sparsify's and SAELens's modules), "geometric_median" or "mean" of
        init_sample_rows rows of the data. The defaults (zeros, and the decay over the last 10 %
        of the steps) are what both recovers the toy features and matches sparsify on real
        activations in a short run (docs/dropin_quality.md).
    nonfinite: "raise" (stop with an error naming the batch) or "skip" (drop the batch and
        count it in the log's skipped_batches) for a batch holding NaN/inf.
    checkpoint_every: steps between checkpoints (0: only at the end); keep_checkpoints: how
        many to keep.
    overwrite: a fresh run may replace a run already in out_dir (otherwise that is refused:
        resume it or pick another out_dir).

    On resume the saved config holds; only RESUMABLE fields may change (steps, the lr schedule's
    end, nonfinite, the log and checkpoint cadence, display), and the change is recorded.
    """

    sae: SAEConfig | dict
    steps: int = 1000
    batch_size: int = 4096
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    optimizer: str = "adam"
    optimizer_state: str = "fp32"
    master_weights: str = "fp32"
    sparse_backward: bool | None = None
    row_sparse_catch_up: bool = True
    warmup_steps: int = 0
    decay: str = "linear"
    decay_start: float = 0.9
    final_lr_fraction: float = 0.0
    lr_anchor: tuple[int, float] | None = None
    sparsity_warmup_steps: int = 0
    l1_decoder_norm: bool = True
    auxk_coefficient: float = 1 / 32
    k_aux: int | None = None
    dead_tokens: int | None = None
    resample_dead: bool | None = None
    resample_every: int | None = None
    finetune_steps: int = 0
    finetune: str = "scale"
    finetune_lr: float | None = None
    dense_threshold: float = 0.1
    unit_norm_decoder: bool | None = None
    init: str = "tied"
    data_init_fraction: float = 1.0
    b_dec_init: str = "zeros"
    init_sample_rows: int = 4096
    nonfinite: str = "raise"
    log_every: int = 100
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    out_dir: str = "runs/sae"
    seed: int = 0
    progress: bool = True
    console: bool = True
    plot: bool = True
    overwrite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.sae, dict):
            self.sae = SAEConfig.from_dict(self.sae)
        self.betas = tuple(self.betas)
        if self.lr_anchor is not None:
            self.lr_anchor = (int(self.lr_anchor[0]), float(self.lr_anchor[1]))
        self.validate()

    def validate(self) -> None:
        from .sae import sparse_architectures

        arch = self.sae.architecture
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.optimizer in OPTIMIZERS,
             f"optimizer {self.optimizer!r} is unknown: use one of {', '.join(OPTIMIZERS)}"),
            (self.decay in DECAY_SHAPES, f"decay {self.decay!r} is unknown: use one of {', '.join(DECAY_SHAPES)}"),
            (self.init in INITS, f"init {self.init!r} is unknown: use one of {', '.join(INITS)}"),
            (self.b_dec_init in ("geometric_median", "mean", "zeros"),
             f"b_dec_init {self.b_dec_init!r} is unknown: use 'geometric_median', 'mean' or 'zeros'"),
            (self.nonfinite in ("raise", "skip"), f"nonfinite {self.nonfinite!r} is unknown: use 'raise' or 'skip'"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.dead_tokens is None or self.dead_tokens >= 1,
             f"dead_tokens must be >= 1 (or None: relative to the run), got {self.dead_tokens}"),
            (self.resample_every is None or self.resample_every >= 1,
             f"resample_every must be >= 1 step (or None: the dead window), got {self.resample_every}"),
            (self.finetune_steps >= 0, f"finetune_steps must be >= 0, got {self.finetune_steps}"),
            (self.finetune in ("scale", "decoder"),
             f"finetune {self.finetune!r} is unknown: use 'scale' (row norms only) or 'decoder' (whole rows)"),
            (self.finetune_lr is None or self.finetune_lr > 0,
             f"finetune_lr must be > 0 (or None: lr), got {self.finetune_lr}"),
            (0.0 <= self.decay_start <= 1.0,
             f"decay_start is a fraction of the steps in [0, 1], got {self.decay_start}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        from .optim_state import check_forms

        check_forms(self.optimizer_state, self.master_weights)
        if self.master_weights != "fp32" and self.sae.torch_dtype in (torch.float32, torch.float64):
            raise ConfigError(f"master_weights={self.master_weights!r} rounds bfloat16/float16 weights, but these "
                              f"are {self.sae.dtype} (their own master): use master_weights='fp32', or train in "
                              "bfloat16")
        sparse = self.sae_class.takes_sparse_path
        if self.optimizer.startswith("row_sparse"):
            if not sparse:
                raise ConfigError(
                    f"{self.optimizer} needs row-sparse gradients, which only the sparse architectures "
                    f"({', '.join(sparse_architectures())}) have; "
                    f"architecture {arch!r} trains with optimizer='adam' or 'signum'"
                )
            if self.sparse_backward is False:
                raise ConfigError(f"{self.optimizer} needs sparse_backward=True (or None)")
        if self.sparse_backward and not sparse:
            raise ConfigError(f"sparse_backward is for the sparse architectures ({', '.join(sparse_architectures())}), "
                              f"not {arch!r}")
        sae = self.sae
        if self.optimizer == "row_sparse_adam" and (sae.output_dim != sae.d_in or sae.skip_connection):
            raise ConfigError(
                "row_sparse_adam keeps [d_sae, d_in] moments for the decoder and trains no skip connection; this SAE "
                f"has d_out={sae.output_dim}, d_in={sae.d_in}, skip_connection={sae.skip_connection}: "
                "use optimizer='adam'"
            )
        if self.sparse_backward and sae.output_dim != sae.d_in:
            raise ConfigError(
                f"the trainer's sparse path needs d_out == d_in (its row-sparse gradient helpers assume one width); "
                f"this transcoder maps d_in={sae.d_in} to d_out={sae.output_dim}: use sparse_backward=False (or None)"
            )
        if self.init in ("data", "data_decoder") and sae.transcoder:
            raise ConfigError(
                f"init={self.init!r} draws decoder atoms from the input activations, which a transcoder's target "
                "does not share: use init='tied'"
            )
        if sae.transcoder and self.resample_dead:
            raise ConfigError("resampling sets a dead latent's encoder and decoder to one residual direction, which "
                              "a transcoder's input and target do not share: use resample_dead=False")
        if sae.transcoder and self.finetune_steps:
            raise ConfigError("the fine-tuning stage refits an SAE's reconstruction of its input; transcoders do not "
                              "have it yet: use finetune_steps=0")

    @property
    def sae_class(self):
        from .sae import sae_class  # the registry (its modules import this one)

        return sae_class(self.sae.architecture)

    @property
    def use_sparse_backward(self) -> bool:
        # a transcoder with d_out != d_in trains on the autograd path (see validate)
        return (self.sae_class.takes_sparse_path and self.sparse_backward is not False
                and self.sae.output_dim == self.sae.d_in)

    @property
    def total_steps(self) -> int:
        """The main run plus the fine-tuning stage."""
        return self.steps + self.finetune_steps

    def dead_window(self, replicas: int = 1) -> int:
        """Tokens without firing after which a latent is dead: dead_tokens, or a fortieth of the
        run's tokens capped at 10M (the common fixed window, which a short run never reaches)."""
        if self.dead_tokens is not None:
            return self.dead_tokens
        run_tokens = self.steps * self.batch_size * replicas
        return max(self.batch_size * replicas, min(DEAD_TOKENS_CAP, run_tokens // DEAD_WINDOW_FRACTION))

    @property
    def use_resampling(self) -> bool:
        if self.resample_dead is None:  # AuxK revives the sparse family's dead latents
            return not self.sae_class.takes_sparse_path and not self.sae.transcoder
        return self.resample_dead

    def resample_interval(self, replicas: int = 1) -> int:
        """Steps between resamplings of dead latents."""
        if self.resample_every is not None:
            return self.resample_every
        return max(1, -(-self.dead_window(replicas) // (self.batch_size * replicas)))

    @property
    def use_unit_norm_decoder(self) -> bool:
        if self.unit_norm_decoder is None:
            return self.sae_class.takes_sparse_path or not self.l1_decoder_norm
        return self.unit_norm_decoder

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sae"] = self.sae.to_dict()
        d["betas"] = list(self.betas)
        d["lr_anchor"] = list(self.lr_anchor) if self.lr_anchor is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}: known ones are {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# what a resumed run may change (everything else would make it a different run)
RESUMABLE = frozenset({"steps", "final_lr_fraction", "nonfinite", "log_every", "checkpoint_every",
                       "keep_checkpoints", "progress", "console", "plot", "out_dir"})
