"""Checkpoint formats of other SAE libraries, one module each, behind one loader.

    fastsae.load(path)                       # format detected
    fastsae.load(path, format="sparsify", hookpoint="layers.6")
    fastsae.formats.save(sae, path, format="saelens")   # or "sparsify", "fastsae"

Every conversion (layouts, folded reparameterisations) happens once, at load time.
"""

from .detect import FORMATS, SAVABLE, detect_format, load, save

__all__ = ["FORMATS", "SAVABLE", "detect_format", "load", "save"]
