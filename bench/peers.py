"""The implementations the benchmark compares, behind one small adapter interface.

Every adapter is built from the same seeded weights (`make_weights`), so all of them compute
the same TopK SAE and their reconstructions can be checked against each other before timing:
    x_hat = TopK_k((x - b_dec) @ W_enc + b_enc).relu() @ W_dec + b_dec

Ops an adapter offers (its `ops()`), each a zero-argument callable, or (setup, run) when
part of the work must happen untimed before each call:
    encode    latent activations of x, no autograd (in the library's own output format)
    decode    reconstruction from those activations, no autograd
    backward  the library's backward pass of its training loss (its forward runs untimed)
    step      one full training step: forward + backward + optimizer, as the library's own
              trainer does it (minus logging; constraints such as unit-norm decoders included)
    gemm      (the floor only) x @ W_enc of the same shape

Implementations (see IMPLEMENTATIONS): fastsae on each backend it has for the device, a
plain dense PyTorch TopK SAE, SAELens TopKTrainingSAE and sparsify SparseCoder. A peer
that cannot run reports why (`unavailable`), and the report keeps the row.

Reusable pieces for other benchmarks: `Shape`, `make_weights`, `make_batch`, `build(name,
shape, device, dtype)` and `op_flops`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

OPS = ("encode", "decode", "backward", "step")
LR = 1e-4  # one learning rate for every optimizer; its value does not change the time


@dataclass(frozen=True)
class Shape:
    d_in: int
    d_sae: int
    k: int
    batch: int

    def label(self) -> str:
        return f"d_in={self.d_in} d_sae={self.d_sae} k={self.k} B={self.batch}"

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def op_flops(op: str, s: Shape) -> float:
    """Useful floating-point work of an op, the same count for every implementation (a
    dense implementation doing more work shows as fewer useful TFLOP/s): the encoder GEMM
    2·B·d·n; the sparse decode 2·B·k·d; the sparse backward 8·B·k·d (dvalues, dW_dec,
    dW_enc, dx); a step = encode + decode + backward (the optimizer is memory-bound)."""
    gemm = 2.0 * s.batch * s.d_in * s.d_sae
    sparse = 2.0 * s.batch * s.k * s.d_in
    table = {"gemm": gemm, "encode": gemm, "decode": sparse, "backward": 4 * sparse,
             "step": gemm + 5 * sparse, "step_row_sparse_adam": gemm + 5 * sparse}
    return table[op]


def make_weights(s: Shape, device, dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """SAELens-layout weights: unit-norm decoder rows, tied encoder, small random biases.
    Drawn on `device` (the widest ones would not fit in host RAM twice): the same numbers for
    every implementation on one device, not across devices."""
    g = torch.Generator(device=device).manual_seed(seed)
    f = dict(generator=g, device=device)
    W_dec = torch.randn(s.d_sae, s.d_in, **f)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    w = {"W_enc": W_dec.t().contiguous(), "b_enc": 0.01 * torch.randn(s.d_sae, **f),
         "W_dec": W_dec, "b_dec": 0.01 * torch.randn(s.d_in, **f)}
    return {k: v.to(dtype) for k, v in w.items()}


def make_batch(s: Shape, device, dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(s.batch, s.d_in, generator=g, device=device).to(dtype)


def _no_grad(fn: Callable) -> Callable:
    def run(*a):
        with torch.no_grad():
            return fn(*a)
    return run


class Adapter:
    """One implementation on one shape. Subclasses set `name`/`distribution`, build their
    module in __init__ from `weights`, and implement encode/decode/_loss/_optimizer_step."""

    name: ClassVar[str] = ""
    distribution: ClassVar[str | None] = None  # the PyPI distribution, for its version
    notes: ClassVar[str] = ""  # how it is run, one line for the report
    trains: ClassVar[bool] = True  # has a training step (everything but the floor)

    def __init__(self, shape: Shape, device: torch.device, dtype: torch.dtype, weights: dict[str, torch.Tensor]):
        self.shape, self.device, self.dtype = shape, device, dtype

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """Why this implementation cannot run on `device` (None: it can, as far as we know
        without importing it; import failures are reported by the worker)."""
        return None

    # ---- the ops
    def encode(self, x: torch.Tensor) -> Any:
        raise NotImplementedError

    def decode(self, acts: Any) -> torch.Tensor:
        raise NotImplementedError

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        """The library's training loss of batch x (autograd graph attached)."""
        raise NotImplementedError

    def _optimizer_step(self) -> None:
        """What the library's trainer does between backward and the next forward."""
        raise NotImplementedError

    def _params(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def step(self, x: torch.Tensor) -> None:
        self._loss(x).backward()
        self._optimizer_step()

    def backward_case(self, x: torch.Tensor):
        """(setup, run): setup runs the forward untimed, run(loss) the backward."""
        def setup():
            for p in self._params():
                p.grad = None
            return self._loss(x)
        return setup, lambda loss: loss.backward()

    def ops(self, x: torch.Tensor) -> dict[str, Any]:
        acts = _no_grad(self.encode)(x)
        return {
            "encode": lambda: _no_grad(self.encode)(x),
            "decode": lambda: _no_grad(self.decode)(acts),
            "backward": self.backward_case(x),
            "step": lambda: self.step(x),
        }

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return _no_grad(lambda t: self.decode(self.encode(t)))(x)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ the floor
class GemmFloor(Adapter):
    """x @ W_enc alone: the work no SAE step can avoid."""

    name = "torch.mm (floor)"
    trains = False
    notes = "torch.mm(x, W_enc): the encoder GEMM alone, the floor every multiple refers to"

    def __init__(self, shape, device, dtype, weights):
        super().__init__(shape, device, dtype, weights)
        self.W_enc = weights["W_enc"]

    def ops(self, x):
        return {"gemm": lambda: torch.mm(x, self.W_enc)}

    def reconstruct(self, x):
        return None


# ------------------------------------------------------------------ fastsae
class FastSAE(Adapter):
    """fastsae.TopKSAE on one backend; the step is fastsae's own Trainer.train_step (sparse
    backward + dense Adam + unit-norm decoder, its dead-latent tracking and finite checks
    included). Extra op step_row_sparse_adam: the same with optimizer='row_sparse_adam'."""

    distribution = "fastsae"
    backend: ClassVar[str] = ""
    notes = ("fastsae.TopKSAE on this backend; step = fastsae's Trainer.train_step (sparse backward, "
             "dense Adam, unit-norm decoder, dead-latent tracking, finite checks)")

    def __init__(self, shape, device, dtype, weights):
        super().__init__(shape, device, dtype, weights)
        from fastsae import SAEConfig, TopKSAE
        from fastsae.config import dtype_to_str

        self.cfg = SAEConfig(d_in=shape.d_in, d_sae=shape.d_sae, architecture="topk", k=shape.k,
                             dtype=dtype_to_str(dtype), device=str(device), backend=self.backend)
        self.sae = TopKSAE(self.cfg)
        with torch.no_grad():
            for name, w in weights.items():
                getattr(self.sae, name).copy_(w)
        self._dirs: list[str] = []
        self.trainer = self._trainer("adam")

    @classmethod
    def unavailable(cls, device):
        from fastsae import ops

        if device.type == "cpu" and cls.backend == "triton":
            return ("Triton kernels run on CPU only in the interpreter (TRITON_INTERPRET=1), "
                    "which checks correctness and is orders of magnitude slower: not timed")
        if cls.backend not in ops.available_backends(device):
            why = ops.load_errors().get(cls.backend, f"no {device.type} implementation")
            return f"backend {cls.backend!r} is not available on {device.type}: {why}"
        return None

    def _trainer(self, optimizer: str):
        from fastsae.trainer import TrainConfig, Trainer

        out = tempfile.mkdtemp(prefix="fastsae-bench-")
        self._dirs.append(out)
        cfg = TrainConfig(sae=self.cfg, steps=10**9, batch_size=self.shape.batch, lr=LR, optimizer=optimizer,
                          b_dec_init="zeros", init="tied", log_every=10**9, checkpoint_every=0,
                          out_dir=out, progress=False, console=False, plot=False)
        data = torch.zeros(self.shape.batch, self.shape.d_in, dtype=self.dtype)
        return Trainer(cfg, data, sae=self.sae)

    def encode(self, x):
        return self.sae.encode(x)

    def decode(self, acts):
        return self.sae.decode(acts)

    def step(self, x):
        self.trainer.train_step(x)

    def backward_case(self, x):
        """fastsae's backward is not autograd: the sparse gradient op the trainer calls."""
        from fastsae import ops

        sae = self.sae
        with torch.no_grad():
            acts = sae.encode(x)
            grad_out = ((2.0 / x.shape[0]) * (sae.decode(acts).float() - x.float())).to(sae.dtype)
        backward = ops.get("topk_sae_backward", sae.backend)
        return lambda: backward(x, acts.values, acts.indices, grad_out, sae.W_enc, sae.W_dec,
                                sae.b_dec if sae.cfg.apply_b_dec_to_input else None, row_sparse=True)

    def ops(self, x):
        out = super().ops(x)
        rsa = []  # built on first use: its optimizer state is not part of the measured step

        def step_row_sparse_adam():
            if not rsa:
                rsa.append(self._trainer("row_sparse_adam"))
            rsa[0].train_step(x)
        out["step_row_sparse_adam"] = step_row_sparse_adam
        return out

    def close(self):
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)


