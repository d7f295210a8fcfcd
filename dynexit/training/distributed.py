"""The process group of a training run: one process, or several started by ``torchrun`` (or by SLURM, one
task per GPU, which sets the same variables: ``dynexit.runs.slurm``).

``setup`` joins an already initialised group (a caller that set one up itself), or initialises one
from torchrun's environment variables (``WORLD_SIZE`` > 1): NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # whether ``close`` tears the group down (it was created here)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduces ``tensor`` in place over all processes (``op``: "sum" or "max") and returns it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every process (the others' argument is ignored)."""
        if not self.distributed:
            return bool(flag)
        tensor = torch.tensor([int(bool(flag))], device=self.device)
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (on every process)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def average_batchnorm_stats(model: torch.nn.Module, ctx: DistContext) -> None:
    """Replaces every BatchNorm layer's running mean and variance with their average over the processes
    (each process saw only its shard of the batches), so that every rank evaluates, and rank 0 saves, the
    statistics of the whole data. Nothing to do in one process."""
    if not ctx.distributed:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                if buffer is not None:
                    ctx.all_reduce(buffer.data)
                    buffer.data.div_(ctx.world_size)


def _resolve_device(device: str | torch.device | None, local_rank: int, distributed: bool) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested, but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank if distributed else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def setup(device: str | torch.device | None = None, timeout_min: float | None = None) -> DistContext:
    """The process group of this run (see the module docstring) and this process's device.

    ``device`` None picks CUDA when there is one (``cuda:LOCAL_RANK`` under torchrun), else the CPU; a
    bare "cuda" gets the local rank's index. ``timeout_min``: how long a collective waits for the other
    processes before failing (``train.dist_timeout_min``; None: torch's default, 10 minutes for NCCL), e.g.
    while the main process scans an image folder the others will read.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        return DistContext(rank, world, _resolve_device(device, local_rank, world > 1), owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(0, 1, _resolve_device(device, local_rank, False), owns_group=False)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    resolved = _resolve_device(device, local_rank, True)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    timeout = {} if timeout_min is None else {"timeout": timedelta(minutes=timeout_min)}
    dist.init_process_group(backend=backend, device_id=resolved if resolved.type == "cuda" else None, **timeout)
    log.info("process group: %s, rank %d of %d on %s", backend, dist.get_rank(), world, resolved)
    return DistContext(dist.get_rank(), dist.get_world_size(), resolved, owns_group=True)
