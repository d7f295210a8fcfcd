"""Exits on any backbone: internal classifiers after chosen stages of a staged CNN (SDN-style).

Shallow-Deep Networks (Kaya et al., ICML 2019) attach an internal classifier after intermediate layers
of an off-the-shelf network, each a feature reduction to a small map followed by a linear layer, and
keep the network's own head as the last exit. Here the backbone is any one of ``BACKBONES`` split into
stem and four stages (``dynexit.models.backbones``), and an internal classifier can follow stage 1, 2
or 3:

    internal classifier: adaptive average pooling to pool_size x pool_size -> flatten -> Linear
    last exit ("stage4"):  the backbone's own head, exactly the StaticClassifier's (global average
                           pooling, its dropout, linear or MobileNetV3 hidden head)

SDN reduces with a learned mix of max and average pooling to 4x4; a plain average to a small grid
(2x2 by default: a little spatial layout at four times the width of a global average) is simpler and
costs one multiply-add per input element, which fvcore counts.

Exits are named after the stage they follow (``stage1`` ... ``stage4``); segment k runs the stages up
to exit k and that exit, so ``forward``, per-exit costs and real early exit run the same code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dynexit.models.backbones import BACKBONES
from dynexit.models.perceiver import CNNExit, MultiExitModel, State, _backbone
from dynexit.models.presets import check_preset

STAGES = 4  # every staged backbone has four stages; the last is followed by the backbone's head


@dataclass
class BranchyConfig:
    """Everything that defines a backbone with internal exits.

    ``exit_stages``: the stages (numbered 1-3, as torchvision's ``layer1``...) after which an internal
    classifier sits, increasing; the head after stage 4 is always the last exit. ``pool_size``: the
    internal classifiers average-pool their stage's output to ``pool_size x pool_size``.
    ``cnn_dropout`` and ``drop_path`` as in PerceiverConfig (None: the backbone's default).
    """

    backbone: str = "regnet_y_800mf"
    num_classes: int = 1000
    input_size: int = 224
    exit_stages: list[int] = field(default_factory=lambda: [1, 2, 3])
    pool_size: int = 2
    cnn_dropout: float | None = None  # dropout before the last exit's classifier
    drop_path: float | None = None  # stochastic depth (timm ResNet backbones only)

    def __post_init__(self):
        validate(self)


BRANCHY_OVERRIDES = tuple(f.name for f in dataclasses.fields(BranchyConfig))

# One preset per backbone, exits after stages 1, 2 and 3: ImageNet defaults (1000 classes, 224 px), and
# 10 classes at 32 px for the small backbones that train on a CPU.
_SMALL_BACKBONES = ("resnet_tiny", "resnet_small")
BRANCHY_PRESETS: dict[str, dict[str, Any]] = {
    f"branchy_{name}": {"backbone": name, **({"num_classes": 10, "input_size": 32} if name in _SMALL_BACKBONES else {})}
    for name in BACKBONES
}


def branchy_config(name: str, **overrides: Any) -> BranchyConfig:
    """The configuration of branchy preset ``name`` with ``overrides`` applied (validated)."""
    if name not in BRANCHY_PRESETS:
        raise ValueError(f"unknown branchy model {name!r}; valid: {', '.join(sorted(BRANCHY_PRESETS))}")
    unknown = sorted(set(overrides) - set(BRANCHY_OVERRIDES))
    if unknown:
        raise ValueError(f"unknown override(s) {', '.join(unknown)} for {name}; valid: {', '.join(BRANCHY_OVERRIDES)}")
    return BranchyConfig(**{**BRANCHY_PRESETS[name], **overrides})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(cfg: BranchyConfig) -> None:
    """Raises ValueError/TypeError naming the first bad field of ``cfg``."""
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"model field 'backbone': unknown {cfg.backbone!r}; valid: {', '.join(sorted(BACKBONES))}")
    for name in ("num_classes", "input_size", "pool_size"):
        value = getattr(cfg, name)
        if not _is_int(value):
            raise TypeError(f"model field {name!r} must be int, got {value!r}")
        if value < 1:
            raise ValueError(f"model field {name!r} must be positive, got {value}")
    stages = cfg.exit_stages
    if not isinstance(stages, (list, tuple)) or not all(_is_int(s) for s in stages):
        raise TypeError(f"model field 'exit_stages' must be a list of stage numbers, got {stages!r}")
    if not stages or any(not 1 <= s < STAGES for s in stages) or list(stages) != sorted(set(stages)):
        raise ValueError(f"model field 'exit_stages' must list increasing stage numbers from 1 to {STAGES - 1} "
                         f"(the head after stage {STAGES} is always the last exit), got {list(stages)!r}")
    for name in ("cnn_dropout", "drop_path"):
        value = getattr(cfg, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"model field {name!r} must be float, got {value!r}")
        if not 0.0 <= value < 1.0:
            raise ValueError(f"model field {name!r} must be in [0, 1), got {value}")


class StageExit(nn.Module):
    """Internal classifier: average pooling to ``pool_size x pool_size``, flatten, linear."""

    def __init__(self, channels: int, num_classes: int, pool_size: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.fc = nn.Linear(channels * pool_size * pool_size, num_classes)

    def forward(self, s: State) -> torch.Tensor:
        return self.fc(self.pool(s.x).flatten(1))


class BranchyNet(MultiExitModel):
    """A staged backbone with internal classifiers after ``cfg.exit_stages`` and its own head last;
    ``forward`` returns the logits of every exit, in stage order."""

    def __init__(self, cfg: BranchyConfig):
        super().__init__()
        self.config = cfg
        self.backbone, cnn_dropout = _backbone(cfg)
        # Output width of stage n (1-based): the input width of the next stage, the backbone's at the end.
        widths = (*self.backbone.stage_channels[1:], self.backbone.out_channels)
        stops = [*cfg.exit_stages, STAGES]
        self.exit_names = tuple(f"stage{n}" for n in stops)
        exits: dict[str, nn.Module] = {
            f"stage{n}": StageExit(widths[n - 1], cfg.num_classes, cfg.pool_size) for n in cfg.exit_stages
        }
        exits[f"stage{STAGES}"] = CNNExit(self.backbone.out_channels, cfg.num_classes,
                                          BACKBONES[cfg.backbone].head_hidden, cnn_dropout)
        self.exits = nn.ModuleDict(exits)
        plan, done = [], 0
        for n in stops:  # segment: the stages not run yet up to stage n, then the exit after it
            steps = [("stem", 0)] if not plan else []
            steps += [("cnn", i) for i in range(done, n)]
            plan.append((*steps, ("exit", f"stage{n}")))
            done = n
        self.segment_plan = tuple(plan)

    def init_state(self, images: torch.Tensor) -> State:
        return State(images, images.new_zeros(images.shape[0], 0, 0), ())


for _name, _values in BRANCHY_PRESETS.items():  # typed presets: a malformed one fails at import, named
    check_preset(_name, _values, BranchyConfig)
