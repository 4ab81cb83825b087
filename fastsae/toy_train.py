"""`fastsae.toy_train` is `fastsae.toy.train` under its older name (toy-data training helpers)."""

import sys

from .toy import train as _real

sys.modules[__name__] = _real
