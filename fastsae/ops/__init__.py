"""Op dispatch: one name per op, one implementation per backend, a fallback chain per device.

Backends: "reference" (plain PyTorch, always present), "cpp" (fastsae._C: CPU always, CUDA
where built) and "triton" (kernels/, CUDA; CPU only under TRITON_INTERPRET=1). A backend
registers the ops it has, each for the devices it has a kernel for.

Each device has a chain of backends, fastest first:

    cuda: triton -> cpp -> reference
    cpu:  cpp -> reference

An op a backend lacks on a device falls to the NEXT backend of that device's chain, never
straight to the reference: the default CUDA training step is the Triton encoder and decoder
with the C++/CUDA sparse backward. Asking for a backend (cfg.backend, FASTSAE_BACKEND) starts
the chain at that backend: "cpp" on CUDA gives cpp -> reference, "reference" the reference
alone. Both chains follow one global order (ORDER), so `get(op, backend)` without a device
is consistent with either.

Op signatures (x is 2-D [N, d_in]; b_dec is None when it is not applied to the input):
    topk_encode(x, W_enc, b_enc, b_dec, k)                 -> (values [N,k], indices [N,k])
    topk_encode_dead(x, W_enc, b_enc, b_dec, k, dead, k_aux)
        -> topk_encode's pair plus AuxK's from the same pass: each row's min(k_aux, #dead)
           largest ReLU'd pre-activations among the latent ids `dead` (ascending), (values, ids),
           in an order each backend chooses (the set is exact; the sums over it do not care)
    batchtopk_encode(x, W_enc, b_enc, b_dec, k)            -> SparseActs
    threshold_encode(x, W_enc, b_enc, b_dec, threshold)    -> SparseActs
    relu_encode(x, W_enc, b_enc, b_dec)                    -> dense [N, d_sae]
    jumprelu_encode(x, W_enc, b_enc, b_dec, threshold, bandwidth) -> dense [N, d_sae]
    sparse_decode(values, indices, W_dec, b_dec)           -> [N, d_in]
    dense_decode(acts, W_dec, b_dec)                       -> [N, d_in]
    relu_forward(x, W_enc, b_enc, b_dec, W_dec, b_dec_out)            -> x_hat (inference, no autograd)
    jumprelu_forward(x, W_enc, b_enc, b_dec, threshold, W_dec, b_dec_out) -> x_hat (inference, no autograd)
    topk_sae_backward(x, values, indices, grad_out, W_enc, W_dec, b_dec, row_sparse=False, need_dx=True)
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
    "topk_encode_dead",
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
# The one order of preference; every device chain is a sub-sequence of it.
ORDER = ("triton", "cpp", "reference")
CHAINS: dict[str, tuple[str, ...]] = {"cuda": ("triton", "cpp", "reference"), "cpu": ("cpp", "reference")}
_ALL_DEVICES = ("cpu", "cuda", "meta")

_impls: dict[str, dict[str, Callable]] = {name: {"reference": getattr(reference, name)} for name in OPS}
# (op, backend) -> the device types that implementation has a kernel for
_op_devices: dict[tuple[str, str], set[str]] = {(name, "reference"): set(_ALL_DEVICES) for name in OPS}
# backend -> the device types it has at least one op for (what "available" means)
_devices: dict[str, set[str]] = {"reference": set(_ALL_DEVICES)}
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
        _op_devices[(op, backend)] = set(devices)
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


def _dev(device: torch.device | str) -> str:
    # a lookup runs on every op call: skip building a torch.device where there is one
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def chain(device: torch.device | str, start: str | None = None) -> tuple[str, ...]:
    """The backends an op is looked up in on `device`, in order: the device's chain, or, from
    an explicitly requested backend `start`, that backend then the device chain's later ones."""
    base = CHAINS.get(_dev(device), ("reference",))
    if start in (None, "auto"):
        return base
    if start not in BACKENDS:
        raise ConfigError(f"backend {start!r} is unknown: use 'auto' or one of {', '.join(BACKENDS)}")
    later = ORDER[ORDER.index(start) + 1:]
    return (start, *(b for b in later if b in base))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    _load_backends()
    dev = _dev(device)
    return [b for b in BACKENDS if dev in _devices.get(b, set())]


