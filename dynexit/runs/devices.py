"""The GPUs a run is given, and nothing else: the environment that shows a process exactly its devices, a
lock per device shared by every ``dynexit`` process of the user on the node, CUDA errors that retire a
worker, and the CPU cores this process may use.

Devices are named as this process sees them (``cuda:N`` indexes the parent's ``CUDA_VISIBLE_DEVICES``); a
child process is shown the parent's own entries for them, so ``cuda:4`` of a parent restricted to GPUs
``2,3,4,5,6,7`` is GPU 6 for the child too. Locks are named by the GPU's UUID, which every process sees the
same whatever its ``CUDA_VISIBLE_DEVICES`` or cgroup shows it (under SLURM every job's GPU is ``0``), so two
``dynexit`` processes wait for each other on one GPU instead of doubling up, and never on two different GPUs.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# Errors after which the CUDA context of a process cannot be trusted: the worker exits and is replaced.
CUDA_ERROR = re.compile(r"CUDA error|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|NCCL error|device-side assert")


def physical_ids(devices: list[str], visible: str | None = None) -> list[str]:
    """The parent's ``CUDA_VISIBLE_DEVICES`` entries of ``cuda:N`` devices (the indices themselves when the
    variable is unset). ``visible`` defaults to this process's variable."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    entries = [e.strip() for e in visible.split(",")] if visible is not None and visible.strip() else None
    out = []
    for device in devices:
        if not re.fullmatch(r"cuda:\d+", device):
            raise ValueError(f"not a CUDA device: {device!r} (expected cuda:N)")
        index = int(device[5:])
        if entries is not None and index >= len(entries):
            raise ValueError(f"{device} does not exist: CUDA_VISIBLE_DEVICES={visible} shows {len(entries)} GPU(s)")
        out.append(entries[index] if entries is not None else str(index))
    return out


def device_environment(devices: list[str], visible: str | None = None) -> dict[str, str]:
    """The environment that shows a child process exactly ``devices`` (no GPU for ``["cpu"]``); the child
    sees them as ``cuda:0`` .. ``cuda:<n-1>``, torchrun's local ranks."""
    if devices[0] == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    return {"CUDA_VISIBLE_DEVICES": ",".join(physical_ids(devices, visible))}


def lock_dir() -> Path:
    """A per-user folder for device locks: ``$XDG_RUNTIME_DIR/dynexit`` or ``<tmp>/dynexit-<uid>``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    folder = Path(base) / "dynexit" if base else Path(tempfile.gettempdir()) / f"dynexit-{os.getuid()}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def lock_names(devices: list[str]) -> list[str]:
    """The names of the locks of ``devices``: their GPUs' UUIDs (``GPU-...``; ``MIG-...`` for a MIG slice), none
    for the CPU. Reading them initialises CUDA in this process: call it in a process that picks its GPUs
    before (the runner, before it starts its workers), not in a worker that narrows its devices afterwards."""
    if devices[0] == "cpu":
        return []
    import torch

    names = []
    for device in devices:
        if not re.fullmatch(r"cuda:\d+", device):
            raise ValueError(f"not a CUDA device: {device!r} (expected cuda:N)")
        uuid = str(torch.cuda.get_device_properties(int(device[5:])).uuid)
        names.append(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    return names


@contextmanager
def device_locks(names: list[str], folder: Path | None = None) -> Iterator[None]:
    """Holds an exclusive lock on each GPU named (:func:`lock_names`), waiting while another process holds
    one; taken in a fixed order so that two groups never wait on each other."""
    if not names:
        yield
        return
    folder = folder or lock_dir()
    with ExitStack() as stack:
        for name in sorted(set(names)):
            fh = stack.enter_context(open(folder / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock", "a"))
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("GPU %s is in use by another dynexit process; waiting for it", name)
                fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def is_cuda_error(message: str) -> bool:
    """Whether a run's error leaves its process's CUDA context unusable (the worker is then replaced)."""
    return bool(CUDA_ERROR.search(message or ""))


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity, which SLURM and taskset restrict), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        return os.cpu_count() or 1
