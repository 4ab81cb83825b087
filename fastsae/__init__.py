"""fastsae: fast sparse autoencoders for wide dictionaries.

    import fastsae
    sae = fastsae.TopKSAE(d_in=768, d_sae=32768, k=32)
    acts = sae.encode(x)          # SparseActs(values [..., k], indices [..., k])
    x_hat = sae.decode(acts)
    out = sae.training_forward(x) # .loss, .mse, .fvu, .sparsity, .l0
    sae.save_pretrained("ckpt"); sae = fastsae.load("ckpt")
"""

from .architectures import BatchTopKSAE, GatedSAE, JumpReLUSAE, MatryoshkaBatchTopKSAE, StandardSAE, TopKSAE
from .config import SAEConfig, TrainConfig
from .data import PairedSource
from .errors import CheckpointError, ConfigError, FastSAEError, InputError
from .malloc import keep_freed_memory
from .sae import SAE_CLASSES, BaseSAE, TrainOutput, build_sae, sae_class, sparse_architectures
from .sparse import SparseActs
from .trainer import Trainer, train

__version__ = "0.1.0"

# Subpackages loaded on first use (`fastsae.formats.save(...)` works after `import fastsae`);
# fastsae.distributed stays unloaded until a distributed run needs it.
_LAZY = ("compat", "convert", "distributed", "evaluate", "facades", "formats", "metrics", "model", "ops", "toy")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load(path, format=None, device=None, dtype=None, **options) -> BaseSAE:
    """Load an SAE checkpoint: fastsae's own (cfg.json + sae_weights.safetensors) or SAELens,
    sparsify, dictionary_learning, OpenAI or Gemma Scope (see fastsae.formats); the format is
    detected unless `format` names it. `options` go to that format's loader."""
    from .compat.formats import load as _load_any

    return _load_any(path, format=format, device=device, dtype=dtype, **options)


__all__ = [
    "SAEConfig", "BaseSAE", "StandardSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "GatedSAE",
    "MatryoshkaBatchTopKSAE", "PairedSource",
    "TrainOutput", "SparseActs", "SAE_CLASSES", "sae_class", "sparse_architectures", "build_sae", "load",
    "FastSAEError", "InputError", "ConfigError", "CheckpointError", "__version__",
]
__all__ += ["TrainConfig", "Trainer", "train", "keep_freed_memory"]
