"""The SAE architectures, one file each. An architecture is a BaseSAE subclass (fastsae/sae.py)
registered with @register; adding one is a new file here plus its import below.

Each is written once, against the module's own latent slice and its parallel context, so the
same class is the whole SAE on one process and one shard of a sharded SAE. Transcoders and skip
connections are not architectures: any of these becomes one with SAEConfig(transcoder=True,
d_out=..., skip_connection=...).
"""

from .batchtopk import BatchTopKSAE
from .gated import GatedSAE
from .jumprelu import JumpReLUSAE
from .matryoshka import MatryoshkaBatchTopKSAE
from .standard import StandardSAE
from .topk import TopKSAE

__all__ = ["StandardSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "GatedSAE", "MatryoshkaBatchTopKSAE"]
