import os
import sys
from pathlib import Path

# `pytest bench/` from anywhere: the suites import `bench` from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# sparsify's decoder is a Triton kernel, which cannot take CPU tensors; its eager path can.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
