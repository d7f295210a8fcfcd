"""DataLoaders of the three splits: seeded shuffling, DistributedSampler under torchrun, a pass that can start
mid-epoch (a run resumed from a mid-epoch checkpoint), and per-sample augmentation seeds where loader workers
draw the augmentations, so that the number of workers changes the speed and never the images."""
from __future__ import annotations

import itertools
import logging
import os
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from dynexit.data.splits import Splits

log = logging.getLogger(__name__)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in ``epoch``: a function of the three alone."""
    return int(np.random.SeedSequence([seed % 2**63, epoch, index]).generate_state(1, np.uint64)[0] % 2**63)


class ResumableRandomSampler(RandomSampler):
    """RandomSampler whose next pass starts ``skip`` samples in, skipping them without loading them (the
    permutation is still drawn whole, from the same generator, so the pass is the uninterrupted one's)."""

    skip = 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (an epoch-keyed shuffle: ``seed`` + epoch) whose next pass starts ``skip`` samples in.
    With ``seeded``, each sample comes as ``(index, seed)``, its augmentation seed (:func:`sample_seed`), which
    the data set draws that sample's augmentation from."""

    skip = 0
    seeded = False

    def __iter__(self):
        skip, self.skip = self.skip, 0
        indices = itertools.islice(super().__iter__(), skip, None)
        if not self.seeded:
            return indices
        return ((i, sample_seed(self.seed, self.epoch, i)) for i in indices)


def loader_workers(requested: int) -> int:
    """The loader workers each training process starts: ``requested`` (``data.num_workers``), at most one fewer
    than the CPUs this process may use (its affinity, which SLURM sets, shared by the ``LOCAL_WORLD_SIZE``
    processes torchrun starts on the node). Workers change the speed, never the images (see build_loaders)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        cores = os.cpu_count() or 1
    per_process = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    workers = min(requested, per_process - 1)
    if workers < requested:
        log.info("data.num_workers=%d, but this process has %d CPU(s): its loaders start %d worker(s)", requested,
                 per_process, workers)
    return workers


def build_loaders(splits: Splits, batch_size: int, num_workers: int = 0, distributed: bool = False,
                  seed: int = 0, eval_batch_size: Optional[int] = None, pin_memory: bool = False,
                  drop_last: Optional[bool] = None) -> dict[str, DataLoader]:
    """DataLoaders for ``splits``, keyed ``"train"``, ``"calib"``, ``"test"``.

    Train: in-memory images transformed batch-wise (the small recipe) load in this process, whatever
    ``num_workers`` (the batch transform is one gather; its random crops and flips come from torch's global
    generator, as the model's own randomness), shuffled by a generator seeded with ``seed`` (the same seed
    gives the same order), or, when ``distributed``, a DistributedSampler over the initialised process group
    (seeded with ``seed``; call ``set_epoch``). Images transformed one by one (image folders, the imagenet
    recipe) load in ``num_workers`` persistent workers, in an epoch-keyed order (``seed`` + epoch; call
    ``set_epoch``), each image's augmentation drawn from its own seed (:func:`sample_seed`): the same images
    with any number of workers. Another data set (one without ``takes_seeds``) draws from its worker's
    random state: its workers start afresh each epoch, seeded from ``generator`` (which checkpoints hold), so
    a run resumed at an epoch's end draws what an uninterrupted one draws. The train sampler's ``skip``
    starts its next pass that many samples in.
    ``drop_last`` (None: drop the last incomplete batch when the split holds at least one full batch)
    applies to train only. Calibration and test keep their order, are not sharded, and use
    ``eval_batch_size`` (default ``batch_size``).
    """
    for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    common = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)
    train = splits.train
    batched = getattr(train, "batched", False)
    seeded = getattr(train, "takes_seeds", False) and not batched
    generator = torch.Generator()
    replicas, rank = 1, 0
    if distributed:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("build_loaders(distributed=True) needs an initialised torch.distributed "
                             "process group")
        replicas, rank = dist.get_world_size(), dist.get_rank()
        generator.manual_seed(seed + rank)  # different augmentation seeds per rank
    else:
        generator.manual_seed(seed)
    if drop_last is None:
        drop_last = -(-len(train) // replicas) >= batch_size
    if distributed or seeded:
        sampler = ResumableDistributedSampler(train, num_replicas=replicas, rank=rank, shuffle=True, seed=seed,
                                              drop_last=drop_last)
        sampler.seeded = seeded
    else:
        sampler = ResumableRandomSampler(train, generator=generator)
    workers = 0 if batched else num_workers
    loaders = {"train": DataLoader(train, batch_size=batch_size, sampler=sampler, generator=generator,
                                   drop_last=drop_last, num_workers=workers, pin_memory=pin_memory,
                                   persistent_workers=seeded and workers > 0)}
    for name in ("calib", "test"):
        loaders[name] = DataLoader(getattr(splits, name), batch_size=eval_batch_size or batch_size,
                                   shuffle=False, drop_last=False, **common)
    return loaders
