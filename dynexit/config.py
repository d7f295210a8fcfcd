"""Typed configuration of a run: model, data, training, evaluation.

YAML goes in through OmegaConf structured configs, so an unknown key or a wrong type is an error that
names the key (and the file and line where OmegaConf knows them); a dataclass comes out.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dynexit.data import DataConfig, validate_data_config
from dynexit.models.presets import PerceiverConfig, preset_config
from dynexit.training.config import TrainConfig, validate_train_config


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


EVAL_GRIDS = ("official", "msdnet")


def validate_run_config(cfg: RunConfig) -> None:
    """Every check of a run's values that needs no data and no built model: the architecture (preset and
    overrides), data, train (with the loss weights against the model's exits) and eval sections. Raises
    ValueError/TypeError naming the first bad key."""
    from dynexit.models.perceiver import model_class
    from dynexit.training.loss import check_exit_weights

    exit_names = model_class(resolve_model(cfg.model)).exit_names
    validate_data_config(cfg.data)
    validate_train_config(cfg.train)
    if len(exit_names) > 1:  # one exit: plain cross-entropy, the weights are not used
        check_exit_weights(exit_names, cfg.train.loss_weights)
    validate_eval_config(cfg.eval)


def validate_eval_config(cfg: EvalConfig) -> None:
    from dynexit.policies import CRITERIA

    if cfg.grid not in EVAL_GRIDS:
        raise ValueError(f"eval.grid must be one of {', '.join(EVAL_GRIDS)}, got {cfg.grid!r}")
    if cfg.criterion not in CRITERIA:
        raise ValueError(f"eval.criterion must be one of {', '.join(CRITERIA)}, got {cfg.criterion!r}")
    for budget in cfg.budgets:
        if not math.isfinite(budget) or budget <= 0:
            raise ValueError(f"eval.budgets must be positive GMACs, got {budget!r}")
    if cfg.batch_size < 1:
        raise ValueError(f"eval.batch_size must be a positive integer, got {cfg.batch_size!r}")


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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as err:
        raise ValueError(f"{path}: cannot parse YAML: {err}") from None
    cfg = merge(RunConfig, raw, where=str(path))
    if overrides:
        cfg = merge(cfg, parse_set(overrides), where="--set")
    validate_run_config(cfg)  # errors now, before anything runs
    return cfg


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Writes a config as YAML, atomically."""
    from dynexit.utils import atomic_write_text

    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
