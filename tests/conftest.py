"""Fixtures shared by several test modules, and torch's threads under pytest-xdist."""
import os

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist (``make test``: one worker per core) each worker gets its share of the cores, so
    that two workers do not run four OpenMP threads on two cores; a test that sets threads still wins."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


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


# The files with the longest tests, longest first. Under pytest-xdist (--dist loadfile) files go to the
# workers in collection order, so starting with these keeps one worker from finishing a long file alone
# at the end while the other is idle (longest-first scheduling).
LONG_FILES = ("test_training.py", "test_runner_e2e.py", "test_analysis.py", "test_run_identity.py",
              "test_spec_runner.py", "test_cli_help.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: order within a file kept
