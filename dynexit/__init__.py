"""dynexit: a research toolkit for early-exit image classification around Dynamic Perceiver."""
from dynexit.models import (
    DynPerceiver,
    PerceiverConfig,
    StaticClassifier,
    build_model,
    create_model,
    list_models,
    load_backbone_weights,
    load_official,
    preset_config,
)

__version__ = "0.1.0"

__all__ = [
    "DynPerceiver", "PerceiverConfig", "StaticClassifier", "build_model", "create_model", "list_models",
    "load_backbone_weights", "load_official", "preset_config", "__version__",
]
