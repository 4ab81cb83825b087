"""`fastsae.formats` is `fastsae.compat.formats` under its older name
(the checkpoint formats of other SAE libraries)."""

import sys

from .compat import formats as _real

sys.modules[__name__] = _real
