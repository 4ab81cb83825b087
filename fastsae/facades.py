"""`fastsae.facades` is `fastsae.compat.facades` under its older name
(drop-in classes with SAELens's and sparsify's interfaces)."""

import sys

from .compat import facades as _real

sys.modules[__name__] = _real
