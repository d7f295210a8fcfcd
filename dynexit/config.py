"""Typed configuration of a run: model, data, training, evaluation.

YAML goes in through OmegaConf structured configs, so an unknown key or a wrong type is an error that
names the key (and the file and line where OmegaConf knows them); a dataclass comes out.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dynexit.data import DataConfig
from dynexit.models.presets import PerceiverConfig, preset_config
from dynexit.training.config import TrainConfig


def _model_config_fields():
    hints = typing.get_type_hints(PerceiverConfig)
    fields = [("name", str, field(default="tiny_perceiver_t16"))]
    for f in dataclasses.fields(PerceiverConfig):
        fields.append((f.name, Optional[hints[f.name]], field(default=None)))
    return fields


# A preset name plus any architecture field to override; None keeps the preset's value.
ModelConfig = dataclasses.make_dataclass("ModelConfig", _model_config_fields())
ModelConfig.__doc__ = "A preset ``name`` and overrides of any PerceiverConfig field (None: the preset's value)."


def model_overrides(cfg: Any) -> dict[str, Any]:
    """The fields of a ModelConfig that override the preset."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name != "name" and getattr(cfg, f.name) is not None}


def resolve_model(cfg: Any) -> PerceiverConfig:
    """The full architecture of a ModelConfig (its preset with its overrides)."""
    return preset_config(cfg.name, **model_overrides(cfg))


@dataclass
class EvalConfig:
    grid: str = "official"  # budgeted-protocol grid: "official" or "msdnet"
    criterion: str = "max_softmax"  # max_softmax | entropy | margin
    budgets: list[float] = field(default_factory=list)  # GMACs at which runs.csv reports test accuracy
    batch_size: int = 256
    use_ema: bool = False  # evaluate the EMA weights instead of the trained ones


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0


def to_container(cfg: Any) -> dict[str, Any]:
    """A plain dict of a dataclass config (for YAML, hashing, CSV columns)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def merge(schema: Any, *sources: Any, where: str = "config") -> Any:
    """Merges dicts/DictConfigs onto the structured ``schema`` and returns the dataclass object.

    Errors name the key path and ``where`` (a file name, or "--set").
    """
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, *sources)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(f"{where}: {_describe(err)}") from None
    return obj


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    return f"key {key!r}: {msg}" if key else msg


def parse_set(items: list[str] | None) -> Any:
    """``--set key=value`` items (dotted keys, YAML values) as an OmegaConf dict."""
    items = items or []
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
    return OmegaConf.from_dotlist(items)


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Reads a run configuration YAML file (plus ``--set`` overrides) into a validated RunConfig."""
    from dynexit.yaml_files import read_yaml

    path = Path(path)
    raw = read_yaml(path, "config file")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a run configuration is a mapping of sections "
                         f"({', '.join(f.name for f in dataclasses.fields(RunConfig))}), got {type(raw).__name__}")
    cfg = merge(RunConfig, raw, where=str(path))
    if overrides:
        cfg = merge(cfg, parse_set(overrides), where="--set")
    resolve_model(cfg.model)  # architecture errors now, before anything runs
    return cfg


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Writes a config as YAML, atomically."""
    from dynexit.utils import atomic_write_text

    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
