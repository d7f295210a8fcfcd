"""The building blocks that the model families share: the state between segments of a staged model, the
base class that runs a model's segments (one forward path for training, costs and early exit), the classifier
heads and the configured backbone."""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from dynexit.models.backbones import StagedBackbone, backbone_spec, build_backbone


class State(NamedTuple):
    """What flows between segments; every tensor has the batch first, so samples can be dropped."""

    x: torch.Tensor  # CNN feature map (B, C, H, W)
    z: torch.Tensor  # latent tokens (B, N, C)
    logits: tuple[torch.Tensor, ...]  # logits of the exits run so far

    def select(self, index: torch.Tensor) -> State:
        """The state of the samples at ``index`` only."""
        return State(self.x[index], self.z[index], tuple(y[index] for y in self.logits))


class MultiExitModel(nn.Module):
    """Common interface of the models here: named exits, segments, the state between them.

    Subclasses define ``segment_plan``, ``exit_names``, ``init_state``, ``backbone`` and ``exits``, and
    extend ``_step`` with their own kinds of step.
    """

    segment_plan: tuple
    exit_names: tuple[str, ...]

    @property
    def num_exits(self) -> int:
        return len(self.exit_names)

    backbone: StagedBackbone
    exits: nn.ModuleDict

    def init_state(self, images: torch.Tensor) -> State:
        raise NotImplementedError

    def _step(self, step: tuple[str, int | str], s: State) -> State:
        kind, i = step
        if kind == "stem":
            return s._replace(x=self.backbone.stem(s.x))
        if kind == "cnn":
            return s._replace(x=self.backbone.stages[i](s.x))
        if kind == "exit":
            return s._replace(logits=s.logits + (self.exits[i](s),))
        raise ValueError(f"unknown step {step!r}")

    def run_segment(self, k: int, s: State) -> State:
        """Runs segment ``k``; the new exit's logits are ``state.logits[-1]``."""
        for step in self.segment_plan[k]:
            s = self._step(step, s)
        return s

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, in exit order."""
        s = self.init_state(images)
        for k in range(self.num_exits):
            s = self.run_segment(k, s)
        return list(s.logits)


def classifier(in_features: int, num_classes: int, hidden: int | None, norm: bool = False) -> nn.Module:
    """A linear classifier, or Linear-Hardswish-Dropout(0.2)-Linear where the backbone has a hidden head;
    ``norm`` puts a BatchNorm1d in front (the merge exit)."""
    if hidden is None and not norm:
        return nn.Linear(in_features, num_classes)
    layers: list[nn.Module] = [nn.BatchNorm1d(in_features)] if norm else []
    if hidden is None:
        layers.append(nn.Linear(in_features, num_classes))
    else:
        layers += [nn.Linear(in_features, hidden), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


class CNNExit(nn.Module):
    """Exit on the CNN branch: global average pooling -> classifier."""

    def __init__(self, channels: int, num_classes: int, hidden: int | None, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = classifier(channels, num_classes, hidden)

    def forward(self, s: State) -> torch.Tensor:
        return self.fc(self.drop(s.x.mean(dim=(2, 3))))


def configured_backbone(cfg: Any) -> tuple[StagedBackbone, float]:
    """The configured backbone and the dropout before its classifier (backbone defaults where unset)."""
    spec = backbone_spec(cfg.backbone)
    drop_path = spec.drop_path if cfg.drop_path is None else cfg.drop_path
    cnn_dropout = spec.cnn_dropout if cfg.cnn_dropout is None else cfg.cnn_dropout
    return build_backbone(cfg.backbone, drop_path, cfg.input_size), cnn_dropout
