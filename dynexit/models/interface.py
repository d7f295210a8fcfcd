"""The multi-exit model interface: what dynexit needs of a model, whoever wrote it.

A multi-exit model is an ``nn.Module`` with

- ``exit_names``: a tuple of str, one name per exit, in exit order (they name the columns of runs.csv,
  the keys of ``train.loss_weights``, the rows of costs.csv);
- ``forward(x) -> list`` of per-exit logits ``(B, num_classes)``, in exit order.

That is enough to train it, collect its logits and compute budgeted curves, threshold searches and reports;
the costs of its exits then come from the user (``model: {costs: [...]}`` in a spec, or a costs CSV).

For per-exit costs counted by fvcore and for real early exit (``dynexit.early_exit``, latencies,
``dynexit bench``) it also has segments:

- ``init_state(x) -> state``: the state before segment 0;
- ``run_segment(k, state) -> state``: runs segment k (the work between exit k-1 and exit k) and returns the
  new state, with exit k's logits appended to ``state.logits`` (a tuple);
- the state is a ``NamedTuple``, a dataclass or a dict whose values are tensors (batch first), tuples of
  tensors or constants, with the exits' logits as ``logits``; a ``select(index)`` method that keeps only the
  samples at ``index`` is optional (without it, every batch-first tensor is indexed). See
  :mod:`dynexit.models.state`. Whatever ``init_state`` computes counts in the first exit's cost.

``forward`` must give what running the segments 0..K-1 gives. :class:`MultiExitModel` is a base class that
provides ``forward`` from the segments, but any class with these members works: nothing checks the type.

Name a model factory as ``"package.module:function"`` wherever a preset name is accepted
(:func:`dynexit.create_model`, ``dynexit costs``, ``dynexit bench``, a spec's ``model: {factory: ...}``): the
module is imported and the function called with the keyword arguments given. What you name yourself (an
argument, a command-line option, the spec you pass) is your own code, like a Python script. A factory named
inside a file dynexit reads (a checkpoint, a run or results folder) is data: it is imported only when you
consent to it, by naming it yourself (``load_model(path, factory=...)``, ``--factory``) or by listing its module
in the environment variable ``DYNEXIT_TRUSTED_MODULES`` (comma-separated module names; a package trusts its
submodules). Otherwise the load is refused with :class:`UntrustedFactoryError`, naming the file and the factory.
"""
from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

FACTORY_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
SEGMENT_MEMBERS = ("init_state", "run_segment")
# Exit names that would collide with the summary columns of runs.csv (acc_<exit> beside acc_final, acc_at_<B>).
RESERVED_EXIT_NAMES = frozenset({"final"})
RESERVED_EXIT_PREFIXES = ("at_",)


@runtime_checkable
class MultiExitModule(Protocol):
    """A model with exits (see the module docstring); ``forward`` gives the logits of every exit."""

    exit_names: tuple[str, ...]

    def __call__(self, x: torch.Tensor) -> Sequence[torch.Tensor]: ...


@runtime_checkable
class SegmentedMultiExitModule(MultiExitModule, Protocol):
    """A multi-exit model that runs exit by exit: per-exit costs and real early exit."""

    def init_state(self, x: torch.Tensor) -> Any: ...

    def run_segment(self, k: int, state: Any) -> Any: ...


def has_segments(model: Any) -> bool:
    """Whether ``model`` has ``init_state`` and ``run_segment`` (costs and real early exit work)."""
    return all(callable(getattr(model, name, None)) for name in SEGMENT_MEMBERS)


def check_multi_exit_model(model: Any, need_segments: bool = False, purpose: str = "") -> tuple[str, ...]:
    """``model``'s exit names, after checking it meets the interface; TypeError naming every missing member.

    ``need_segments``: also ``init_state`` and ``run_segment`` (for costs and real early exit); ``purpose``
    says what needs them in the error (e.g. "early_exit")."""
    name = type(model).__name__
    needs = f"{purpose} needs" if purpose else "dynexit needs"
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{needs} a multi-exit model (an nn.Module with exit_names and forward(x) -> list of "
                        f"logits), got {name}; see dynexit.models.interface")
    names = getattr(model, "exit_names", None)
    if (not isinstance(names, (tuple, list)) or not names or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names)):
        raise TypeError(f"{name} has no valid exit_names: a multi-exit model needs exit_names, a tuple of "
                        f"distinct non-empty str in exit order (got {names!r}); see dynexit.models.interface")
    reserved = [n for n in names if n in RESERVED_EXIT_NAMES or n.startswith(RESERVED_EXIT_PREFIXES)]
    if reserved:
        raise TypeError(f"{name}: exit name {reserved[0]!r} is reserved (runs.csv has the columns acc_final, "
                        f"gmacs_final and acc_at_<budget> beside acc_<exit>); rename the exit")
    if need_segments:
        missing = [m for m in SEGMENT_MEMBERS if not callable(getattr(model, m, None))]
        if missing:
            raise TypeError(f"{needs} a model that runs exit by exit, but {name} has no {' and no '.join(missing)} "
                            f"(init_state(x) -> state; run_segment(k, state) -> state with exit k's logits "
                            f"appended to state.logits; a NamedTuple, dataclass or dict); see "
                            f"dynexit.models.interface. "
                            f"Without them, give its per-exit costs yourself (model.costs in a spec, or a costs CSV)")
    return tuple(names)


