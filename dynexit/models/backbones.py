"""CNN backbones as a stem and stages, adapted from torchvision and timm (no copies of their code).

The adapter only regroups the library's own modules, so torchvision or timm ImageNet weights load into
the CNN branch through ``load_backbone_weights``. The Dyn-Perceiver latent branch attaches to the input
of each of four stages, so each backbone reports its stage-input widths and its output width.

Two kinds: the named backbones of ``BACKBONES`` (four stages each; ``register_backbone`` adds one), and any
timm or torchvision CNN named ``"timm:NAME"`` or ``"torchvision:NAME"`` (:func:`library_backbone`): the
library's model run as the sequence of its modules, cut into stages where its feature map shrinks.
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

from dynexit.utils import eval_mode, load_torch_file

log = logging.getLogger(__name__)


class StagedBackbone(nn.Module):
    """A CNN split into ``stem`` and four ``stages``.

    ``source_prefixes`` maps each adapter prefix (``stem.0``, ``stages.1`` ...) to the prefix of the same
    module in the library's own model, for loading the library's weights.
    """

    def __init__(self, stem: nn.Module, stages: list[nn.Module], source_prefixes: dict[str, str],
                 widths: list[int] | None = None):
        super().__init__()
        if not stages:
            raise ValueError("a staged backbone needs at least one stage")
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.source_prefixes = source_prefixes
        widths = widths or [_out_channels(stem)] + [_out_channels(s) for s in stages]
        self.stage_channels = tuple(widths[:-1])  # input width of each stage
        self.out_channels = widths[-1]

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


def register_backbone(name: str, spec: BackboneSpec) -> None:
    """Adds a named backbone (``spec.build(drop_path)`` returns a StagedBackbone of four stages) for
    Dyn-Perceiver and branchy models: ``create_model("branchy", backbone=name)``. ValueError for a name
    taken or of the form of a library backbone."""
    if not isinstance(spec, BackboneSpec):
        raise TypeError(f"register_backbone({name!r}, ...) takes a BackboneSpec, got {type(spec).__name__}")
    if name in BACKBONES or is_library_backbone(name):
        raise ValueError(f"backbone name {name!r} is taken (or names a timm/torchvision model); choose another")
    BACKBONES[name] = spec


LIBRARIES = ("timm", "torchvision")
LIBRARY_SPEC = BackboneSpec(build=lambda drop_path: None, description="a timm or torchvision CNN, untrained")


def backbone_spec(name: str) -> BackboneSpec:
    """The defaults of backbone ``name``'s heads (a library backbone: a linear head, no dropout)."""
    if is_library_backbone(name):
        return LIBRARY_SPEC
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(sorted(BACKBONES))}, or 'timm:NAME' or "
                         f"'torchvision:NAME' for any CNN of those libraries")
    return BACKBONES[name]


def is_library_backbone(name: object) -> bool:
    """Whether ``name`` names a timm or torchvision model (``"timm:resnet10t"``, ``"torchvision:resnet18"``)."""
    return isinstance(name, str) and name.partition(":")[0] in LIBRARIES and bool(name.partition(":")[2])


def build_backbone(name: str, drop_path: float, input_size: int | None = None) -> StagedBackbone:
    """The backbone ``name``: a registered one, or a timm/torchvision model cut into stages at ``input_size``."""
    if is_library_backbone(name):
        if input_size is None:
            raise ValueError(f"backbone {name!r}: a library backbone is cut into stages at an input size; give one")
        return library_backbone(name, input_size, drop_path)
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(sorted(BACKBONES))}, or 'timm:NAME' or "
                         f"'torchvision:NAME' for any CNN of those libraries")
    return BACKBONES[name].build(drop_path)


# Top-level children of a library classifier that belong to its head, not its feature extractor.
_HEAD_CHILDREN = frozenset({"avgpool", "global_pool", "fc", "classifier", "head", "head_drop", "pre_logits",
                            "flatten", "fc_norm", "dropout"})


def _feature_sequence(net: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The modules that compute ``net``'s feature map, in order, with their names in ``net``: its children
    without the head, ``nn.Sequential`` containers opened (so that stages can be cut between their blocks)."""
    out = []
    for name, child in net.named_children():
        if not prefix and name in _HEAD_CHILDREN:
            continue
        if isinstance(child, nn.Sequential):
            out += _feature_sequence(child, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", child))
    return out


def library_backbone(name: str, input_size: int, drop_path: float = 0.0) -> StagedBackbone:
    """A timm or torchvision CNN as a staged backbone: its feature modules run in sequence (checked against
    timm's ``forward_features``), a new stage starting wherever the feature map shrinks (the first module
    belongs to the stem, whatever it does). Untrained; its library's ImageNet weights load with
    ``load_backbone_weights``."""
    library, _, model_name = name.partition(":")
    try:
        if library == "timm":
            import timm

            extra = {"drop_path_rate": drop_path} if drop_path else {}
            net = timm.create_model(model_name, pretrained=False, **extra)
        else:
            _no_drop_path(name, drop_path)
            net = torchvision.models.get_model(model_name, weights=None)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"backbone {name!r}: {library} has no model {model_name!r} ({err})") from None
    modules = _feature_sequence(net)
    groups: list[list[tuple[str, nn.Module]]] = [[]]
    widths: list[int] = [0]
    with eval_mode(net), torch.no_grad():
        x = torch.zeros(1, 3, input_size, input_size)
        height = x.shape[-1]
        for qualified, module in modules:
            x = module(x)
            if not isinstance(x, torch.Tensor) or x.ndim != 4:
                raise ValueError(f"backbone {name!r}: its module {qualified} does not give a feature map "
                                 f"(N, C, H, W); it does not run as a sequence of modules: register your own "
                                 f"backbone (dynexit.models.backbones.register_backbone)")
            if x.shape[-1] < height and groups[-1]:
                groups.append([])  # the map shrank: a new stage
                widths.append(0)
            groups[-1].append((qualified, module))
            widths[-1] = int(x.shape[1])  # a group's width: that of its last module's output
            height = x.shape[-1]
        if library == "timm":
            expected = net.forward_features(torch.zeros(1, 3, input_size, input_size))
            if not torch.equal(expected, x):
                raise ValueError(f"backbone {name!r}: running its modules in sequence does not give timm's "
                                 f"forward_features; register your own backbone instead")
    if len(groups) < 2:
        raise ValueError(f"backbone {name!r} at {input_size} px has no stage after its stem (its feature map "
                         f"never shrinks): exits need at least one stage")
    prefixes, parts = {}, []
    for g, group in enumerate(groups):
        part = "stem" if g == 0 else f"stages.{g - 1}"
        prefixes.update({f"{part}.{j}": qualified for j, (qualified, _) in enumerate(group)})
        parts.append(nn.Sequential(*(module for _, module in group)))
    return StagedBackbone(parts[0], parts[1:], prefixes, widths=widths)


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
