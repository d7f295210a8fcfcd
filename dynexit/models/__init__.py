"""Multi-exit models: Dyn-Perceiver (backbones, presets, the official checkpoint mapping), MSDNet and exits on
any backbone (branchy)."""
from __future__ import annotations

from typing import Any

from dynexit.models.backbones import BACKBONES, load_backbone_weights
from dynexit.models.branchy import BRANCHY_PRESETS, BranchyConfig, BranchyNet, branchy_config
from dynexit.models.interface import (
    MultiExitModule,
    SegmentedMultiExitModule,
    build_from_factory,
    check_multi_exit_model,
    is_factory_name,
)
from dynexit.models.msdnet import MSDNET_PRESETS, MSDNet, MSDNetConfig, msdnet_config
from dynexit.models.msdnet_weights import load_msdnet
from dynexit.models.official import convert_state_dict, load_official
from dynexit.models.perceiver import DynPerceiver, MultiExitModel, State, StaticClassifier, build_model
from dynexit.models.presets import PRESETS, PerceiverConfig, preset_config


def list_models() -> list[str]:
    """Names of every preset (Dyn-Perceiver, MSDNet and branchy), sorted."""
    return sorted([*PRESETS, *MSDNET_PRESETS, *BRANCHY_PRESETS])


def create_model(name: str, **overrides: Any) -> MultiExitModel:
    """Builds preset ``name`` (see ``list_models()``) with ``overrides`` of its configuration, or calls the
    factory ``name`` = ``"package.module:function"`` with ``overrides`` as keyword arguments, e.g.
    ``create_model("reg800m_perceiver_t128", num_classes=10, input_size=32, z2x=False)`` or
    ``create_model("msdnet_cifar_anytime", num_classes=10)`` or
    ``create_model("branchy_resnet_tiny", exit_stages=[2, 3])``."""
    if is_factory_name(name):
        return build_from_factory(name, **overrides)
    if name in MSDNET_PRESETS:
        return MSDNet(msdnet_config(name, **overrides))
    if name in BRANCHY_PRESETS:
        return BranchyNet(branchy_config(name, **overrides))
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; valid presets: {', '.join(list_models())}")
    return build_model(preset_config(name, **overrides))


__all__ = [
    "BACKBONES", "BRANCHY_PRESETS", "BranchyConfig", "BranchyNet", "DynPerceiver", "MSDNET_PRESETS", "MSDNet",
    "MSDNetConfig", "MultiExitModel", "MultiExitModule", "PRESETS", "PerceiverConfig", "SegmentedMultiExitModule",
    "State", "StaticClassifier", "branchy_config", "build_model", "check_multi_exit_model", "convert_state_dict",
    "create_model", "list_models", "load_backbone_weights", "load_msdnet", "load_official", "msdnet_config",
    "preset_config",
]