def resolve_backend(requested: str | None, device: torch.device | str) -> str:
    """The backend to use on `device`: explicit request > FASTSAE_BACKEND > device default
    (the first available backend of the device's chain)."""
    dev = _dev(device)
    if requested in (None, "auto"):
        requested = os.environ.get("FASTSAE_BACKEND", "auto") or "auto"
    if requested == "auto":
        avail = available_backends(dev)
        return next(b for b in chain(dev) if b in avail)
    if requested not in BACKENDS:
        raise ConfigError(f"backend {requested!r} is unknown: use 'auto' or one of {', '.join(BACKENDS)}")
    if requested not in available_backends(dev):
        why = _load_errors.get(requested, f"it has no implementation for {dev} tensors")
        raise ConfigError(
            f"backend {requested!r} is not available on {dev}: {why}. "
            "Use backend='reference' (or 'auto') instead."
        )
    return requested


def _has(op: str, backend: str, dev: str | None) -> bool:
    return backend in _impls[op] and (dev is None or dev in _op_devices.get((op, backend), ()))


def provider(op: str, backend: str, device: torch.device | str | None = None) -> str:
    """The backend whose implementation `get` returns: the first along the chain from
    `backend` that has `op` (for `device`'s tensors, when given)."""
    _load_backends()
    dev = None if device is None else _dev(device)
    order = chain(dev or "cuda", backend)  # no device: the global order from `backend`
    return next((b for b in order if _has(op, b, dev)), "reference")


def get(op: str, backend: str, device: torch.device | str | None = None) -> Callable:
    """The implementation of `op` for `backend`: its own, or the next backend's of the chain
    that has one. Without `device` the chain is taken in the global order and an
    implementation without a kernel for the tensors' device hands them on itself."""
    return _impls[op][provider(op, backend, device)]


def next_impl(op: str, backend: str, device: torch.device | str) -> Callable:
    """What `backend` hands an op on to when it cannot run it itself (a dtype or a size its
    kernel lacks): the implementation of the next backend of `device`'s chain."""
    order = chain(device, backend)
    rest = order[1:] if order[0] == backend else order
    return get(op, rest[0] if rest else "reference", device)


def implementation_table(requested: str | None = "auto") -> dict[str, dict[str, str]]:
    """op -> {device: the backend whose implementation runs there} for `requested` ("auto":
    each device's default). What a CUDA run would use can be read on a CPU-only machine: it
    follows the registrations (a cpp build without CUDA shows the reference)."""
    _load_backends()
    table: dict[str, dict[str, str]] = {}
    for op in _impls:
        row = {}
        for dev in CHAINS:
            start = None if requested in (None, "auto") else requested
            order = chain(dev, start)
            row[dev] = next((b for b in order if _has(op, b, dev)), "reference")
        table[op] = row
    return table


def format_implementation_table(requested: str | None = "auto") -> str:
    """implementation_table as a markdown table (op | cpu | cuda)."""
    table = implementation_table(requested)
    devs = list(CHAINS)
    lines = ["| op | " + " | ".join(devs) + " |", "|---|" + "---|" * len(devs)]
    lines += [f"| {op} | " + " | ".join(row[d] for d in devs) + " |" for op, row in table.items()]
    return "\n".join(lines)


def native(name: str, device: torch.device | str) -> Callable | None:
    """torch.ops.fastsae.<name> where the C++ extension has a kernel for `device`'s tensors,
    else None: for the helpers outside the op table (a selection's gradient, an optimizer's
    column scatter), whose callers keep a plain-PyTorch path."""
    try:
        from . import cpp
    except Exception:  # no extension
        return None
    return getattr(torch.ops.fastsae, name) if cpp.has_kernel(name, device) else None


def load_errors() -> dict[str, str]:
    _load_backends()
    return dict(_load_errors)
