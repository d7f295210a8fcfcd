"""Multi-exit models: Dyn-Perceiver (backbones, presets, the official checkpoint mapping), MSDNet and exits on
any backbone (branchy)."""
from __future__ import annotations

from typing import Any

from dynexit.models.backbones import BACKBONES, BackboneSpec, load_backbone_weights, register_backbone
from dynexit.models.base import MultiExitModel, State
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
from dynexit.models.perceiver import DynPerceiver, StaticClassifier, build_model
from dynexit.models.presets import PRESETS, PerceiverConfig, preset_config
from dynexit.models.registry import FAMILIES, ModelFamily, family_of, list_models, register_family
from dynexit.models.state import flatten, logits_of, select


def create_model(name: str, **overrides: Any) -> MultiExitModel:
    """Builds preset ``name`` of any registered family (see ``list_models()``) with ``overrides`` of its
    configuration, or calls the factory ``name`` = ``"package.module:function"`` with ``overrides`` as keyword
    arguments, e.g. ``create_model("reg800m_perceiver_t128", num_classes=10, input_size=32, z2x=False)``,
    ``create_model("msdnet_cifar_anytime", num_classes=10)`` or
    ``create_model("branchy", backbone="timm:resnet10t", num_classes=10, input_size=32)``."""
    if is_factory_name(name):
        return build_from_factory(name, **overrides)
    return family_of(name).create(name, **overrides)


__all__ = [
    "BACKBONES", "BRANCHY_PRESETS", "BackboneSpec", "BranchyConfig", "BranchyNet", "DynPerceiver", "FAMILIES",
    "MSDNET_PRESETS", "MSDNet", "MSDNetConfig", "ModelFamily", "MultiExitModel", "MultiExitModule", "PRESETS",
    "PerceiverConfig", "SegmentedMultiExitModule", "State", "StaticClassifier", "branchy_config", "build_model",
    "check_multi_exit_model", "convert_state_dict", "create_model", "family_of", "flatten", "list_models",
    "load_backbone_weights", "load_msdnet", "load_official", "logits_of", "msdnet_config", "preset_config",
    "register_backbone", "register_family", "select",
]
