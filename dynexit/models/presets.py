"""Named presets (the official model names plus small CPU presets) and override validation."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any


@dataclass
class PerceiverConfig:
    """Everything that defines a Dyn-Perceiver architecture.

    The five ablation switches mean what the paper's ablations mean: ``x2z`` keeps the feature-to-latent
    cross-attention of stages 2-4 (the first one is always kept), ``z2x`` the latent-to-feature
    cross-attention of stages 2-4, ``dwc`` the depthwise convolution before each x2z, ``isc`` the
    connections that feed an exit's logits into the next latent exit, ``last_ca`` the final cross-attention
    that merges both branches. ``static`` builds the backbone alone with its single classifier.
    """

    backbone: str = "regnet_y_800mf"  # the CNN branch: a torchvision or timm backbone (`dynexit models` lists them)
    num_classes: int = 1000  # classes of every exit
    input_size: int = 224  # image size in pixels the model is built and costed for
    num_latents: int = 128  # latent tokens of the transformer branch
    # per stage: self-attention layers = sa_layers x depth_factor
    depth_factor: list[int] = field(default_factory=lambda: [1, 1, 1, 2])
    num_heads: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # attention heads per stage
    sa_layers: list[int] = field(default_factory=lambda: [3, 3, 9, 3])  # before depth_factor
    widening: int = 4  # hidden width of the latent MLPs, a multiple of the token width
    dropout: float = 0.0  # dropout in the latent branch
    token_grid: int = 7  # x2z pools each feature map to token_grid x token_grid tokens
    x2z: bool = True  # feature-to-latent cross-attention of stages 2-4 (ablation switch)
    z2x: bool = True  # latent-to-feature cross-attention of stages 2-4 (ablation switch)
    dwc: bool = True  # depthwise convolution before each x2z (ablation switch)
    isc: bool = True  # an exit's logits feed the next latent exit (ablation switch)
    last_ca: bool = True  # the final cross-attention that merges both branches (ablation switch)
    cnn_dropout: float | None = None  # None: the backbone's default
    drop_path: float | None = None  # None: the backbone's default
    static: bool = False  # the backbone alone with its single classifier (one exit)

    def __post_init__(self):
        validate(self)


# Fields a user may override, with their types (for clear errors).
OVERRIDES = tuple(f.name for f in dataclasses.fields(PerceiverConfig))


def _preset(backbone: str, tokens: int, depth: list[int], **more: Any) -> dict[str, Any]:
    return {"backbone": backbone, "num_latents": tokens, "depth_factor": depth, **more}


PRESETS: dict[str, dict[str, Any]] = {}
for _tokens in (32, 64, 128, 256, 512):
    PRESETS[f"reg400m_perceiver_t{_tokens}"] = _preset("regnet_y_400mf", _tokens, [1, 1, 1, 2])
    PRESETS[f"reg800m_perceiver_t{_tokens}"] = _preset("regnet_y_800mf", _tokens, [1, 1, 1, 2])
for _tokens in (128, 256, 512):
    PRESETS[f"reg1x6g_perceiver_t{_tokens}"] = _preset("regnet_y_1_6gf", _tokens, [1, 1, 1, 2])
    PRESETS[f"reg3x2g_perceiver_t{_tokens}"] = _preset("regnet_y_3_2gf", _tokens, [1, 1, 1, 2])
PRESETS["resnet50_0375_perceiver_t128"] = _preset("resnet50_0375", 128, [1, 1, 1, 1])
PRESETS["mobilenetV3_0x75_perceiver_t128"] = _preset("mobilenet_v3_large_0x75", 128, [1, 1, 1, 3])
# Small presets for 28-32 px images that train in minutes on a CPU: few latent tokens, shallow
# latent stages (1-1-2-1 self-attention layers), a 4x4 x2z token grid, 10 classes.
_SMALL = {"num_classes": 10, "input_size": 32, "sa_layers": [1, 1, 2, 1], "depth_factor": [1, 1, 1, 1],
          "token_grid": 4, "num_heads": [1, 2, 2, 4], "widening": 2}
PRESETS["tiny_perceiver_t16"] = {"backbone": "resnet_tiny", "num_latents": 16, **_SMALL}
PRESETS["small_perceiver_t32"] = {"backbone": "resnet_small", "num_latents": 32, **_SMALL}


def check_preset(name: str, values: dict[str, Any], config_class: type, construct: bool = True) -> None:
    """Checks a preset of ``config_class`` (a dataclass) when its module is imported: known fields only, and
    (``construct``) a valid configuration; a malformed preset is a ValueError naming it."""
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"model preset {name!r}: unknown field(s) {', '.join(unknown)}; "
                         f"{config_class.__name__} has {', '.join(sorted(known))}")
    if construct:
        try:
            config_class(**values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"model preset {name!r}: {err}") from None


def _check_perceiver_preset(name: str, values: dict[str, Any]) -> None:
    """A Dyn-Perceiver preset's fields, types and values, checked without torch (the command line imports
    this module to answer --help at once); its backbone's name is checked when the preset is built."""
    check_preset(name, values, PerceiverConfig, construct=False)
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(PerceiverConfig)}
    try:
        _check_fields(SimpleNamespace(**{**defaults, **values}))
    except (TypeError, ValueError) as err:
        raise ValueError(f"model preset {name!r}: {err}") from None


