"""dynexit model checkpoints: weights plus the architecture they belong to.

A dynexit checkpoint is a dict with ``model`` (state dict), ``model_config`` (the model's configuration
as a dict), ``model_kind`` (which architecture that configuration is for: ``perceiver``, the default for
files that name none, or ``msdnet``) and, when it comes from training, ``ema`` and the training state.
``load_model`` rebuilds the model from the file alone.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from dynexit.models import MSDNet, MSDNetConfig, MultiExitModel, PerceiverConfig, build_model
from dynexit.models.official import open_checkpoint
from dynexit.utils import atomic_write

# model_kind -> (configuration class, builder)
ARCHITECTURES = {"perceiver": (PerceiverConfig, build_model), "msdnet": (MSDNetConfig, MSDNet)}


def save_model(path: str | Path, model: MultiExitModel, **extra: Any) -> None:
    """Writes the weights and the architecture of ``model`` atomically."""
    kind = "msdnet" if isinstance(model, MSDNet) else "perceiver"
    payload = {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config), "model_kind": kind,
               **extra}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read(path: str | Path) -> dict[str, Any]:
    checkpoint = open_checkpoint(path)
    if "model_config" not in checkpoint or "model" not in checkpoint:
        raise ValueError(f"{path} is not a dynexit checkpoint (no 'model' and 'model_config'); "
                         "for an official checkpoint use load_official or 'dynexit convert-official', "
                         "for a reference MSDNet one load_msdnet or 'dynexit convert-msdnet'")
    return checkpoint


def load_model(path: str | Path, ema: bool = False) -> MultiExitModel:
    """The model stored in a dynexit checkpoint (its EMA weights with ``ema=True``), in eval mode."""
    checkpoint = read(path)
    kind = checkpoint.get("model_kind", "perceiver")
    if kind not in ARCHITECTURES:
        raise ValueError(f"{path}: unknown model_kind {kind!r}; valid: {', '.join(ARCHITECTURES)}")
    config_class, build = ARCHITECTURES[kind]
    model = build(config_class(**checkpoint["model_config"]))
    key = "ema" if ema else "model"
    if key not in checkpoint:
        raise ValueError(f"{path} holds no {key!r} weights")
    model.load_state_dict(checkpoint[key])
    return model.eval()
