"""Reference MSDNet checkpoints -> dynexit's MSDNet.

The reference training script saves a dict with ``epoch``, ``arch``, ``state_dict``, ``best_prec1`` and
``optimizer``; the state dict's keys carry the ``module.`` prefix of DataParallel. dynexit's MSDNet
names its modules like the reference, so loading is the prefix removed and a strict comparison: every
missing, unexpected or wrongly shaped key is reported by name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynexit.utils import load_torch_file

PREFIX = "module."


def read_msdnet_state_dict(checkpoint: str | Path | dict[str, Any], source: str = "") -> dict[str, torch.Tensor]:
    """The state dict of a reference checkpoint (a path, the loaded dict, or a bare state dict), with
    the ``module.`` prefix removed.

    The file is read with ``torch.load(weights_only=True)``: the format is plain containers, numbers,
    strings and tensors, so nothing beyond torch's default allow-list is needed.
    """
    if isinstance(checkpoint, (str, Path)):
        source = source or str(checkpoint)
        checkpoint = load_torch_file(checkpoint, "MSDNet checkpoint")
    where = f" in {source}" if source else ""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"an MSDNet checkpoint must be a dict{where}, got {type(checkpoint).__name__}")
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict):
        raise ValueError(f"'state_dict'{where} must be a dict, got {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"not an MSDNet state dict{where}: entries {bad[:5]} are not tensors")
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in state.items()}


def check_state_dict(state: dict[str, torch.Tensor], model: nn.Module, source: str = "") -> None:
    """Raises ValueError naming every key of ``state`` that is missing from, unexpected in or shaped
    differently from ``model``'s state dict."""
    own = model.state_dict()
    problems = [f"missing key {k} {tuple(v.shape)}" for k, v in own.items() if k not in state]
    problems += [f"unexpected key {k} {tuple(v.shape)}" for k, v in state.items() if k not in own]
    problems += [f"wrong shape for {k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and v.shape != own[k].shape]
    if problems:
        where = f" {source}" if source else ""
        raise ValueError(f"MSDNet checkpoint{where} does not fit the model ({len(problems)} problem(s); "
                         "is the configuration the one it was trained with?):\n  " + "\n  ".join(problems))


def load_msdnet(model: nn.Module, checkpoint: str | Path | dict[str, Any]) -> nn.Module:
    """Loads a reference MSDNet checkpoint into ``model`` (a dynexit MSDNet of the same configuration),
    strictly; returns the model. The model is left untouched when the checkpoint does not fit."""
    source = str(checkpoint) if isinstance(checkpoint, (str, Path)) else ""
    state = read_msdnet_state_dict(checkpoint, source)
    check_state_dict(state, model, source)
    model.load_state_dict(state, strict=True)
    return model