def _fastsae_backend(backend: str) -> type[FastSAE]:
    return type(f"FastSAE_{backend}", (FastSAE,), {"name": f"fastsae[{backend}]", "backend": backend})


class FastSAEAutograd(Adapter):
    """fastsae.TopKSAE used as a drop-in module in a plain user loop: training_forward, autograd
    backward through the backend's ops, torch.optim.Adam (fused). No trainer: what a user of the
    module alone runs."""

    distribution = "fastsae"
    backend: ClassVar[str] = ""
    notes = "fastsae.TopKSAE in a plain loop: training_forward().loss.backward(), torch Adam (fused)"
    unavailable = classmethod(FastSAE.unavailable.__func__)  # bound to this class, so it reads this backend

    def __init__(self, shape, device, dtype, weights):
        super().__init__(shape, device, dtype, weights)
        from fastsae import SAEConfig, TopKSAE
        from fastsae.config import dtype_to_str

        cfg = SAEConfig(d_in=shape.d_in, d_sae=shape.d_sae, architecture="topk", k=shape.k,
                        dtype=dtype_to_str(dtype), device=str(device), backend=self.backend)
        self.sae = TopKSAE(cfg)
        with torch.no_grad():
            for name, w in weights.items():
                getattr(self.sae, name).copy_(w)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=LR, fused=device.type in ("cpu", "cuda"))

    def encode(self, x):
        return self.sae.encode(x)

    def decode(self, acts):
        return self.sae.decode(acts)

    def _loss(self, x):
        return self.sae.training_forward(x).loss

    def _params(self):
        return list(self.sae.parameters())

    def _optimizer_step(self):
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _fastsae_autograd(backend: str) -> type[FastSAEAutograd]:
    return type(f"FastSAEAutograd_{backend}", (FastSAEAutograd,),
                {"name": f"fastsae[{backend}] module loop", "backend": backend})


