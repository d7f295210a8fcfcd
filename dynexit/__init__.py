"""dynexit: a research toolkit for early-exit image classification around Dynamic Perceiver."""
from dynexit.models import (
    DynPerceiver,
    MSDNet,
    MSDNetConfig,
    PerceiverConfig,
    StaticClassifier,
    build_model,
    create_model,
    list_models,
    load_msdnet,
    load_official,
    preset_config,
)

__version__ = "0.1.0"

__all__ = [
    "DynPerceiver", "MSDNet", "MSDNetConfig", "PerceiverConfig", "StaticClassifier", "build_model", "create_model",
    "list_models", "load_msdnet", "load_official", "preset_config", "__version__",
]
