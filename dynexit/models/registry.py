"""Model families, each registered by the module that defines it: everything that ``create_model``,
``list_models``, specs (``model: {name: PRESET, ...}``), checkpoints and ``dynexit models`` know of a model.

A family is a configuration dataclass (every field a setting a preset or an override may give), a builder
(configuration -> multi-exit model whose ``config`` is that configuration) and named presets. A new method is
one module that defines these and calls :func:`register_family`; nothing else in dynexit changes::

    register_family(ModelFamily(name="mynet", config_class=MyNetConfig, build=MyNet,
                                presets={"mynet_small": {"width": 16}}, description="..."))
    create_model("mynet_small", num_classes=10)

The families dynexit ships register when :mod:`dynexit.models` is imported: ``perceiver`` (Dyn-Perceiver and
its static backbone), ``msdnet`` and ``branchy`` (exits on a backbone).
"""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

FACTORY = "factory"  # the family name of a model made by a ``module:function`` factory (not registered)


@dataclass(frozen=True)
class ModelFamily:
    """One kind of multi-exit model (see the module docstring).

    ``exit_names(config)``, if given, tells a configuration's exits without building the model (for checks
    of big models); else they are read from a built model.
    """

    name: str
    config_class: type
    build: Callable[[Any], Any]
    presets: Mapping[str, Mapping[str, Any]]
    description: str = ""
    exit_names: Callable[[Any], tuple[str, ...]] | None = None
    settings: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        if not dataclasses.is_dataclass(self.config_class):
            raise TypeError(f"model family {self.name!r}: config_class must be a dataclass, got {self.config_class!r}")
        object.__setattr__(self, "settings", tuple(f.name for f in dataclasses.fields(self.config_class)))

    def config(self, preset: str, **overrides: Any) -> Any:
        """The configuration of ``preset`` with ``overrides`` (ValueError naming any unknown setting)."""
        unknown = sorted(set(overrides) - set(self.settings))
        if unknown:
            raise ValueError(f"unknown override(s) {', '.join(unknown)} for {preset}; "
                             f"valid: {', '.join(self.settings)}")
        return self.config_class(**{**self.presets[preset], **overrides})

    def create(self, preset: str, **overrides: Any) -> Any:
        return self.build(self.config(preset, **overrides))


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Makes ``family``'s presets known everywhere. ValueError for a family name taken, or a preset name
    another family has; each preset must construct its configuration (errors name the preset)."""
    if not isinstance(family, ModelFamily):
        raise TypeError(f"register_family takes a ModelFamily, got {type(family).__name__}")
    if family.name in FAMILIES or family.name == FACTORY:
        raise ValueError(f"model family {family.name!r} is registered already; choose another name")
    taken = {p: f.name for f in FAMILIES.values() for p in f.presets}
    clash = sorted(p for p in family.presets if p in taken)
    if clash:
        raise ValueError(f"model family {family.name!r}: preset {clash[0]!r} belongs to family {taken[clash[0]]!r}")
    for preset, values in family.presets.items():
        if ":" in preset:
            raise ValueError(f"model family {family.name!r}: preset name {preset!r} has a ':' (that names a factory)")
        unknown = sorted(set(values) - set(family.settings))
        if unknown:
            raise ValueError(f"model preset {preset!r}: unknown field(s) {', '.join(unknown)}; "
                             f"{family.config_class.__name__} has {', '.join(family.settings)}")
        try:
            family.config_class(**values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"model preset {preset!r}: {err}") from None
    FAMILIES[family.name] = family
    return family


def list_models() -> list[str]:
    """The presets of every registered family, sorted."""
    return sorted(p for family in FAMILIES.values() for p in family.presets)


def family_of(preset: str) -> ModelFamily:
    """The family of ``preset``; ValueError naming it, with the closest presets, if no family has it."""
    for family in FAMILIES.values():
        if preset in family.presets:
            return family
    raise ValueError(f"unknown model {preset!r}{preset_hint(preset)}")


def preset_hint(preset: str) -> str:
    """`` (did you mean ...?); valid presets: ...`` for a name no family has."""
    close = difflib.get_close_matches(str(preset), list_models(), n=3)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return f"{hint}; valid presets: {', '.join(list_models())}"


def family_of_model(model: Any) -> ModelFamily | None:
    """The registered family whose configuration class ``model.config`` is (None: none)."""
    config = getattr(model, "config", None)
    for family in FAMILIES.values():
        if isinstance(config, family.config_class):
            return family
    return None
