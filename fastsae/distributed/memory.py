"""The memory model lives in fastsae.memory; this name (python -m fastsae.distributed.memory)
is kept as an alias of it."""

import sys

from .. import memory as _memory

if __name__ == "__main__":
    raise SystemExit(_memory.main())
sys.modules[__name__] = _memory
