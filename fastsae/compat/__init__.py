"""Other libraries' SAEs: their checkpoint formats (fastsae.compat.formats), live modules
(fastsae.compat.convert) and look-alike classes (fastsae.compat.facades)."""