def preset_config(name: str, **overrides: Any) -> PerceiverConfig:
    """The configuration of preset ``name`` with ``overrides`` applied (validated)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"unknown override(s) {', '.join(unknown)} for {name}; valid: {', '.join(OVERRIDES)}")
    return PerceiverConfig(**{**PRESETS[name], **overrides})


def _check_type(name: str, value: Any, kind: type) -> None:
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise TypeError(f"model field {name!r} must be {kind.__name__}, got {value!r}")


def validate(cfg: PerceiverConfig) -> None:
    from dynexit.models.backbones import BACKBONES

    if cfg.backbone not in BACKBONES:
        raise ValueError(f"model field 'backbone': unknown {cfg.backbone!r}; valid: {', '.join(sorted(BACKBONES))}")
    _check_fields(cfg)


def _check_fields(cfg: Any) -> None:
    """Every check of :func:`validate` but the backbone's name (which needs torch to list the backbones)."""
    if not isinstance(cfg.backbone, str):
        raise TypeError(f"model field 'backbone' must be str, got {cfg.backbone!r}")
    for name in ("num_classes", "input_size", "num_latents", "widening", "token_grid"):
        _check_type(name, getattr(cfg, name), int)
        if getattr(cfg, name) < 1:
            raise ValueError(f"model field {name!r} must be positive, got {getattr(cfg, name)}")
    for name in ("x2z", "z2x", "dwc", "isc", "last_ca", "static"):
        _check_type(name, getattr(cfg, name), bool)
    for name in ("dropout", "cnn_dropout", "drop_path"):
        value = getattr(cfg, name)
        if value is not None:
            _check_type(name, value, float)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"model field {name!r} must be in [0, 1), got {value}")
    for name in ("depth_factor", "num_heads", "sa_layers"):
        value = getattr(cfg, name)
        if not isinstance(value, (list, tuple)) or len(value) != 4:
            raise ValueError(f"model field {name!r} must be a list of 4 ints, got {value!r}")
        for v in value:
            _check_type(name, v, int)
            if v < 0 or (name == "num_heads" and v < 1):
                raise ValueError(f"model field {name!r} has an invalid entry {v}")
    if cfg.num_latents % 8:
        raise ValueError(f"model field 'num_latents' must be a multiple of 8 (tokens halve per stage), "
                         f"got {cfg.num_latents}")


for _name, _values in PRESETS.items():  # typed presets: a malformed one fails at import, named
    _check_perceiver_preset(_name, _values)
