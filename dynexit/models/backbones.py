"""CNN backbones as stem + four stages, adapted from torchvision and timm (no copies of their code).

The adapter only regroups the library's own modules, so torchvision or timm ImageNet weights load into
the CNN branch through ``load_backbone_weights``. The Dyn-Perceiver latent branch attaches to the input
of each stage, so each backbone reports its four stage-input widths and its output width.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from timm.models.resnet import BasicBlock, Bottleneck, make_blocks
from torch import nn

from dynexit.utils import load_torch_file

log = logging.getLogger(__name__)


class StagedBackbone(nn.Module):
    """A CNN split into ``stem`` and four ``stages``.

    ``source_prefixes`` maps each adapter prefix (``stem.0``, ``stages.1`` ...) to the prefix of the same
    module in the library's own model, for loading the library's weights.
    """

    def __init__(self, stem: nn.Module, stages: list[nn.Module], source_prefixes: dict[str, str]):
        super().__init__()
        if len(stages) != 4:
            raise ValueError(f"a staged backbone needs 4 stages, got {len(stages)}")
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.source_prefixes = source_prefixes
        widths = [_out_channels(stem)] + [_out_channels(s) for s in stages]
        self.stage_channels = tuple(widths[:4])  # input width of each stage
        self.out_channels = widths[4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x


def _out_channels(module: nn.Module) -> int:
    """Width of a CNN block's output: the size of its last BatchNorm."""
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        raise ValueError(f"cannot tell the output width of {type(module).__name__}: no BatchNorm2d")
    return norms[-1].num_features


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and the defaults of its classifier heads."""

    build: Callable[[float], StagedBackbone]  # argument: drop-path rate
    cnn_dropout: float = 0.0  # dropout before the CNN exit's classifier
    drop_path: float = 0.0  # stochastic depth (timm ResNet only)
    head_hidden: int | None = None  # hidden width of the classifiers (MobileNetV3 style), else linear
    description: str = ""


def _regnet(name: str) -> Callable[[float], StagedBackbone]:
    def build(drop_path: float) -> StagedBackbone:
        _no_drop_path(name, drop_path)
        net = getattr(torchvision.models, name)()
        stages = list(net.trunk_output.children())
        prefixes = {"stem": "stem", **{f"stages.{i}": f"trunk_output.block{i + 1}" for i in range(4)}}
        return StagedBackbone(net.stem, stages, prefixes)

    return build


def _timm_resnet(block, layers, channels, stem_width, small_input=False) -> Callable[[float], StagedBackbone]:
    """A timm ResNet of any stem and stage widths, from timm's own block builder.

    timm's ``ResNet`` fixes a plain stem at 64 channels, so the stem is built here (7x7/2 conv, BN, ReLU,
    3x3/2 max-pool; or a 3x3/1 conv without pooling for 28-32 px images) and the stages by
    ``timm.models.resnet.make_blocks``, initialised as timm initialises its ResNets.
    """

    def build(drop_path: float) -> StagedBackbone:
        if small_input:
            conv, pool = nn.Conv2d(3, stem_width, 3, padding=1, bias=False), nn.Identity()
        else:
            conv, pool = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False), nn.MaxPool2d(3, 2, 1)
        stem = nn.Sequential(conv, nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True), pool)
        named_stages, _ = make_blocks((block,) * 4, channels, layers, stem_width, drop_path_rate=drop_path)
        stages = [stage for _, stage in named_stages]
        for module in [stem, *stages]:
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()
        prefixes = {"stem.0": "conv1", "stem.1": "bn1", **{f"stages.{i}": f"layer{i + 1}" for i in range(4)}}
        return StagedBackbone(stem, stages, prefixes)

    return build


# MobileNetV3-Large: torchvision's `features` cut at these indices (stem = 0:3, stages after).
_MOBILENET_CUTS = (0, 3, 5, 8, 14, 17)


def _mobilenet_v3_large(width_mult: float) -> Callable[[float], StagedBackbone]:
    def build(drop_path: float) -> StagedBackbone:
        _no_drop_path("mobilenet_v3_large", drop_path)
        features = torchvision.models.mobilenet_v3_large(width_mult=width_mult).features
        parts, prefixes = [], {}
        for p, (start, stop) in enumerate(zip(_MOBILENET_CUTS, _MOBILENET_CUTS[1:])):
            parts.append(nn.Sequential(*features[start:stop]))
            name = "stem" if p == 0 else f"stages.{p - 1}"
            prefixes.update({f"{name}.{j}": f"features.{start + j}" for j in range(stop - start)})
        return StagedBackbone(parts[0], parts[1:], prefixes)

    return build


def _no_drop_path(name: str, drop_path: float) -> None:
    if drop_path:
        raise ValueError(f"drop_path is only supported by the timm ResNet backbones, not {name}")


BACKBONES: dict[str, BackboneSpec] = {
    "regnet_y_400mf": BackboneSpec(_regnet("regnet_y_400mf"), description="torchvision RegNetY-400MF"),
    "regnet_y_800mf": BackboneSpec(_regnet("regnet_y_800mf"), description="torchvision RegNetY-800MF"),
    "regnet_y_1_6gf": BackboneSpec(_regnet("regnet_y_1_6gf"), description="torchvision RegNetY-1.6GF"),
    "regnet_y_3_2gf": BackboneSpec(_regnet("regnet_y_3_2gf"), description="torchvision RegNetY-3.2GF"),
    "resnet50_0375": BackboneSpec(
        _timm_resnet(Bottleneck, (3, 4, 6, 3), (24, 48, 96, 192), 24),
        cnn_dropout=0.2,
        drop_path=0.2,
        description="timm ResNet-50 with every width scaled by 0.375",
    ),
    "mobilenet_v3_large_0x75": BackboneSpec(
        _mobilenet_v3_large(0.75), head_hidden=960, description="torchvision MobileNetV3-Large x0.75"
    ),
    # Small backbones for 28-32 px images on a CPU.
    "resnet_tiny": BackboneSpec(
        _timm_resnet(BasicBlock, (1, 1, 1, 1), (16, 32, 64, 128), 16, small_input=True),
        description="timm ResNet, basic blocks 1-1-1-1, widths 16-32-64-128, 3x3 stride-1 stem",
    ),
    "resnet_small": BackboneSpec(
        _timm_resnet(BasicBlock, (2, 2, 2, 2), (32, 64, 128, 256), 32, small_input=True),
        description="timm ResNet, basic blocks 2-2-2-2, widths 32-64-128-256, 3x3 stride-1 stem",
    ),
}


def build_backbone(name: str, drop_path: float) -> StagedBackbone:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name].build(drop_path)


def load_backbone_weights(backbone: StagedBackbone, weights: str | Path | dict) -> list[str]:
    """Loads a torchvision or timm state dict of the whole classifier into the CNN branch.

    Keys of the library model outside stem and stages (its classifier) are skipped and returned; every
    backbone parameter must be present with the right shape, else a ValueError names the culprits.
    """
    where = str(weights) if isinstance(weights, (str, Path)) else "backbone weights"
    state = _read_state_dict(weights, where)
    own = backbone.state_dict()
    loaded, missing, wrong = {}, [], []
    for key, value in own.items():
        source = _source_key(key, backbone.source_prefixes)
        if source not in state:
            missing.append(f"{key} (expected {source})")
        elif tuple(state[source].shape) != tuple(value.shape):
            wrong.append(f"{source}: {tuple(state[source].shape)} != {tuple(value.shape)}")
        else:
            loaded[key] = state[source]
    if missing or wrong:
        raise ValueError(
            f"{where} does not fit the backbone: "
            + "; ".join([f"missing {m}" for m in missing] + [f"wrong shape {w}" for w in wrong])
        )
    backbone.load_state_dict(loaded)
    used = {_source_key(k, backbone.source_prefixes) for k in own}
    skipped = sorted(k for k in state if k not in used)
    log.info("loaded %d backbone tensors; skipped %d (%s)", len(loaded), len(skipped), ", ".join(skipped[:4]))
    return skipped


def _source_key(key: str, prefixes: dict[str, str]) -> str:
    # Longest adapter prefix first, so that "stem.0" wins over "stem".
    for prefix in sorted(prefixes, key=len, reverse=True):
        if key == prefix or key.startswith(prefix + "."):
            return prefixes[prefix] + key[len(prefix):]
    raise KeyError(key)


def _read_state_dict(weights: str | Path | dict, where: str) -> dict[str, torch.Tensor]:
    if isinstance(weights, (str, Path)):
        weights = load_torch_file(weights, "backbone weights file")
    for key in ("state_dict", "model"):
        if isinstance(weights, dict) and isinstance(weights.get(key), dict):
            weights = weights[key]
    if not isinstance(weights, dict):
        raise ValueError(f"{where} is not a state dict (got {type(weights).__name__})")
    return weights
