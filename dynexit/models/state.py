"""What flows between the segments of a multi-exit model, whatever its type.

A state may be a NamedTuple, a dataclass or a dict. Its values are tensors (batch first), tuples or lists of
tensors, or anything else (a constant: a shape, a flag), and it holds the logits of the exits run so far as
``logits`` (an attribute, or a key of a dict), a tuple of tensors. Costs trace a segment as a function of the
state's tensors (:func:`flatten` and :func:`rebuild`), and real early exit keeps only the samples still
running (:func:`select`: the state's own ``select(index)`` when it has one, else every batch-first tensor
indexed).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

Rebuild = Callable[[tuple[torch.Tensor, ...]], Any]


def _fields(state: Any) -> list[tuple[str, Any]]:
    """(name, value) of every field of ``state``, in order; TypeError for a type that is not a state."""
    if isinstance(state, Mapping):
        return list(state.items())
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return [(f.name, getattr(state, f.name)) for f in dataclasses.fields(state)]
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return list(zip(state._fields, state))
    raise TypeError(f"a model's state must be a NamedTuple, a dataclass or a dict (of tensors, tuples of tensors "
                    f"and constants), got {type(state).__name__}; see dynexit.models.interface")


def _replace(state: Any, values: dict[str, Any]) -> Any:
    if isinstance(state, Mapping):
        return type(state)({**state, **values}) if type(state) is not dict else {**state, **values}
    if dataclasses.is_dataclass(state):
        return dataclasses.replace(state, **values)
    return state._replace(**values)


def flatten(state: Any) -> tuple[list[torch.Tensor], Rebuild]:
    """The tensors of ``state`` in field order, and a function that rebuilds a state of the same type and
    layout from new tensors (constants kept)."""
    tensors: list[torch.Tensor] = []
    layout: list[tuple[str, int | None, type | None]] = []  # (field, None: one tensor | count, sequence type)
    for name, value in _fields(state):
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            layout.append((name, None, None))
        elif isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
            tensors.extend(value)
            layout.append((name, len(value), type(value)))

    def rebuild(new: tuple[torch.Tensor, ...]) -> Any:
        values, i = {}, 0
        for name, count, kind in layout:
            if count is None:
                values[name], i = new[i], i + 1
            else:
                values[name], i = kind(new[i:i + count]), i + count
        return _replace(state, values)

    return tensors, rebuild


def logits_of(state: Any) -> tuple[torch.Tensor, ...]:
    """The logits of the exits run so far (``state.logits`` or ``state["logits"]``)."""
    logits = state.get("logits") if isinstance(state, Mapping) else getattr(state, "logits", None)
    if not isinstance(logits, (tuple, list)):
        raise TypeError(f"a model's state must hold the logits of the exits run so far as 'logits' (a tuple of "
                        f"tensors), got {type(logits).__name__} in a {type(state).__name__}")
    return tuple(logits)


def select(state: Any, index: torch.Tensor) -> Any:
    """The state of the samples at ``index`` only: its own ``select`` if it has one, else every tensor indexed
    along its first (batch) axis."""
    own = getattr(state, "select", None)
    if callable(own) and not isinstance(state, Mapping):
        return own(index)
    tensors, rebuild = flatten(state)
    return rebuild(tuple(t[index] for t in tensors))
