"""DataLoaders of the three splits: seeded shuffling, DistributedSampler under torchrun."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader

from dynexit.data.splits import Splits


def build_loaders(splits: Splits, batch_size: int, num_workers: int = 0, distributed: bool = False,
                  seed: int = 0, eval_batch_size: Optional[int] = None, pin_memory: bool = False,
                  drop_last: Optional[bool] = None) -> dict[str, DataLoader]:
    """DataLoaders for ``splits``, keyed ``"train"``, ``"calib"``, ``"test"``.

    Train: shuffled by a generator seeded with ``seed`` (the same seed gives the same order and the same
    worker seeds), or, when ``distributed``, a DistributedSampler over the initialised process group
    (seeded with ``seed``; call ``set_epoch``). ``drop_last`` (None: drop the last incomplete batch when
    the split holds at least one full batch) applies to train only. Calibration and test keep their
    order, are not sharded, and use ``eval_batch_size`` (default ``batch_size``).
    """
    for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    common = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)
    train = splits.train
    generator = torch.Generator()
    sampler = None
    per_replica = len(train)
    if distributed:
        import torch.distributed as dist
        from torch.utils.data.distributed import DistributedSampler

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("build_loaders(distributed=True) needs an initialised torch.distributed "
                             "process group")
        per_replica = -(-len(train) // dist.get_world_size())
        generator.manual_seed(seed + dist.get_rank())  # different augmentation seeds per rank
    else:
        generator.manual_seed(seed)
    if drop_last is None:
        drop_last = per_replica >= batch_size
    if distributed:
        sampler = DistributedSampler(train, shuffle=True, seed=seed, drop_last=drop_last)
    # Train workers start afresh each epoch, seeded from ``generator`` (saved in checkpoints): a run resumed
    # at an epoch boundary draws the augmentations of an uninterrupted one, workers or not. Persistent
    # workers would carry their random state over epochs, where no checkpoint holds it.
    loaders = {"train": DataLoader(train, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                                   generator=generator, drop_last=drop_last,
                                   **{**common, "persistent_workers": False})}
    for name in ("calib", "test"):
        loaders[name] = DataLoader(getattr(splits, name), batch_size=eval_batch_size or batch_size,
                                   shuffle=False, drop_last=False, **common)
    return loaders
