"""MSDNet (Huang et al., ICLR 2018): multi-scale dense networks with one exit per block.

The network keeps feature maps at ``len(grFactor)`` scales (resolution 1, 1/2, 1/4, ...). Every layer
adds ``growthRate * grFactor[s]`` channels at each scale ``s`` it keeps: half from a strided conv of the
finer scale, half from a conv of the same scale (all of it from the same scale at the finest kept
scale). Deeper layers drop the finest scales, with a 1x1 transition that shrinks the channels where one
is dropped. After each block a classifier reads the coarsest scale.

The model runs as segments, one per block: segment k is block k followed by classifier k (exit k), so
training, cost counting and early exit share one forward path.

Module and parameter names follow the reference implementation's state dict one-to-one
(``blocks.<i>.<j>.layers...``, ``classifier.<i>.m...``), so a reference checkpoint loads strictly
without renaming (see ``dynexit.models.msdnet_weights``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from dynexit.models.base import MultiExitModel
from dynexit.models.presets import check_preset
from dynexit.models.registry import ModelFamily, register_family

VARIANTS = ("cifar", "imagenet")
STEPMODES = ("even", "lin_grow")
PRUNES = ("max", "min")


@dataclass
class MSDNetConfig:
    """Everything that defines an MSDNet; the knob names are the reference's command-line arguments.

    ``variant``: ``cifar`` (3x3 stride-1 first conv; classifiers with ``head_channels`` = 128 channels)
    or ``imagenet`` (7x7 stride-2 conv + 3x3 max pool; classifiers as wide as their input).
    ``nBlocks`` blocks (= exits); block 0 has ``base`` layers, block i > 0 ``step`` layers (``stepmode``
    ``even``) or ``step * i + 1`` (``lin_grow``). ``nChannels``: first-layer width at scale 0;
    ``growthRate``: channels each layer adds at scale 0; ``grFactor`` / ``bnFactor``: per-scale width and
    bottleneck factors (their length is the number of scales). ``prune``: ``max`` drops the finest scale
    evenly along the depth, ``min`` only near the end; ``reduction``: channel factor of the transitions
    (0: none). ``head_channels``: classifier width (None: the variant's).
    """

    num_classes: int = 100
    input_size: int = 32
    variant: str = "cifar"
    nBlocks: int = 7
    step: int = 2
    stepmode: str = "even"
    base: int = 4
    nChannels: int = 16
    growthRate: int = 6
    grFactor: list[int] = field(default_factory=lambda: [1, 2, 4])
    bnFactor: list[int] = field(default_factory=lambda: [1, 2, 4])
    bottleneck: bool = True
    prune: str = "max"
    reduction: float = 0.5
    head_channels: int | None = None

    def __post_init__(self):
        validate(self)

    @property
    def num_scales(self) -> int:
        return len(self.grFactor)

    def block_layers(self) -> list[int]:
        """Number of MSDN layers in each block (the reference prints it as "steps")."""
        grow = (lambda i: self.step) if self.stepmode == "even" else (lambda i: self.step * i + 1)
        return [self.base] + [grow(i) for i in range(1, self.nBlocks)]


OVERRIDES = tuple(f.name for f in dataclasses.fields(MSDNetConfig))


def _check_int(cfg: MSDNetConfig, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"msdnet field {name!r} must be int, got {value!r}")
    if value < minimum:
        raise ValueError(f"msdnet field {name!r} must be >= {minimum}, got {value}")


def validate(cfg: MSDNetConfig) -> None:
    for name in ("num_classes", "input_size", "nBlocks", "base", "nChannels", "growthRate"):
        _check_int(cfg, name, 1)
    _check_int(cfg, "step", 0)
    if cfg.head_channels is not None:
        _check_int(cfg, "head_channels", 1)
    for name, allowed in (("variant", VARIANTS), ("stepmode", STEPMODES), ("prune", PRUNES)):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"msdnet field {name!r} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    if not isinstance(cfg.bottleneck, bool):
        raise TypeError(f"msdnet field 'bottleneck' must be bool, got {cfg.bottleneck!r}")
    if isinstance(cfg.reduction, bool) or not isinstance(cfg.reduction, (int, float)) or not 0 <= cfg.reduction <= 1:
        raise ValueError(f"msdnet field 'reduction' must be a number in [0, 1], got {cfg.reduction!r}")
    for name in ("grFactor", "bnFactor"):
        value = getattr(cfg, name)
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
            raise ValueError(f"msdnet field {name!r} must be a non-empty list of positive ints, got {value!r}")
    if len(cfg.bnFactor) != len(cfg.grFactor):
        raise ValueError(f"msdnet fields 'grFactor' and 'bnFactor' need one entry per scale, got "
                         f"{list(cfg.grFactor)} and {list(cfg.bnFactor)}")
    # A strided-plus-regular layer splits the growth of scale s >= 1 into two equal halves.
    odd = [s for s in range(1, len(cfg.grFactor)) if cfg.growthRate * cfg.grFactor[s] % 2]
    if odd:
        raise ValueError(f"msdnet field 'growthRate' ({cfg.growthRate}) times grFactor must be even at scales >= 1 "
                         f"(halved between the strided and the regular conv); odd at scale(s) {odd}")
    size = _coarsest_size(cfg)
    head = _after_head(size)
    if head != 1:
        raise ValueError(f"msdnet field 'input_size' ({cfg.input_size}) gives a {size}x{size} coarsest map and a "
                         f"{head}x{head} map after the classifier's convs and pooling; it must be 1x1 "
                         "(e.g. 28-32 px for the cifar variant with 3 scales, 224 px for imagenet with 4)")


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _coarsest_size(cfg: MSDNetConfig) -> int:
    size = cfg.input_size
    if cfg.variant == "imagenet":
        size = _conv_out(_conv_out(size, 7, 2, 3), 3, 2, 1)
    for _ in range(1, cfg.num_scales):
        size = _conv_out(size, 3, 2, 1)
    return size


def _after_head(size: int) -> int:
    return _conv_out(_conv_out(size, 3, 2, 1), 3, 2, 1) // 2


# ------------------------------------------------------------------------------------------ layers

class ConvBNReLU(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU, held in ``net``."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False),
                                 nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GrowthConv(nn.Module):
    """[1x1 bottleneck to min(c_in, bn_width * c_out) ->] 3x3 conv (stride 2 if ``down``), each Conv-BN-ReLU."""

    def __init__(self, c_in: int, c_out: int, down: bool, bottleneck: bool, bn_width: int):
        super().__init__()
        layers: list[nn.Module] = []
        inner = c_in
        if bottleneck:
            inner = min(c_in, bn_width * c_out)
            layers += [nn.Conv2d(c_in, inner, 1, bias=False), nn.BatchNorm2d(inner), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(inner, c_out, 3, 2 if down else 1, 1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ScaleGrowth(nn.Module):
    """The new features of one scale: the input, then [half the growth from the finer scale (strided),]
    the (rest of the) growth from the same scale, concatenated along the channels."""

    def __init__(self, c_finer: int | None, c_same: int, growth: int, bottleneck: bool,
                 bn_finer: int, bn_same: int):
        super().__init__()
        if c_finer is None:
            self.conv_down = None
            self.conv_normal = GrowthConv(c_same, growth, False, bottleneck, bn_same)
        else:
            self.conv_down = GrowthConv(c_finer, growth // 2, True, bottleneck, bn_finer)
            self.conv_normal = GrowthConv(c_same, growth // 2, False, bottleneck, bn_same)

    def forward(self, same: torch.Tensor, finer: torch.Tensor | None = None) -> torch.Tensor:
        if self.conv_down is None:
            return torch.cat([same, self.conv_normal(same)], dim=1)
        return torch.cat([same, self.conv_down(finer), self.conv_normal(same)], dim=1)


class FirstLayer(nn.Module):
    """Builds every scale from the image: scale 0 by the stem, each further one by a 3x3 stride-2 conv."""

    def __init__(self, cfg: MSDNetConfig):
        super().__init__()
        widths = [cfg.nChannels * g for g in cfg.grFactor]
        if cfg.variant == "cifar":
            stem: nn.Module = ConvBNReLU(3, widths[0], 3, 1, 1)
        else:  # the reference's ImageNet stem: a biased 7x7 stride-2 conv, BN, ReLU, 3x3 max pool
            stem = nn.Sequential(nn.Conv2d(3, widths[0], 7, 2, 3), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
                                 nn.MaxPool2d(3, 2, 1))
        self.layers = nn.ModuleList([stem])
        for s in range(1, cfg.num_scales):
            self.layers.append(ConvBNReLU(widths[s - 1], widths[s], 3, 2, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return features


class MSDNLayer(nn.Module):
    """One dense layer over the coarsest ``out_scales`` scales; it reads ``in_scales`` scales (one more
    where the finest is being dropped: that scale only feeds the strided conv of the next one)."""

    def __init__(self, cfg: MSDNetConfig, c_in: int, in_scales: int, out_scales: int):
        super().__init__()
        n = cfg.num_scales
        self.first_scale = n - out_scales
        self.in_first_scale = n - in_scales
        g, b = cfg.grFactor, cfg.bnFactor
        self.layers = nn.ModuleList()
        for s in range(self.first_scale, n):
            has_finer = s > self.first_scale or in_scales > out_scales
            self.layers.append(ScaleGrowth(c_in * g[s - 1] if has_finer else None, c_in * g[s],
                                           cfg.growthRate * g[s], cfg.bottleneck, b[s - 1] if has_finer else 0, b[s]))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for j, layer in enumerate(self.layers):
            i = self.first_scale + j - self.in_first_scale  # index of this scale in the input list
            out.append(layer(features[i], features[i - 1] if layer.conv_down is not None else None))
        return out


class Transition(nn.Module):
    """1x1 Conv-BN-ReLU per kept scale, shrinking the channels (after a scale is dropped)."""

    def __init__(self, cfg: MSDNetConfig, c_in: int, c_out: int, out_scales: int):
        super().__init__()
        first = cfg.num_scales - out_scales
        self.m = nn.ModuleList(ConvBNReLU(c_in * cfg.grFactor[s], c_out * cfg.grFactor[s], 1, 1, 0)
                               for s in range(first, cfg.num_scales))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(x) for conv, x in zip(self.m, features)]


class ExitHead(nn.Module):
    """Classifier on the coarsest scale: two 3x3 stride-2 Conv-BN-ReLU, 2x2 average pool, linear."""

    def __init__(self, c_in: int, width: int, num_classes: int):
        super().__init__()
        self.m = nn.Sequential(ConvBNReLU(c_in, width, 3, 2, 1), ConvBNReLU(width, width, 3, 2, 1), nn.AvgPool2d(2))
        self.linear = nn.Linear(width, num_classes)

    def forward(self, features: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.linear(self.m(features[-1]).flatten(1))


# -------------------------------------------------------------------------------------------- model

class MSDNetState(NamedTuple):
    """What flows between segments: the feature maps of the kept scales (finest first) and the logits
    of the exits run so far; every tensor has the batch first."""

    features: tuple[torch.Tensor, ...]
    logits: tuple[torch.Tensor, ...]

    def select(self, index: torch.Tensor) -> MSDNetState:
        """The state of the samples at ``index`` only."""
        return MSDNetState(tuple(f[index] for f in self.features), tuple(y[index] for y in self.logits))


def block_plan(cfg: MSDNetConfig) -> list[list[tuple]]:
    """Per block, its layers in order: ("first",), ("layer", c_in, in_scales, out_scales) or
    ("transition", c_in, c_out, out_scales); and the channel count (at scale 0's factor) after each
    block, as the last entry ("channels", c)."""
    n = cfg.num_scales
    layers_per_block = cfg.block_layers()
    total = sum(layers_per_block)
    interval = math.ceil(total / n)
    c, done, plan = cfg.nChannels, 0, []
    for count in layers_per_block:
        block: list[tuple] = [("first",)] if done == 0 else []
        for _ in range(count):
            done += 1
            if cfg.prune == "max":
                in_scales = n - max(0, done - 2) // interval
                out_scales = n - (done - 1) // interval
            else:
                in_scales = min(n, total - done + 2)
                out_scales = min(n, total - done + 1)
            block.append(("layer", c, in_scales, out_scales))
            c += cfg.growthRate
            if cfg.reduction > 0 and (
                (cfg.prune == "max" and in_scales > out_scales)
                or (cfg.prune == "min" and done in (total // 3, 2 * total // 3))
            ):
                shrunk = math.floor(cfg.reduction * c)
                block.append(("transition", c, shrunk, out_scales))
                c = shrunk
        block.append(("channels", c))
        plan.append(block)
    return plan


class MSDNet(MultiExitModel):
    """MSDNet; ``forward`` returns the logits of the ``nBlocks`` exits (``exit1`` ... ``exitN``)."""

    def __init__(self, cfg: MSDNetConfig):
        super().__init__()
        self.config = cfg
        self.exit_names = tuple(f"exit{k + 1}" for k in range(cfg.nBlocks))
        self.blocks = nn.ModuleList()
        self.classifier = nn.ModuleList()
        for block in block_plan(cfg):
            layers: list[nn.Module] = []
            for kind, *args in block:
                if kind == "first":
                    layers.append(FirstLayer(cfg))
                elif kind == "layer":
                    layers.append(MSDNLayer(cfg, *args))
                elif kind == "transition":
                    layers.append(Transition(cfg, *args))
            c_coarsest = block[-1][1] * cfg.grFactor[-1]
            width = cfg.head_channels or (128 if cfg.variant == "cifar" else c_coarsest)
            self.blocks.append(nn.Sequential(*layers))
            self.classifier.append(ExitHead(c_coarsest, width, cfg.num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's initialisation: convs N(0, 2 / (k*k*out)), BN at identity, linear biases at zero."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def init_state(self, images: torch.Tensor) -> MSDNetState:
        return MSDNetState((images,), ())

    def run_segment(self, k: int, s: MSDNetState) -> MSDNetState:
        """Runs block ``k`` and its classifier; the new exit's logits are ``state.logits[-1]``."""
        features = tuple(self.blocks[k](s.features[0] if k == 0 else list(s.features)))
        return MSDNetState(features, s.logits + (self.classifier[k](features),))


# ------------------------------------------------------------------------------------------ presets

MSDNET_PRESETS: dict[str, dict[str, Any]] = {
    # The reference's CIFAR-100 configurations (anytime and budgeted batch) and its ImageNet model.
    "msdnet_cifar_anytime": {"nBlocks": 7, "stepmode": "even", "step": 2, "base": 4},
    "msdnet_cifar_batch": {"nBlocks": 5, "stepmode": "lin_grow", "step": 1, "base": 1},
    "msdnet_imagenet": {"variant": "imagenet", "num_classes": 1000, "input_size": 224, "nBlocks": 5,
                        "stepmode": "even", "step": 4, "base": 4, "nChannels": 32, "growthRate": 16,
                        "grFactor": [1, 2, 4, 4], "bnFactor": [1, 2, 4, 4]},
    # For 28-32 px images on a CPU: the CIFAR widths, 4 blocks of 2 layers, 32-channel classifiers;
    # 0.0177 GMACs at 28 px (fvcore), about the cost of tiny_perceiver_t16.
    "msdnet_small": {"num_classes": 10, "input_size": 32, "nBlocks": 4, "stepmode": "even", "step": 2, "base": 2,
                     "head_channels": 32},
}


def msdnet_config(name: str, **overrides: Any) -> MSDNetConfig:
    """The configuration of MSDNet preset ``name`` with ``overrides`` applied (validated)."""
    if name not in MSDNET_PRESETS:
        raise ValueError(f"unknown MSDNet preset {name!r}; valid: {', '.join(sorted(MSDNET_PRESETS))}")
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"unknown override(s) {', '.join(unknown)} for {name}; valid: {', '.join(OVERRIDES)}")
    return MSDNetConfig(**{**MSDNET_PRESETS[name], **overrides})


for _name, _values in MSDNET_PRESETS.items():  # typed presets: a malformed one fails at import, named
    check_preset(_name, _values, MSDNetConfig)


register_family(ModelFamily(name="msdnet", config_class=MSDNetConfig, build=MSDNet, presets=MSDNET_PRESETS,
                            description="MSDNet (multi-scale dense network), faithful to its reference"))
