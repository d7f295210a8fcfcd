"""dynexit model checkpoints: weights plus the architecture they belong to.

A dynexit checkpoint is a dict with ``model`` (state dict), ``model_config`` (the model's configuration
as a dict), ``model_kind`` (which architecture that configuration is for: the name of a registered model
family, :mod:`dynexit.models.registry` (``perceiver``, the default for files that name none, ``msdnet``,
``branchy``, ...), or ``factory`` for a model made by a ``module:function`` factory, whose ``model_config``
holds ``factory`` and its keyword arguments ``kwargs``) and, when it comes from training, ``ema`` and the
training state.
``load_model`` rebuilds the model from the file. A factory named in the file is data: it is called only with
the caller's consent (``factory=`` or ``DYNEXIT_TRUSTED_MODULES``, see :mod:`dynexit.models.interface`), and its
module must be importable where the file is loaded.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from dynexit.models import FAMILIES, MultiExitModel
from dynexit.models.interface import build_from_factory, check_factory_name, consented_factory
from dynexit.models.registry import FACTORY, family_of_model
from dynexit.utils import UnsafeFileError, atomic_write, load_torch_file

FACTORY_KIND = FACTORY


def model_kind(model: MultiExitModel) -> str:
    """The ``model_kind`` that rebuilds ``model``: its registered family (whose configuration class its
    ``config`` is), or ``factory`` for a model made by a ``module:function`` factory. TypeError for a model
    dynexit cannot rebuild."""
    if getattr(model, "dynexit_factory", None) is not None:
        return FACTORY_KIND
    family = family_of_model(model)
    if family is not None:
        return family.name
    raise TypeError(f"cannot save a {type(model).__name__} as a dynexit checkpoint: it was made neither from a "
                    f"preset nor by a 'module:function' factory through dynexit.create_model, so nothing "
                    f"says how to rebuild it")


def model_config(model: MultiExitModel) -> dict[str, Any]:
    """What rebuilds ``model``'s architecture: its configuration, or its factory and keyword arguments."""
    factory = getattr(model, "dynexit_factory", None)
    if factory is not None:
        return {"factory": factory["factory"], "kwargs": dict(factory["kwargs"])}
    return dataclasses.asdict(model.config)


def save_model(path: str | Path, model: MultiExitModel, **extra: Any) -> None:
    """Writes the weights and the architecture of ``model`` atomically."""
    payload = {"model": model.state_dict(), "model_config": model_config(model),
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


def load_model(path: str | Path, ema: bool = False, factory: str | None = None) -> MultiExitModel:
    """The model stored in a dynexit checkpoint (its EMA weights with ``ema=True``), in eval mode.

    A checkpoint of a factory's model is rebuilt only with the caller's consent: ``factory`` names the
    ``module:function`` to call (with the keyword arguments the file records), or the factory the file names
    has its module in ``DYNEXIT_TRUSTED_MODULES``; otherwise UntrustedFactoryError, naming the file and the
    factory. ``factory`` is refused for a checkpoint of a preset (it names no code to run)."""
    checkpoint = read(path)
    kind = checkpoint.get("model_kind", "perceiver")
    if factory is not None:
        check_factory_name(factory)
        if kind != FACTORY_KIND:
            raise ValueError(f"{path} holds a {kind} model, built from its configuration: it needs no factory, "
                             f"but factory={factory!r} was given")
    if kind == FACTORY_KIND:
        spec = checkpoint["model_config"]
        if not isinstance(spec, dict) or not isinstance(spec.get("factory"), str) or not isinstance(
                spec.get("kwargs"), dict):
            raise ValueError(f"{path}: model_kind 'factory' needs model_config with 'factory' (module:function) "
                             f"and 'kwargs' (a dict)")
        name = consented_factory(spec["factory"], str(path), factory)
        model = build_from_factory(name, **spec["kwargs"])
    elif kind not in FAMILIES:
        raise ValueError(f"{path}: unknown model_kind {kind!r}; valid: {', '.join([*FAMILIES, FACTORY_KIND])} (a "
                         f"family registers when its module is imported)")
    else:
        family = FAMILIES[kind]
        model = family.build(family.config_class(**checkpoint["model_config"]))
    key = "ema" if ema else "model"
    if key not in checkpoint:
        raise ValueError(f"{path} holds no {key!r} weights")
    model.load_state_dict(checkpoint[key])
    return model.eval()
