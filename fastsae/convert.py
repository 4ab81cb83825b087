"""`fastsae.convert` is `fastsae.compat.convert` under its older name
(live conversion of other libraries' SAE modules)."""

import sys

from .compat import convert as _real

sys.modules[__name__] = _real
