"""fastsae benchmarks: `python -m bench --quick` (CPU, about a minute) or `--full` (GPU).

Not an installed package: run from the repository root. Modules: timing (warm-up,
repeats, median and spread), memory (peaks, a fresh process per measurement), peers
(the implementations compared), worker (one implementation on one shape), sweep
(d_sae scaling and its plots), report (JSON + markdown under bench/results/).
"""

from fastsae.model import import_pypi_kernels

# The peers import transformers, which imports the PyPI `kernels`: not the repository's kernels/.
import_pypi_kernels()
