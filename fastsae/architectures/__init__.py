"""The SAE architectures, one file each. An architecture is a BaseSAE subclass (fastsae/sae.py)
registered with @register; adding one is a new file here plus its import below.

Each is written once, against the module's own latent slice and its parallel context, so the
same class is the whole SAE on one process and one shard of a sharded SAE.
"""

from .batchtopk import BatchTopKSAE
from .jumprelu import JumpReLUSAE
from .standard import StandardSAE
from .topk import TopKSAE

__all__ = ["StandardSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE"]
