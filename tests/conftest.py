"""Fixtures shared by several test modules."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (module scope: its module-scoped fixtures run under it too).

    The test models are tiny: a second OpenMP thread gains little, and on a shared, busy 2-core machine
    its synchronisation can make them several times slower; one thread keeps the run times predictable.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
