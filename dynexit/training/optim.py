"""Optimizer, learning-rate schedule and weight EMA of the training loop."""
from __future__ import annotations

import math

import torch
from torch import nn

from dynexit.config import TrainConfig, milestone_epochs


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Two groups: weight decay on tensors of 2 or more dimensions (including the latent tokens), none on
    biases and 1-D parameters (norm scales and shifts), as in the official recipe; with ``decay_all``,
    one group that decays every parameter (as MSDNet's reference does)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    if decay_all:
        return [{"params": decay + no_decay, "weight_decay": weight_decay}]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer``: AdamW (``betas``, ``eps``) or SGD (``momentum``, ``nesterov``), at ``cfg.lr``
    with the weight decay of :func:`param_groups`."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_all)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    raise ValueError(f"train.optimizer must be one of adamw, sgd, got {cfg.optimizer!r}")


def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of a run of ``cfg.epochs`` epochs of
    ``steps_per_epoch`` steps: ``cfg.warmup_epochs`` of linear warm-up, then ``cfg.schedule``."""
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        return lr_at(step, cfg.epochs * steps_per_epoch, warmup_steps, cfg.lr, cfg.min_lr)
    if cfg.schedule == "multistep":
        return multistep_lr(step, steps_per_epoch, warmup_steps, cfg.lr,
                            milestone_epochs(cfg.milestones, cfg.epochs), cfg.lr_decay)
    raise ValueError(f"train.schedule must be one of cosine, multistep, got {cfg.schedule!r}")


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up to ``base_lr`` over
    ``warmup_steps`` steps (the first at base_lr / warmup_steps), then a half cosine from ``base_lr`` down
    to ``min_lr`` at the last step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def multistep_lr(step: int, steps_per_epoch: int, warmup_steps: int, base_lr: float,
                 milestones: list[int], decay: float) -> float:
    """Linear warm-up as :func:`lr_at`, then ``base_lr`` times ``decay`` once for every milestone epoch
    that the epoch of ``step`` (``step // steps_per_epoch``) has reached."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    epoch = step // steps_per_epoch
    return base_lr * decay ** sum(epoch >= m for m in milestones)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_ema(model: nn.Module, cfg: TrainConfig):
    """timm's ModelEmaV3 of ``model`` (parameters and buffers), or None when ``cfg.ema`` is off.

    Update it with ``ema.update(model, step)``, ``step`` counting optimizer steps from 1: the first update
    copies the weights, later ones decay by ``ema_decay`` (ramped up from 0 with ``ema_warmup``).
    """
    if not cfg.ema:
        return None
    from timm.utils.model_ema import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)
