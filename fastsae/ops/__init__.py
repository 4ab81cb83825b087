"""Op dispatch: one name per op, one implementation per backend.

Backends: "reference" (plain PyTorch, always present), "cpp" (fastsae._C, CPU always and
CUDA where built) and "triton" (kernels/, CUDA). A backend registers the ops it has; an
op a backend lacks falls back to the reference, so partial backends are safe.

Op signatures (x is 2-D [N, d_in]; b_dec is None when it is not applied to the input):
    topk_encode(x, W_enc, b_enc, b_dec, k)                 -> (values [N,k], indices [N,k])
    batchtopk_encode(x, W_enc, b_enc, b_dec, k)            -> SparseActs
    threshold_encode(x, W_enc, b_enc, b_dec, threshold)    -> SparseActs
    relu_encode(x, W_enc, b_enc, b_dec)                    -> dense [N, d_sae]
    jumprelu_encode(x, W_enc, b_enc, b_dec, threshold, bandwidth) -> dense [N, d_sae]
    sparse_decode(values, indices, W_dec, b_dec)           -> [N, d_in]
    dense_decode(acts, W_dec, b_dec)                       -> [N, d_in]
    relu_forward(x, W_enc, b_enc, b_dec, W_dec, b_dec_out)            -> x_hat (inference, no autograd)
    jumprelu_forward(x, W_enc, b_enc, b_dec, threshold, W_dec, b_dec_out) -> x_hat (inference, no autograd)
    topk_sae_backward(x, values, indices, grad_out, W_enc, W_dec, b_dec, row_sparse=False)
        -> dict (see reference.topk_sae_backward): the whole sparse backward of a
           TopK-family step outside autograd, for the row-sparse optimizer.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from ..errors import ConfigError
from . import reference

OPS = (
    "topk_encode",
    "batchtopk_encode",
    "threshold_encode",
    "relu_encode",
    "jumprelu_encode",
    "sparse_decode",
    "dense_decode",
    "relu_forward",
    "jumprelu_forward",
    "topk_sae_backward",
)
BACKENDS = ("reference", "cpp", "triton")

_impls: dict[str, dict[str, Callable]] = {name: {"reference": getattr(reference, name)} for name in OPS}
_devices: dict[str, set[str]] = {"reference": {"cpu", "cuda", "meta"}}
_load_errors: dict[str, str] = {}
# Modules that register a backend's ops when imported.
_BACKEND_MODULES = {"cpp": "fastsae.ops.cpp", "triton": "fastsae.ops.triton"}
_loaded = False


def register(op: str, backend: str, devices: tuple[str, ...] = ("cpu", "cuda")):
    """Decorator: register `fn` as `backend`'s implementation of `op` on `devices`."""
    if op not in _impls:
        _impls[op] = {}

    def deco(fn: Callable) -> Callable:
        _impls[op][backend] = fn
        _devices.setdefault(backend, set()).update(devices)
        return fn

    return deco


def _load_backends() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for backend, module in _BACKEND_MODULES.items():
        try:
            importlib.import_module(module)
        except Exception as e:  # a missing backend is a fallback, not a failure
            _load_errors[backend] = f"{type(e).__name__}: {e}"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    _load_backends()
    dev = torch.device(device).type
    return [b for b in BACKENDS if dev in _devices.get(b, set())]


def resolve_backend(requested: str | None, device: torch.device | str) -> str:
    """The backend to use on `device`: explicit request > FASTSAE_BACKEND > device default."""
    dev = torch.device(device).type
    if requested in (None, "auto"):
        requested = os.environ.get("FASTSAE_BACKEND", "auto") or "auto"
    if requested == "auto":
        order = ("triton", "cpp", "reference") if dev == "cuda" else ("cpp", "reference")
        avail = available_backends(dev)
        return next(b for b in order if b in avail)
    if requested not in BACKENDS:
        raise ConfigError(f"backend {requested!r} is unknown: use 'auto' or one of {', '.join(BACKENDS)}")
    if requested not in available_backends(dev):
        why = _load_errors.get(requested, f"it has no implementation for {dev} tensors")
        raise ConfigError(
            f"backend {requested!r} is not available on {dev}: {why}. "
            "Use backend='reference' (or 'auto') instead."
        )
    return requested


def get(op: str, backend: str) -> Callable:
    """The implementation of `op` for `backend`, or the reference when it has none."""
    _load_backends()
    impls = _impls[op]
    return impls.get(backend, impls["reference"])


def implementation_table() -> dict[str, list[str]]:
    """op -> backends that implement it (for docs, benchmarks and tests)."""
    _load_backends()
    return {op: sorted(impls) for op, impls in _impls.items()}


def load_errors() -> dict[str, str]:
    _load_backends()
    return dict(_load_errors)
