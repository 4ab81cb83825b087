import os

import pytest
import torch

from fastsae.model import import_pypi_kernels

# The peers import transformers, which imports the PyPI `kernels`: not the repository's kernels/.
import_pypi_kernels()

# Triton kernels run on CPU tensors only under the interpreter, which must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """Tiny tensors: thread start-up and contention cost more than the math (opt in with
    pytestmark = pytest.mark.usefixtures("one_thread"))."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
