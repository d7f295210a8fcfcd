"""The same run gives the same numbers however it is scheduled.

A CPU kernel splits its sums across its threads, so the thread count changes the last bits of a result,
and training amplifies them (two threads instead of one moved a tiny run's test accuracy by 5 points).
A run therefore computes with the thread count its configuration gives (``train.threads``), whatever
process executes it (a runner worker, the runner's own process, a SLURM job, ``dynexit train``), and with
torch's deterministic algorithms on the CPU.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def run_threads(threads: int, deterministic_cpu: bool = True) -> Iterator[None]:
    """Runs the body with ``threads`` torch threads and, with ``deterministic_cpu``, torch's deterministic
    algorithms (a warning where an operation has none); both are restored afterwards.

    Pass ``deterministic_cpu=False`` for a CUDA run: there ``train.deterministic`` decides, because
    deterministic CUDA kernels cost speed.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"train.threads must be a positive integer, got {threads!r}")
    previous = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    if deterministic_cpu and not was_deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
