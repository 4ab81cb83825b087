"""An autouse fixture for the toy tests: import it into a test module to run it on one thread.

Tiny shapes run fastest on one thread, and multi-threaded BLAS on a shared, busy machine can
be 30x slower than one thread.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
