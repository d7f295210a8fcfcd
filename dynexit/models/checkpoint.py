"""dynexit model checkpoints: weights plus the architecture they belong to.

A dynexit checkpoint is a dict with ``model`` (state dict), ``model_config`` (the model's configuration
as a dict), ``model_kind`` (which architecture that configuration is for: ``perceiver``, the default for
files that name none, ``msdnet`` or ``branchy``) and, when it comes from training, ``ema`` and the training state.
``load_model`` rebuilds the model from the file alone.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from dynexit.models import BranchyConfig, BranchyNet, MSDNet, MSDNetConfig, MultiExitModel, PerceiverConfig, build_model
from dynexit.utils import UnsafeFileError, atomic_write, load_torch_file

# model_kind -> (configuration class, builder)
ARCHITECTURES = {"perceiver": (PerceiverConfig, build_model), "msdnet": (MSDNetConfig, MSDNet),
                 "branchy": (BranchyConfig, BranchyNet)}


def model_kind(model: MultiExitModel) -> str:
    """The ``model_kind`` that rebuilds ``model`` (Dyn-Perceiver and its static backbone: ``perceiver``)."""
    for kind, (_, build) in ARCHITECTURES.items():
        if isinstance(build, type) and isinstance(model, build):
            return kind
    return "perceiver"


def save_model(path: str | Path, model: MultiExitModel, **extra: Any) -> None:
    """Writes the weights and the architecture of ``model`` atomically."""
    payload = {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
               "model_kind": model_kind(model), **extra}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


class OutdatedCheckpointError(ValueError):
    """A checkpoint of an older dynexit version, which pickled numpy's random state: it cannot be loaded
    without allowing numpy objects to be unpickled, so it is refused (the run starts over)."""


def _is_numpy_array_global(name: str) -> bool:
    """What a pickled numpy array needs (numpy 1 and 2 spell the module differently)."""
    return name in ("numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct",
                    "numpy.core.multiarray._reconstruct") or name.startswith("numpy.dtypes.")


def read(path: str | Path) -> dict[str, Any]:
    """A dynexit checkpoint, loaded safely (tensors and plain containers only, no allow-list)."""
    path = Path(path)
    try:
        checkpoint = load_torch_file(path, "dynexit checkpoint")
    except UnsafeFileError as err:
        if err.globals and all(_is_numpy_array_global(name) for name in err.globals):
            raise OutdatedCheckpointError(
                f"{path} was written by an older dynexit version: it pickles numpy's random state "
                f"({', '.join(err.globals)}), which cannot be loaded safely. Start its run over: delete {path} "
                f"(training restarts from epoch 0) or the whole run folder {path.parent}") from None
        raise
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint or "model" not in checkpoint:
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
