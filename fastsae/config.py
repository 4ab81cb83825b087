"""One config dataclass for every SAE architecture (field names follow SAELens)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")
_K_ARCHITECTURES = ("topk", "batchtopk")
NORMALIZATIONS = ("none", "layer_norm", "constant_norm_rescale")


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

    architecture: "standard" (ReLU + L1), "topk", "batchtopk" or "jumprelu".
    k: active latents per row (topk) or per row on average over a batch (batchtopk).
    apply_b_dec_to_input: subtract b_dec from x before encoding (SAELens default True).
    l1_coefficient: weight of the L1 penalty (standard).
    l0_coefficient, jumprelu_bandwidth, jumprelu_init_threshold: JumpReLU training.
    batchtopk_threshold_momentum: EMA momentum of the inference threshold (batchtopk).
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

    def __post_init__(self) -> None:
        if isinstance(self.dtype, torch.dtype):
            self.dtype = dtype_to_str(self.dtype)
        self.device = str(self.device)
        self.validate()

    def validate(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"unknown architecture {self.architecture!r}: use one of {', '.join(ARCHITECTURES)}"
            )
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.architecture in _K_ARCHITECTURES:
            if self.k is None:
                raise ConfigError(
                    f"architecture {self.architecture!r} needs k (active latents per row): "
                    f"pass k=<1..{self.d_sae}>"
                )
            if not isinstance(self.k, int) or isinstance(self.k, bool):
                raise ConfigError(f"k must be an integer, got {self.k!r}")
            if not 1 <= self.k <= self.d_sae:
                raise ConfigError(
                    f"k={self.k} is out of range: it must satisfy 1 <= k <= d_sae={self.d_sae} "
                    "(k is how many latents fire per row)"
                )
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
        if self.jumprelu_bandwidth <= 0:
            raise ConfigError(f"jumprelu_bandwidth must be > 0, got {self.jumprelu_bandwidth}")
        if not 0.0 <= self.batchtopk_threshold_momentum < 1.0:
            raise ConfigError(
                "batchtopk_threshold_momentum must be in [0, 1), got "
                f"{self.batchtopk_threshold_momentum}"
            )

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
