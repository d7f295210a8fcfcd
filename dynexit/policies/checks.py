"""Checks and conversions of the arrays the policies take: logits, targets, costs, temperatures, exit names."""
from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np


def is_tensor(value) -> bool:
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    return torch is not None and isinstance(value, torch.Tensor)


def as_logits(logits, name: str = "logits") -> np.ndarray:
    """``logits`` as a C-contiguous float32 array (exits, samples, classes)."""
    if is_tensor(logits):
        logits = logits.detach().cpu().numpy()
    arr = np.asarray(logits)
    if arr.ndim != 3:
        raise ValueError(f"{name} must have shape (exits, samples, classes), got shape {arr.shape}")
    if 0 in arr.shape:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must be floating point, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def as_targets(targets, num_samples: int, num_classes: int, name: str = "targets") -> np.ndarray:
    if is_tensor(targets):
        targets = targets.detach().cpu().numpy()
    arr = np.asarray(targets)
    if arr.ndim != 1 or len(arr) != num_samples:
        raise ValueError(f"{name} must have shape ({num_samples},) to match the logits, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be integer class indices, got dtype {arr.dtype}")
    if len(arr) and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(f"{name} holds class indices outside [0, {num_classes}): "
                         f"min {arr.min()}, max {arr.max()}")
    return arr.astype(np.int64, copy=False)


def check_costs(costs, exit_names: Sequence[str] | None = None, where: str = "costs") -> np.ndarray:
    """Per-exit cumulative costs as float64: finite, non-negative and strictly increasing from exit to exit
    (each exit runs everything before it), else a ValueError naming ``where``, the exits and their values."""
    arr = np.asarray(costs, dtype=np.float64).reshape(-1)
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"{where} must be finite and non-negative, got {arr.tolist()}")
    names = ([str(n) for n in exit_names] if exit_names is not None and len(exit_names) == len(arr)
             else [str(k) for k in range(len(arr))])
    for k in range(1, len(arr)):
        if arr[k] <= arr[k - 1]:
            raise ValueError(f"{where}: cumulative costs must increase strictly from exit to exit, but exit "
                             f"{names[k]!r} costs {arr[k]:g}, not more than exit {names[k - 1]!r} before it "
                             f"({arr[k - 1]:g}); costs: {', '.join(f'{n}={c:g}' for n, c in zip(names, arr))}")
    return arr


def as_costs(costs, num_exits: int, exit_names: Sequence[str] | None = None) -> np.ndarray:
    arr = np.asarray(costs, dtype=np.float64).reshape(-1)
    if len(arr) != num_exits:
        raise ValueError(f"costs has {len(arr)} values but there are {num_exits} exits")
    return check_costs(arr, exit_names)


def as_temperatures(temperature, num_exits: int) -> np.ndarray | None:
    if temperature is None:
        return None
    arr = np.asarray(temperature, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, num_exits)
    if len(arr) != num_exits:
        raise ValueError(f"temperature has {len(arr)} values but there are {num_exits} exits")
    if not np.isfinite(arr).all() or (arr <= 0).any():
        raise ValueError(f"temperatures must be finite and positive, got {arr.tolist()}")
    return arr


def exit_labels(exit_names: Sequence[str] | None, num_exits: int) -> list[str]:
    if exit_names is None:
        return [str(k) for k in range(num_exits)]
    names = [str(n) for n in exit_names]
    if len(names) != num_exits or len(set(names)) != num_exits:
        raise ValueError(f"exit_names must be {num_exits} distinct names, got {names}")
    return names