# ------------------------------------------------------------------ plain dense PyTorch
class DenseTorch(Adapter):
    """The obvious PyTorch TopK SAE: dense [B, d_sae] activations, autograd, torch.optim.Adam."""

    name = "torch dense"
    distribution = "torch"
    notes = "plain PyTorch: dense [B, d_sae] activations, autograd, torch.optim.Adam"

    def __init__(self, shape, device, dtype, weights):
        super().__init__(shape, device, dtype, weights)
        self.p = {k: torch.nn.Parameter(v) for k, v in weights.items()}
        self.opt = torch.optim.Adam(self.p.values(), lr=LR)

    def encode(self, x):
        pre = (x - self.p["b_dec"]) @ self.p["W_enc"] + self.p["b_enc"]
        vals, idx = pre.topk(self.shape.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())

    def decode(self, acts):
        return acts @ self.p["W_dec"] + self.p["b_dec"]

    def _loss(self, x):
        return (self.decode(self.encode(x)) - x).pow(2).sum(-1).mean()

    def _params(self):
        return list(self.p.values())

    def _optimizer_step(self):
        self.opt.step()
        self.opt.zero_grad()


# ------------------------------------------------------------------ peers from PyPI
class LibraryPeer(Adapter):
    """A peer library's module in `self.sae`, trained with torch.optim.Adam."""

    module: ClassVar[str] = ""  # the import name, to tell whether it is installed

    @classmethod
    def unavailable(cls, device):
        if importlib.util.find_spec(cls.module) is None:
            return f"{cls.module} is not installed: pip install -e '.[bench]'"
        return None

    def encode(self, x):
        return self.sae.encode(x)

    def _params(self):
        return list(self.sae.parameters())


