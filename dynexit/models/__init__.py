"""Dyn-Perceiver models, their backbones, presets and the official checkpoint mapping."""
from __future__ import annotations

from typing import Any

from dynexit.models.backbones import BACKBONES, load_backbone_weights
from dynexit.models.official import convert_state_dict, load_official
from dynexit.models.perceiver import DynPerceiver, MultiExitModel, State, StaticClassifier, build_model
from dynexit.models.presets import PRESETS, PerceiverConfig, list_models, preset_config


def create_model(name: str, **overrides: Any) -> MultiExitModel:
    """Builds preset ``name`` (see ``list_models()``) with ``overrides`` of its configuration, e.g.
    ``create_model("reg800m_perceiver_t128", num_classes=10, input_size=32, z2x=False)``."""
    return build_model(preset_config(name, **overrides))


__all__ = [
    "BACKBONES", "PRESETS", "DynPerceiver", "MultiExitModel", "PerceiverConfig", "State", "StaticClassifier",
    "build_model", "convert_state_dict", "create_model", "list_models", "load_backbone_weights", "load_official",
    "preset_config",
]
