"""Exits on any backbone: internal classifiers after chosen stages of a staged CNN (SDN-style).

Shallow-Deep Networks (Kaya et al., ICML 2019) attach an internal classifier after intermediate layers
of an off-the-shelf network, each a feature reduction to a small map followed by a linear layer, and
keep the network's own head as the last exit. Here the backbone is any one of ``BACKBONES`` split into
stem and four stages, or any timm or torchvision CNN (``backbone="timm:resnet10t"``,
``"torchvision:resnet18"``) cut into stages where its feature map shrinks (``dynexit.models.backbones``),
and an internal classifier can follow any stage but the last (``exits_after``; default: every one):

    internal classifier: adaptive average pooling to pool_size x pool_size -> flatten -> Linear
    last exit ("stage4"):  the backbone's own head, exactly the StaticClassifier's (global average
                           pooling, its dropout, linear or MobileNetV3 hidden head)

SDN reduces with a learned mix of max and average pooling to 4x4; a plain average to a small grid
(2x2 by default: a little spatial layout at four times the width of a global average) is simpler and
costs one multiply-add per input element, which fvcore counts.

Exits are named after the stage they follow (``stage1`` ... ``stageN``); segment k runs the stages up
to exit k and that exit, so ``forward``, per-exit costs and real early exit run the same code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynexit.models.backbones import BACKBONES, backbone_spec, is_library_backbone
from dynexit.models.base import CNNExit, MultiExitModel, State, configured_backbone
from dynexit.models.presets import check_preset
from dynexit.models.registry import ModelFamily, register_family

STAGES = 4  # the named backbones have four stages; a library backbone has as many as its map shrinks


@dataclass
class BranchyConfig:
    """Everything that defines a backbone with internal exits.

    ``backbone``: a name of ``BACKBONES`` or ``"timm:NAME"`` / ``"torchvision:NAME"``. ``exits_after``: the
    stages (numbered from 1, as torchvision's ``layer1``...) after which an internal classifier sits,
    increasing; None: after every stage but the last; the head after the last stage is always the last exit.
    ``pool_size``: the internal classifiers average-pool their stage's output to ``pool_size x pool_size``.
    ``cnn_dropout`` and ``drop_path`` as in PerceiverConfig (None: the backbone's default).
    """

    backbone: str = "regnet_y_800mf"
    num_classes: int = 1000
    input_size: int = 224
    exits_after: list[int] | None = None
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
    "branchy": {},  # give the backbone: create_model("branchy", backbone="timm:resnet10t", num_classes=10, ...)
    **{f"branchy_{name}": {"backbone": name, **({"num_classes": 10, "input_size": 32} if name in _SMALL_BACKBONES
                                                else {})} for name in BACKBONES},
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
    if cfg.backbone not in BACKBONES and not is_library_backbone(cfg.backbone):
        raise ValueError(f"model field 'backbone': unknown {cfg.backbone!r}; valid: {', '.join(sorted(BACKBONES))}, "
                         f"or 'timm:NAME' or 'torchvision:NAME' for any CNN of those libraries")
    for name in ("num_classes", "input_size", "pool_size"):
        value = getattr(cfg, name)
        if not _is_int(value):
            raise TypeError(f"model field {name!r} must be int, got {value!r}")
        if value < 1:
            raise ValueError(f"model field {name!r} must be positive, got {value}")
    stages = cfg.exits_after
    if stages is not None:
        if not isinstance(stages, (list, tuple)) or not all(_is_int(s) for s in stages):
            raise TypeError(f"model field 'exits_after' must be a list of stage numbers, got {stages!r}")
        if not stages or stages[0] < 1 or list(stages) != sorted(set(stages)):
            raise ValueError(f"model field 'exits_after' must list increasing stage numbers from 1 (the head "
                             f"after the last stage is always the last exit), got {list(stages)!r}")
        if not is_library_backbone(cfg.backbone):
            check_exits_after(stages, STAGES)
    for name in ("cnn_dropout", "drop_path"):
        value = getattr(cfg, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"model field {name!r} must be float, got {value!r}")
        if not 0.0 <= value < 1.0:
            raise ValueError(f"model field {name!r} must be in [0, 1), got {value}")


def check_exits_after(stages: list[int], count: int) -> None:
    if any(s >= count for s in stages):
        raise ValueError(f"model field 'exits_after' must list stages from 1 to {count - 1}: the backbone has "
                         f"{count} stages and the head after stage {count} is always the last exit; got "
                         f"{list(stages)!r}")


class StageExit(nn.Module):
    """Internal classifier: average pooling to ``pool_size x pool_size``, flatten, linear."""

    def __init__(self, channels: int, num_classes: int, pool_size: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.fc = nn.Linear(channels * pool_size * pool_size, num_classes)

    def forward(self, s: State) -> torch.Tensor:
        return self.fc(self.pool(s.x).flatten(1))


class BranchyNet(MultiExitModel):
    """A staged backbone with internal classifiers after ``cfg.exits_after`` and its own head last;
    ``forward`` returns the logits of every exit, in stage order."""

    def __init__(self, cfg: BranchyConfig):
        super().__init__()
        self.config = cfg
        self.backbone, cnn_dropout = configured_backbone(cfg)
        # Output width of stage n (1-based): the input width of the next stage, the backbone's at the end.
        widths = (*self.backbone.stage_channels[1:], self.backbone.out_channels)
        count = len(self.backbone.stages)
        exits_after = list(range(1, count)) if cfg.exits_after is None else list(cfg.exits_after)
        check_exits_after(exits_after, count)
        stops = [*exits_after, count]
        self.exit_names = tuple(f"stage{n}" for n in stops)
        exits: dict[str, nn.Module] = {
            f"stage{n}": StageExit(widths[n - 1], cfg.num_classes, cfg.pool_size) for n in exits_after
        }
        exits[f"stage{count}"] = CNNExit(self.backbone.out_channels, cfg.num_classes,
                                         backbone_spec(cfg.backbone).head_hidden, cnn_dropout)
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


register_family(ModelFamily(name="branchy", config_class=BranchyConfig, build=BranchyNet, presets=BRANCHY_PRESETS,
                            description="internal classifiers after the stages of any backbone (SDN-style)"))