class SAELens(LibraryPeer):
    """sae_lens.TopKTrainingSAE with its defaults (rescale_acts_by_decoder_norm=True, dense
    activations); the step is SAELens's trainer's: training_forward_pass, backward,
    clip_grad_norm_(1.0), Adam."""

    name = "SAELens"
    distribution = "sae-lens"
    module = "sae_lens"
    notes = ("TopKTrainingSAE with its defaults (dense activations, rescale_acts_by_decoder_norm); step = "
             "training_forward_pass, backward, clip_grad_norm_, Adam, as its trainer")

    def __init__(self, shape, device, dtype, weights):
        super().__init__(shape, device, dtype, weights)
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

        cfg = TopKTrainingSAEConfig(d_in=shape.d_in, d_sae=shape.d_sae, k=shape.k,
                                    dtype=str(dtype).removeprefix("torch."), device=str(device))
        self.sae = TopKTrainingSAE(cfg)
        with torch.no_grad():
            for name, w in weights.items():
                getattr(self.sae, name).copy_(w)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=LR)

    def decode(self, acts):
        return self.sae.decode(acts)

    def _loss(self, x):
        from sae_lens.saes.sae import TrainStepInput

        step_input = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                    n_training_steps=0, is_logging_step=False)
        return self.sae.training_forward_pass(step_input).loss

    def _optimizer_step(self):
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()


# ------------------------------------------------------------------ sparsify
class Sparsify(LibraryPeer):
    """sparsify.SparseCoder (its fused encoder and sparse decoder); the step is sparsify's
    trainer's: forward (bf16 autocast on CUDA, as its forward is decorated), fvu.backward(),
    remove the decoder-parallel gradient, Adam. On CPU its Triton decoder cannot run, so
    SPARSIFY_DISABLE_TRITON=1 selects its eager embedding_bag decoder."""

    name = "sparsify"
    distribution = "eai-sparsify"
    module = "sparsify"
    env = {"cpu": {"SPARSIFY_DISABLE_TRITON": "1"}}  # set before sparsify is imported
    notes = ("SparseCoder: fused encoder, embedding-bag decoder (Triton on CUDA, eager on CPU), bf16 autocast "
             "forward on CUDA; step = fvu backward, decoder-parallel gradient removed, Adam, as its trainer")

    def __init__(self, shape, device, dtype, weights):
        super().__init__(shape, device, dtype, weights)
        from sparsify import SparseCoder, SparseCoderConfig

        cfg = SparseCoderConfig(num_latents=shape.d_sae, k=shape.k)
        self.sae = SparseCoder(shape.d_in, cfg, device=device, dtype=dtype)
        with torch.no_grad():
            self.sae.encoder.weight.copy_(weights["W_enc"].t())
            self.sae.encoder.bias.copy_(weights["b_enc"])
            self.sae.W_dec.copy_(weights["W_dec"])
            self.sae.b_dec.copy_(weights["b_dec"])
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=LR)

    def decode(self, acts):
        return self.sae.decode(acts.top_acts, acts.top_indices)

    def _loss(self, x):
        return self.sae(x).fvu

    def _optimizer_step(self):
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()


# ------------------------------------------------------------------ registry
FLOOR = GemmFloor.name
IMPLEMENTATIONS: dict[str, type[Adapter]] = {
    cls.name: cls
    for cls in (GemmFloor, *(_fastsae_backend(b) for b in ("triton", "cpp", "reference")),
                *(_fastsae_autograd(b) for b in ("triton", "cpp")), DenseTorch, SAELens, Sparsify)
}


def names() -> list[str]:
    return list(IMPLEMENTATIONS)


def adapter_class(name: str) -> type[Adapter]:
    try:
        return IMPLEMENTATIONS[name]
    except KeyError:
        raise ValueError(f"unknown implementation {name!r}: use one of {', '.join(IMPLEMENTATIONS)}") from None


def process_env(names_: list[str], device: torch.device) -> dict[str, str]:
    """Environment variables the implementations need set before their library is imported."""
    env: dict[str, str] = {}
    for n in names_:
        env.update(getattr(adapter_class(n), "env", {}).get(device.type, {}))
    return env


def build(name: str, shape: Shape, device, dtype, seed: int = 0) -> Adapter:
    """An adapter for `name` on `shape`, loaded with the shared seeded weights."""
    device = torch.device(device)
    for k, v in process_env([name], device).items():
        os.environ.setdefault(k, v)
    cls = adapter_class(name)
    return cls(shape, device, dtype, make_weights(shape, device, dtype, seed))
