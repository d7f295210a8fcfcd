"""Training of multi-exit models: loss, optimizer and schedule, EMA, checkpoints, DDP, metrics.

``train(cfg, run_dir, device=None, resume=True) -> TrainResult`` is the entry point (the ``dynexit
train`` command and the experiment runner call it). ``TrainConfig`` is the ``train`` section of a
RunConfig; ``MultiExitLoss`` the loss.
"""
from __future__ import annotations

from typing import Any

from dynexit.training.config import TrainConfig, validate_train_config
from dynexit.training.loss import MultiExitLoss

# dynexit.config imports TrainConfig from this package, and the loop imports dynexit.config: the loop
# is loaded on first use to keep that cycle open.
_LAZY = {"train": "loop", "TrainResult": "loop", "load_metrics": "loop"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"dynexit.training.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'dynexit.training' has no attribute {name!r}")


__all__ = ["MultiExitLoss", "TrainConfig", "TrainResult", "load_metrics", "train", "validate_train_config"]
