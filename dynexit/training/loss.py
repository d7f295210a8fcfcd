"""Multi-exit loss: a weighted cross-entropy per named exit plus self-distillation from the last exit.

For exits e_1..e_K with logits y_k and weights w_k (keyed by exit name):

    L = sum_k w_k * CE(y_k, target) + alpha * T^2 * sum_{k<K} KL(softmax(y_K.detach() / T) || softmax(y_k / T))

with the KL averaged over the batch ("batchmean"), as in the official training code (the paper's Eq. 3
weighs CE and KL differently; see reference/paper-numbers.md). Targets are class indices, or soft
targets (B, classes) such as Mixup/CutMix produce. A one-exit model gets plain cross-entropy.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dynexit.config import check_exit_weights


class LossOutput(NamedTuple):
    total: torch.Tensor  # the scalar to minimise
    per_exit: torch.Tensor  # (K,) unweighted cross-entropy of each exit, detached
    distill: torch.Tensor  # the summed KL term before alpha * T^2, detached (0 when off)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c target_c * log_softmax(logits)_c (timm's SoftTargetCrossEntropy)."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


class MultiExitLoss(nn.Module):
    """The training loss of a multi-exit model; ``forward(logits, target) -> LossOutput``.

    ``weights`` maps every exit name of the model to its weight; an unknown name is a ValueError. A
    model with one exit ignores ``weights`` and ``distill_alpha``: its loss is plain cross-entropy.
    ``label_smoothing`` applies to class-index targets (soft targets carry their own smoothing).
    """

    def __init__(self, exit_names: Sequence[str], weights: Mapping[str, float] | None = None,
                 distill_alpha: float = 0.0, temperature: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        self.exit_names = tuple(exit_names)
        if not self.exit_names:
            raise ValueError("a model needs at least one exit")
        if temperature <= 0:
            raise ValueError(f"train.distill_temperature must be positive, got {temperature}")
        single = len(self.exit_names) == 1
        values = [1.0] if single else check_exit_weights(self.exit_names, weights or {})
        self.register_buffer("weights", torch.tensor(values), persistent=False)
        self.distill_alpha = 0.0 if single else float(distill_alpha)
        self.temperature = float(temperature)
        self.label_smoothing = float(label_smoothing)

    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.is_floating_point():
            return soft_cross_entropy(logits, target)
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def forward(self, logits: Sequence[torch.Tensor], target: torch.Tensor) -> LossOutput:
        if len(logits) != len(self.exit_names):
            raise ValueError(f"expected logits of {len(self.exit_names)} exits ({', '.join(self.exit_names)}), "
                             f"got {len(logits)}")
        logits = [y.float() for y in logits]  # under autocast the heads give bfloat16
        per_exit = torch.stack([self.cross_entropy(y, target) for y in logits])
        total = (per_exit * self.weights.to(per_exit.device)).sum()
        distill = per_exit.new_zeros(())
        if self.distill_alpha > 0:
            t = self.temperature
            teacher = F.softmax(logits[-1].detach() / t, dim=-1)
            for y in logits[:-1]:
                distill = distill + F.kl_div(F.log_softmax(y / t, dim=-1), teacher, reduction="batchmean")
            total = total + self.distill_alpha * t * t * distill
        return LossOutput(total, per_exit.detach(), distill.detach())
