"""dynexit: a research toolkit for early-exit image classification around Dynamic Perceiver.

The public API below is re-exported from its home modules on first use (``dynexit.create_model`` loads
:mod:`dynexit.models`, and torch, then): importing the package alone loads nothing heavy, so the command
line (``python -m dynexit``, ``dynexit --help``) starts at once.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> home module
_PUBLIC = {
    "DynPerceiver": "dynexit.models",
    "MSDNet": "dynexit.models",
    "MSDNetConfig": "dynexit.models",
    "load_msdnet": "dynexit.models",
    "PerceiverConfig": "dynexit.models",
    "StaticClassifier": "dynexit.models",
    "build_model": "dynexit.models",
    "create_model": "dynexit.models",
    "list_models": "dynexit.models",
    "load_backbone_weights": "dynexit.models",
    "load_official": "dynexit.models",
    "preset_config": "dynexit.models",
}

__all__ = [
    "DynPerceiver", "MSDNet", "MSDNetConfig", "PerceiverConfig", "StaticClassifier", "build_model", "create_model",
    "list_models", "load_backbone_weights", "load_msdnet", "load_official", "preset_config", "__version__",
]

if TYPE_CHECKING:
    from dynexit.models import (
        DynPerceiver,
        MSDNet,
        MSDNetConfig,
        PerceiverConfig,
        StaticClassifier,
        build_model,
        create_model,
        list_models,
        load_backbone_weights,
        load_msdnet,
        load_official,
        preset_config,
    )


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'dynexit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
