"""Training of multi-exit models: loss, optimizer and schedule, EMA, checkpoints, DDP, metrics.

``train(cfg, run_dir, device=None, resume=True) -> TrainResult`` is the entry point (the ``dynexit
train`` command and the experiment runner call it); ``MultiExitLoss`` the loss. The ``train`` section of
a run configuration (``TrainConfig``) and its validation live in :mod:`dynexit.config`.
"""
from dynexit.training.loop import TrainResult, load_metrics, train
from dynexit.training.loss import MultiExitLoss

__all__ = ["MultiExitLoss", "TrainResult", "load_metrics", "train"]