def is_factory_name(name: str) -> bool:
    """Whether ``name`` names a factory (``module:function``) rather than a preset."""
    return isinstance(name, str) and ":" in name


TRUST_ENV = "DYNEXIT_TRUSTED_MODULES"


class UntrustedFactoryError(ValueError):
    """A file names a model factory (code to run) that the caller has not consented to."""


def trusted_modules() -> tuple[str, ...]:
    """The module names listed in ``DYNEXIT_TRUSTED_MODULES`` (comma-separated; blanks ignored)."""
    return tuple(m.strip() for m in os.environ.get(TRUST_ENV, "").split(",") if m.strip())


def is_trusted(name: str) -> bool:
    """Whether the factory ``name``'s module, or a package above it, is listed in ``DYNEXIT_TRUSTED_MODULES``."""
    module = name.partition(":")[0]
    return any(module == m or module.startswith(m + ".") for m in trusted_modules())


def consented_factory(asked: str, source: str, given: str | None = None) -> str:
    """The factory to call for a model that the file ``source`` asks to be built by ``asked``: ``given`` when
    the caller named one (their consent), else ``asked`` when its module is trusted; else
    UntrustedFactoryError naming the file, the factory and how to consent."""
    if given is not None:
        return given
    if is_trusted(asked):
        return asked
    module = asked.partition(":")[0] if isinstance(asked, str) else "?"
    raise UntrustedFactoryError(
        f"{source} asks to build its model by calling {asked!r}: code that dynexit does not run because a file "
        f"names it. If you trust it, name it yourself (load_model(path, factory={asked!r}), or --factory "
        f"{asked} on the command line) or list its module: {TRUST_ENV}={module}")


def check_factory_name(name: str) -> None:
    """ValueError unless ``name`` has the form ``package.module:function`` (nothing is imported)."""
    if not isinstance(name, str) or not FACTORY_PATTERN.match(name):
        raise ValueError(f"model factory {name!r} is not of the form 'package.module:function' "
                         f"(dotted Python names, one colon)")


def load_factory(name: str, what: str = "model factory") -> Callable[..., Any]:
    """The function ``"package.module:function"`` names: the module imported with importlib, the function
    taken from it (never evaluated). ValueError, naming ``what``, for any other string, a module that cannot
    be imported or a function it lacks. Only for names the user gave (see the module docstring)."""
    check_factory_name(name)
    module_name, _, function_name = name.partition(":")
    if module_name.split(".")[0] == "dynexit":  # the package's own models are named by their presets
        raise ValueError(f"{what} {name!r}: a factory names a module of your own, not one of dynexit's "
                         f"(name dynexit's models by their presets, see 'dynexit models')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what} {name!r}: cannot import module {module_name!r} ({err}); is it on "
                         f"PYTHONPATH?") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"{what} {name!r}: module {module_name!r} has no function {function_name!r}")
    return function


def build_from_factory(name: str, **kwargs: Any) -> torch.nn.Module:
    """Calls the factory ``name`` with ``kwargs`` and checks that it gives a multi-exit model; the model
    remembers its factory and arguments (``dynexit_factory``) so that dynexit checkpoints can rebuild it."""
    model = load_factory(name)(**kwargs)
    check_multi_exit_model(model, purpose=f"model factory {name!r}")
    model.dynexit_factory = {"factory": name, "kwargs": dict(kwargs)}
    return model


def model_setting(model: Any, name: str) -> Any:
    """A setting such as ``input_size`` or ``num_classes`` of ``model``: from its configuration
    (``model.config.<name>``), else its own attribute, else its factory's keyword argument; None if unknown."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, name, None) is not None:
        return getattr(config, name)
    if getattr(model, name, None) is not None and not callable(getattr(model, name)):
        return getattr(model, name)
    factory = getattr(model, "dynexit_factory", None) or {}
    return factory.get("kwargs", {}).get(name)
