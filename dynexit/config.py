"""Typed configuration of a run: model, data, training, evaluation (one dataclass per section).

YAML goes in through OmegaConf structured configs, so an unknown key or a wrong type is an error that
names the key (and the file and line where OmegaConf knows them); a dataclass comes out.

``train``: defaults suit small runs (no mixup, no warm-up); ``experiments/train_imagenet_official.yaml``
holds the official ImageNet recipe. The batch size is per process: the batch of one optimizer step is
``batch_size * processes * accum_steps``.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dynexit.models.presets import PerceiverConfig


def _model_config_fields():
    hints = typing.get_type_hints(PerceiverConfig)
    fields = [("name", str, field(default="tiny_perceiver_t16"))]
    for f in dataclasses.fields(PerceiverConfig):
        fields.append((f.name, Optional[hints[f.name]], field(default=None)))
    fields += [("factory", Optional[str], field(default=None)),
               ("costs", Optional[list[float]], field(default=None)),
               ("options", Optional[dict[str, Any]], field(default=None)),
               ("op_handles", Optional[dict[str, str]], field(default=None))]
    return fields


# The model section. ``name``: a preset of any family (Dyn-Perceiver, MSDNet, branchy; see ``dynexit models``)
# with overrides of its configuration; or ``factory: "package.module:function"``, called with the section's
# other keys as keyword arguments (``name`` is then unused). Dyn-Perceiver's fields are typed here; any other
# key (another family's knob, a factory's argument) is gathered into ``options`` when a file or ``--set`` is
# merged and checked by the model's own configuration. ``costs``: per-exit GMACs given by the user, for a model
# without segments (see dynexit.models.interface); None: counted by fvcore. ``op_handles``: how fvcore counts an
# op it has no handle for, ``{"aten::op": zero}`` or ``{"aten::op": "package.module:function"}``.
ModelConfig = dataclasses.make_dataclass("ModelConfig", _model_config_fields())
ModelConfig.__doc__ = ("A preset ``name`` of any family or a ``factory`` (``module:function``), with overrides or "
                       "keyword arguments (None: the preset's value); ``costs``: user-given per-exit GMACs.")
MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig))
# Keys added to the model section after the first committed results; left out of a config's plain form (and so
# of run ids) while unused, so the runs of existing specs keep their ids.
NEW_MODEL_KEYS = ("factory", "costs", "options", "op_handles")
def model_family(cfg: Any) -> str:
    """Which family the model section ``cfg`` builds: a registered family's name (perceiver, msdnet, branchy,
    ...; see dynexit.models.registry) or factory."""
    from dynexit.models import FAMILIES
    from dynexit.models.registry import preset_hint

    if cfg.factory is not None:
        return "factory"
    for family in FAMILIES.values():
        if cfg.name in family.presets:
            return family.name
    raise ValueError(f"model.name: unknown preset {cfg.name!r}{preset_hint(cfg.name)}; or give model.factory: "
                     f"'package.module:function'")


def model_overrides(cfg: Any) -> dict[str, Any]:
    """The keys of a ModelConfig that override its preset (or are its factory's keyword arguments)."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if f.name not in ("name", *NEW_MODEL_KEYS) and getattr(cfg, f.name) is not None}
    return {**fields, **(cfg.options or {})}


def resolve_model(cfg: Any) -> PerceiverConfig:
    """The full architecture of a Dyn-Perceiver ModelConfig (its preset with its overrides)."""
    family = model_family(cfg)
    if family != "perceiver":
        raise ValueError(f"model: {cfg.factory or cfg.name!r} is not a Dyn-Perceiver preset ({family}); "
                         f"build it with build_configured_model")
    return _family_config(cfg)


def _family_config(cfg: Any) -> Any:
    """The configuration of a preset model section; errors name the key as ``model.<key>``."""
    from dynexit.models import FAMILIES

    family = FAMILIES[model_family(cfg)]
    overrides = model_overrides(cfg)
    unknown = sorted(set(overrides) - set(family.settings))
    if unknown:
        raise ValueError(f"model.{unknown[0]}: not a setting of {cfg.name} ({family.name}); its settings: "
                         f"{', '.join(family.settings)}")
    return family.config(cfg.name, **overrides)


def build_configured_model(cfg: Any):
    """The model a model section describes (a preset of any family, or a factory's model)."""
    from dynexit.models import FAMILIES
    from dynexit.models.interface import build_from_factory

    family = model_family(cfg)
    if family == "factory":
        try:
            return build_from_factory(cfg.factory, **model_overrides(cfg))
        except ValueError as err:
            raise ValueError(f"model.factory: {err}") from None
    return FAMILIES[family].build(_family_config(cfg))


def model_exit_names(cfg: Any) -> tuple[str, ...]:
    """The exit names of the model a model section describes (without building it where its family can tell)."""
    from dynexit.models import FAMILIES

    family = model_family(cfg)
    if family != "factory" and FAMILIES[family].exit_names is not None:
        return tuple(FAMILIES[family].exit_names(_family_config(cfg)))
    return tuple(build_configured_model(cfg).exit_names)


def _fold_model_options(source: Any) -> Any:
    """``source`` with the keys of its model section that are not ModelConfig fields moved into
    ``model.options`` (another family's knobs, a factory's keyword arguments), and likewise the keys of a
    data section that names a factory (its keyword arguments) into ``data.options``."""
    if OmegaConf.is_config(source):
        if not OmegaConf.is_dict(source):
            return source
        tree = OmegaConf.to_container(source, resolve=False)
    elif isinstance(source, Mapping):
        tree = dict(source)
    else:
        return source
    folded_tree = dict(tree)
    for section, fields in (("model", MODEL_FIELDS), ("data", DATA_FIELDS)):
        part = tree.get(section)
        if not isinstance(part, Mapping) or (section == "data" and part.get("factory") is None):
            continue  # a data section without a factory keeps its unknown keys: errors
        extra = {k: v for k, v in part.items() if k not in fields}
        if extra:
            folded = {k: v for k, v in part.items() if k in fields}
            folded["options"] = {**(folded.get("options") or {}), **extra}
            folded_tree[section] = folded
    return folded_tree if folded_tree != tree else source


DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder")
# (training, test) images of the built-in data sets, known without loading them (imagefolder: once read).
# digits has no test split of its own: 360 of its 1,797 images (dynexit.data.datasets).
DATASET_SIZES = {"digits": (1437, 360), "fashion_mnist": (60000, 10000), "cifar10": (50000, 10000),
                 "cifar100": (50000, 10000)}
RECIPES = ("small", "imagenet")


@dataclass
class DataConfig:
    """Which data set, how it is split, and how it is transformed."""

    name: str = "digits"  # digits | fashion_mnist | cifar10 | cifar100 | imagefolder
    root: Optional[str] = None  # folder of the files; None: the usual place (see build_datasets)
    download: bool = False  # download through torchvision when the files are missing (not imagefolder)
    fallback: Optional[str] = None  # data set to use instead when the files of `name` are missing
    image_size: int = 32  # side S of the (S, S) images the model gets
    calib_size: float = 0.1  # held out of training for thresholds: a fraction (< 1) or a count (>= 1)
    split_seed: int = 0  # draws the calibration split and the subsets
    train_subset: Optional[int] = None  # keep at most this many training images (quick runs)
    test_subset: Optional[int] = None  # keep at most this many test images (quick runs)
    recipe: str = "small"  # "small" (tensor crop + flip, 28-32 px) or "imagenet" (official timm recipe)
    hflip: Optional[bool] = None  # random horizontal flip; None: the data set's default (off for digits)
    crop_padding: Optional[int] = None  # small recipe: zero padding of the random crop; None: S // 8
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # imagenet recipe: timm auto-augment policy
    random_erasing: float = 0.25  # imagenet recipe: random-erasing probability (pixel mode)
    eval_crop_pct: float = 0.875  # imagenet recipe: eval resize to S / eval_crop_pct, centre crop S
    num_workers: int = 0  # DataLoader worker processes (each training process's; speed only, not part of a run's id)
    # Copy data.root to this folder (a node's local disk, e.g. $SLURM_TMPDIR; environment variables expanded
    # where the run runs) once per node, and read it from there (speed only, not part of a run's id).
    stage_to: Optional[str] = None
    # Your own data: "package.module:function", called with ``options`` (the section's other keys) as keyword
    # arguments; it returns (train, test), two torch Datasets of (C x H x W float image, int label), final as
    # the model takes them (no transform or normalisation is added). The calibration split is held out of
    # train as for the built-in data sets; ``name`` is then unused.
    factory: Optional[str] = None
    options: Optional[dict[str, Any]] = None  # the factory's keyword arguments (a spec's other data keys)


DATA_FIELDS = frozenset(f.name for f in dataclasses.fields(DataConfig))
# Keys added to the data section after the first committed results; left out of a config's plain form (and
# so of run ids) while unused.
NEW_DATA_KEYS = ("factory", "options", "stage_to")


def validate_data_config(cfg: DataConfig, import_factories: bool = True) -> None:
    """Raises ValueError naming the first bad field of ``cfg`` (as ``data.<name>``); a data factory is
    imported to check it (unless ``import_factories`` is False: a file's configuration is data)."""
    if cfg.factory is not None:
        from dynexit.models.interface import check_factory_name, load_factory

        try:
            load_factory(cfg.factory, what="data factory") if import_factories else check_factory_name(cfg.factory)
        except ValueError as err:
            raise ValueError(f"data.factory: {err}") from None
    elif cfg.options:
        raise ValueError(f"data.options {sorted(cfg.options)!r}: keyword arguments for a data.factory, but none "
                         f"is given")
    if cfg.name not in DATASETS:
        raise ValueError(f"data.name: unknown data set {cfg.name!r}; known: {', '.join(DATASETS)}")
    if cfg.fallback is not None and (cfg.fallback not in DATASETS or cfg.fallback == cfg.name):
        raise ValueError(f"data.fallback: {cfg.fallback!r} must be another known data set "
                         f"({', '.join(d for d in DATASETS if d != cfg.name)})")
    if cfg.recipe not in RECIPES:
        raise ValueError(f"data.recipe: unknown recipe {cfg.recipe!r}; known: {', '.join(RECIPES)}")
    if not isinstance(cfg.image_size, int) or cfg.image_size < 8:
        raise ValueError(f"data.image_size must be an integer >= 8, got {cfg.image_size!r}")
    if not cfg.calib_size > 0 or (cfg.calib_size >= 1 and cfg.calib_size != int(cfg.calib_size)):
        raise ValueError(f"data.calib_size must be a fraction in (0, 1) or a whole count >= 1, "
                         f"got {cfg.calib_size!r}")
    for key in ("train_subset", "test_subset"):
        value = getattr(cfg, key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"data.{key} must be a positive integer or null, got {value!r}")
    if cfg.crop_padding is not None and cfg.crop_padding < 0:
        raise ValueError(f"data.crop_padding must be >= 0, got {cfg.crop_padding}")
    if not 0.0 <= cfg.random_erasing <= 1.0:
        raise ValueError(f"data.random_erasing must be a probability, got {cfg.random_erasing}")
    if not 0.0 < cfg.eval_crop_pct <= 1.0:
        raise ValueError(f"data.eval_crop_pct must be in (0, 1], got {cfg.eval_crop_pct}")
    if cfg.num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {cfg.num_workers}")
    if cfg.stage_to is not None:
        if not cfg.stage_to.strip():
            raise ValueError("data.stage_to must name a folder (a node's local disk), or be null")
        if cfg.root is None:
            raise ValueError("data.stage_to needs data.root: the folder it copies")
    check_seed(cfg.split_seed, "data.split_seed")
    if cfg.name in DATASET_SIZES and cfg.factory is None:  # a built-in data set: its size is known
        calibration_count(cfg.calib_size, DATASET_SIZES[cfg.name][0], cfg.name)


def calibration_count(calib_size: float, n_train: int, dataset: str = "the data set") -> int:
    """How many training images ``data.calib_size`` holds out of ``n_train``; ValueError when none would
    be left for training."""
    n = max(1, round(calib_size * n_train)) if calib_size < 1 else int(calib_size)
    if n >= n_train:
        raise ValueError(f"data.calib_size={calib_size:g} asks for {n} calibration images, but the training set "
                         f"of {dataset} has {n_train}; at least one must stay for training")
    return n


SEED_RANGE = (0, 2**32 - 1)  # what numpy's and torch's generators all take


def check_seed(seed: Any, key: str) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ValueError(f"{key} must be an integer in [0, 2**32 - 1], got {seed!r}")


def check_finite(tree: Any, key: str = "") -> None:
    """ValueError naming the first key of a configuration tree whose number is not finite (inf, nan)."""
    if isinstance(tree, Mapping):
        for name, value in tree.items():
            check_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            check_finite(value, f"{key}[{i}]")
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise ValueError(f"{key} must be a finite number, got {tree!r}")


# Official README: the CNN and merged exits weigh 1, the two latent exits 0.5 each.
DEFAULT_LOSS_WEIGHTS = {"early3": 0.5, "att": 0.5, "cnn": 1.0, "merge": 1.0}
MIXUP_MODES = ("batch", "pair", "elem")
EVAL_CALIB = ("every", "end")  # train.eval_calib
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "multistep")


@dataclass
class TrainConfig:
    """How one model is trained (the ``train`` section of a RunConfig)."""

    epochs: int = 10  # passes over the training split
    batch_size: int = 64  # per process
    eval_batch_size: Optional[int] = None  # None: 2 * batch_size
    accum_steps: int = 1  # micro-batches per optimizer step (gradient accumulation)
    # Optimizer (adamw or sgd) and learning-rate schedule (cosine or multistep); no weight decay on biases
    # and 1-D parameters (norms, BN) unless decay_all.
    lr: float = 1e-3
    min_lr: float = 1e-6  # the cosine schedule ends here
    warmup_epochs: float = 0.0  # linear per-iteration warm-up, then the schedule
    weight_decay: float = 0.05  # decoupled (adamw) or L2 (sgd) weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    eps: float = 1e-8  # adamw
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd; needs momentum > 0
    decay_all: bool = False  # weight decay on every parameter (MSDNet's reference recipe)
    # cosine: per iteration from lr down to min_lr at the last step. multistep: lr times lr_decay from each
    # milestone on, a fraction of the epochs (see milestone_epochs: [0.5, 0.75] of 300 epochs is lr x0.1
    # from epoch 150 and x0.01 from epoch 225, counting epochs from 0).
    schedule: str = "cosine"  # cosine | multistep
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # multistep
    lr_decay: float = 0.1  # multistep
    clip_grad: Optional[float] = None  # max global gradient norm; None: no clipping
    # Loss: sum over exits of weight * CE, plus self-distillation from the detached last exit.
    loss_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LOSS_WEIGHTS))
    distill_alpha: float = 0.5  # 0 turns self-distillation off
    distill_temperature: float = 1.0  # softmax temperature of self-distillation
    label_smoothing: float = 0.0  # of the cross-entropy targets
    # Mixup/CutMix through timm (off when both alphas are 0); label_smoothing goes into the mixed targets.
    mixup: float = 0.0  # mixup alpha
    cutmix: float = 0.0  # cutmix alpha
    mixup_prob: float = 1.0  # probability of mixing a batch
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    mixup_mode: str = "batch"  # batch | pair | elem
    # Exponential moving average of the weights, evaluated each epoch and saved in the checkpoint.
    ema: bool = True
    ema_decay: float = 0.9999  # decay of the weights' moving average
    ema_warmup: bool = True  # decay ramps up as 1 - (1 + step)^(-2/3) (timm), capped at ema_decay
    # Speed and devices.
    threads: int = 1  # CPU threads of the run (torch); part of its identity: the thread count changes the numbers
    channels_last: bool = True  # NHWC tensors: several times faster depthwise convolutions on CPU
    # Mixed precision on CUDA (ignored with a warning elsewhere): bf16 autocast, or fp16 autocast with a
    # gradient scaler (GPUs without bfloat16: V100, T4); null/false: float32. true means bf16.
    amp: Any = False
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA only, as torch's SyncBatchNorm)
    freeze_bn: bool = False  # BatchNorm layers normalise with their running statistics and do not update them
    deterministic: bool = False  # deterministic CUDA kernels (cuDNN, cuBLAS); CPU runs always use deterministic ones
    # The global batch (processes x batch_size x accum_steps) the recipe's lr is for: another global batch
    # is logged with the lr that linear scaling gives, and scale_lr applies it (lr and min_lr).
    reference_batch: Optional[int] = None
    scale_lr: bool = False  # apply the linearly scaled lr (and min_lr) for another global batch
    compile: bool = False  # torch.compile the training forward (the first steps compile; evaluation stays eager)
    # Reporting.
    eval_every: int = 1  # evaluate calibration and test splits every N epochs (and always after the last)
    # every: the calibration split at each of those evaluations; end: only after the last epoch (the test
    # split still every eval_every epochs; thresholds are chosen on logits collected after training anyway).
    eval_calib: str = "every"
    progress: Optional[bool] = None  # tqdm bar per epoch; None: only on a terminal
    tensorboard: bool = True  # scalars under <run_dir>/tb
    # Long runs (neither is part of a run's identity: they change what a requeue costs, not the weights).
    checkpoint_minutes: Optional[float] = None  # also checkpoint within an epoch every N minutes; None: at epoch ends
    dist_timeout_min: float = 30.0  # how long the processes of a run wait for each other (NCCL, gloo)


def _positive_int(cfg: TrainConfig, name: str, allow_none: bool = False) -> None:
    value = getattr(cfg, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"train.{name} must be a positive integer, got {value!r}")


def _number(cfg: TrainConfig, name: str, low: float, high: float = math.inf, low_open: bool = False,
            allow_none: bool = False) -> None:
    value = getattr(cfg, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"train.{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"train.{name} must be in {interval}, got {value!r}")


AMP_MODES = (None, False, True, "bf16", "fp16")


def amp_mode(amp: Any) -> Optional[str]:
    """``train.amp`` as "bf16", "fp16" or None (``true`` is bf16, ``false`` none)."""
    if amp not in AMP_MODES:
        raise ValueError(f"train.amp must be bf16, fp16 or null (true/false: bf16/none), got {amp!r}")
    return "bf16" if amp is True else (amp or None)


def validate_train_config(cfg: TrainConfig) -> None:
    """Raises ValueError/TypeError naming the first bad field of ``cfg`` (field names as ``train.<name>``)."""
    for name in ("epochs", "batch_size", "accum_steps", "eval_every", "threads"):
        _positive_int(cfg, name)
    _positive_int(cfg, "eval_batch_size", allow_none=True)
    _number(cfg, "lr", 0.0, low_open=True)
    _number(cfg, "min_lr", 0.0)
    if cfg.min_lr > cfg.lr:
        raise ValueError(f"train.min_lr ({cfg.min_lr:g}) must not exceed train.lr ({cfg.lr:g})")
    _number(cfg, "warmup_epochs", 0.0, float(cfg.epochs))
    _number(cfg, "weight_decay", 0.0)
    _number(cfg, "eps", 0.0, low_open=True)
    if len(cfg.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in cfg.betas):
        raise ValueError(f"train.betas must be two numbers in [0, 1), got {list(cfg.betas)!r}")
    _check_optimizer_and_schedule(cfg)
    _number(cfg, "clip_grad", 0.0, low_open=True, allow_none=True)
    for exit_name, weight in cfg.loss_weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"train.loss_weights.{exit_name} must be a number >= 0, got {weight!r}")
    _number(cfg, "distill_alpha", 0.0)
    _number(cfg, "distill_temperature", 0.0, low_open=True)
    _number(cfg, "label_smoothing", 0.0, 1.0)
    if cfg.label_smoothing == 1.0:
        raise ValueError("train.label_smoothing must be below 1")
    for name in ("mixup", "cutmix"):
        _number(cfg, name, 0.0)
    for name in ("mixup_prob", "mixup_switch_prob"):
        _number(cfg, name, 0.0, 1.0)
    if cfg.mixup_mode not in MIXUP_MODES:
        raise ValueError(f"train.mixup_mode must be one of {', '.join(MIXUP_MODES)}, got {cfg.mixup_mode!r}")
    if uses_mixup(cfg) and cfg.batch_size % 2:
        raise ValueError(f"train.batch_size must be even with mixup/cutmix (timm mixes a batch with its "
                         f"mirror), got {cfg.batch_size}")
    _number(cfg, "ema_decay", 0.0, 1.0)
    if cfg.eval_calib not in EVAL_CALIB:
        raise ValueError(f"train.eval_calib must be one of {', '.join(EVAL_CALIB)}, got {cfg.eval_calib!r}")
    _number(cfg, "checkpoint_minutes", 0.0, low_open=True, allow_none=True)
    _number(cfg, "dist_timeout_min", 0.0, low_open=True)
    _positive_int(cfg, "reference_batch", allow_none=True)
    if cfg.scale_lr and cfg.reference_batch is None:
        raise ValueError("train.scale_lr needs train.reference_batch (the global batch the lr is for)")
    if cfg.amp not in AMP_MODES:
        raise ValueError(f"train.amp must be bf16, fp16 or null (true/false: bf16/none), got {cfg.amp!r}")
    if cfg.sync_bn and cfg.freeze_bn:
        raise ValueError("train.sync_bn and train.freeze_bn exclude each other (frozen BatchNorm has no "
                         "batch statistics to synchronise)")


def _check_optimizer_and_schedule(cfg: TrainConfig) -> None:
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    _number(cfg, "momentum", 0.0, 1.0)
    if cfg.momentum == 1.0:
        raise ValueError("train.momentum must be below 1")
    if cfg.optimizer == "sgd" and cfg.nesterov and cfg.momentum == 0:
        raise ValueError("train.nesterov needs train.momentum > 0")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    _number(cfg, "lr_decay", 0.0, 1.0, low_open=True)
    milestones = list(cfg.milestones)
    if not all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in milestones):
        raise TypeError(f"train.milestones must be numbers (fractions of the epochs), got {milestones!r}")
    if cfg.schedule == "multistep":
        if not milestones or any(not 0.0 < m < 1.0 for m in milestones) or milestones != sorted(set(milestones)):
            raise ValueError(f"train.milestones must be increasing fractions of the epochs in (0, 1), e.g. "
                             f"[0.5, 0.75], got {milestones!r}")
        first = milestone_epochs(milestones, cfg.epochs)[0]
        if first < cfg.warmup_epochs:
            raise ValueError(f"train.milestones: the first decay ({milestones[0]:g} x {cfg.epochs} epochs: epoch "
                             f"{first}) comes before the warm-up ends (train.warmup_epochs={cfg.warmup_epochs:g})")


def milestone_epochs(milestones: list[float], epochs: int) -> list[int]:
    """The epoch (counted from 0) from which each milestone, a fraction of ``epochs``, decays: the nearest
    to ``fraction * epochs``, halves rounded up (so 0.5 of 5 epochs is epoch 3, as MSDNet's reference
    ``epoch >= 0.5 * epochs``; 0.6666667 of 90 is epoch 60). The fraction is taken as the decimal it prints
    as, so 0.7 of 10 epochs is exactly 7 (the float product is 7.000000000000001)."""
    return [math.floor(Fraction(repr(float(m))) * epochs + Fraction(1, 2)) for m in milestones]


def uses_mixup(cfg: TrainConfig) -> bool:
    return cfg.mixup > 0 or cfg.cutmix > 0


@dataclass
class EvalConfig:
    grid: str = "full"  # budgeted-protocol grid: "full" (first exit to last), "official" or "msdnet"
    criterion: str = "max_softmax"  # max_softmax | entropy | margin
    budgets: list[float] = field(default_factory=list)  # GMACs at which runs.csv reports test accuracy
    batch_size: int = 256  # images per batch when collecting a run's logits
    use_ema: bool = False  # evaluate the EMA weights instead of the trained ones
    compile: bool = False  # torch.compile the model that collects a run's logits (the same logits, faster on GPUs)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0  # seeds the weights, the batches and the augmentations (not the data split: data.split_seed)


def exit_loss_weights(exit_names: Sequence[str], weights: Mapping[str, float]) -> dict[str, float]:
    """The loss weights a model with ``exit_names`` trains with. ``train.loss_weights`` starts from the
    default for Dyn-Perceiver's exits, and a spec's weights are merged into it; for a model with other exits
    (MSDNet, branchy, a factory's model) the default entries of exits it lacks are dropped, and the default
    alone means 1.0 for every exit."""
    names = set(exit_names)
    given = {k: v for k, v in weights.items()
             if k in names or k not in DEFAULT_LOSS_WEIGHTS or v != DEFAULT_LOSS_WEIGHTS[k]}
    if not given and names != set(DEFAULT_LOSS_WEIGHTS):
        return dict.fromkeys(exit_names, 1.0)
    return given if names != set(DEFAULT_LOSS_WEIGHTS) else dict(weights)


def check_exit_weights(exit_names: Sequence[str], weights: Mapping[str, float]) -> list[float]:
    """The weights in exit order; ValueError naming any exit the model lacks or any exit without a weight."""
    names = list(exit_names)
    unknown = [k for k in weights if k not in names]
    if unknown:
        raise ValueError(f"train.loss_weights: {', '.join(repr(k) for k in unknown)} "
                         f"{'is not an exit' if len(unknown) == 1 else 'are not exits'} of this model "
                         f"(its exits: {', '.join(names)})")
    missing = [k for k in names if k not in weights]
    if missing:
        raise ValueError(f"train.loss_weights: no weight for exit(s) {', '.join(missing)} "
                         f"(the model's exits: {', '.join(names)}; give 0 to leave one out)")
    return [float(weights[k]) for k in names]


def validate_run_config(cfg: RunConfig, import_factories: bool = True) -> None:
    """Every check of a run's values that needs no data: the model (preset and overrides, or factory; a
    model other than a Dyn-Perceiver is built to learn its exits), data, train (with the loss weights against
    the model's exits) and eval sections (the grid against the number of exits). Raises ValueError/TypeError
    naming the first bad key.

    ``import_factories=False`` (a configuration read from a run or results folder: data, not code): a
    factory's name is checked for its form but never imported, so the checks that need its model's exits
    are skipped."""
    from dynexit.yaml_files import key_in_message

    check_finite(to_container(cfg))
    check_seed(cfg.seed, "seed")
    _check_op_handles(cfg.model, import_factories)
    exit_names: tuple[str, ...] = ()  # unknown without importing a factory: the checks that need them skipped
    if cfg.model.factory is not None and not import_factories:
        _check_factory_section(cfg.model)
    else:
        try:
            exit_names = _checked_model(cfg.model)
        except (ValueError, TypeError) as err:  # the model families speak of their own fields: name the key
            key = key_in_message(str(err))
            raise type(err)(f"{key}: {err}" if key and key not in str(err) else str(err)) from None
    validate_data_config(cfg.data, import_factories)
    validate_train_config(cfg.train)
    if len(exit_names) > 1:  # one exit: plain cross-entropy, the weights are not used
        check_exit_weights(exit_names, exit_loss_weights(exit_names, cfg.train.loss_weights))
    validate_eval_config(cfg.eval)
    if len(exit_names) > 1:
        from dynexit.policies import resolve_grid

        try:
            resolve_grid(cfg.eval.grid, len(exit_names))
        except ValueError as err:
            raise ValueError(f"eval.grid: {err} (the model has {len(exit_names)} exits)") from None


def _check_op_handles(cfg: Any, import_functions: bool) -> None:
    from dynexit.costs import resolve_handles

    try:
        resolve_handles(cfg.op_handles, import_functions)
    except (ValueError, TypeError) as err:
        raise type(err)(f"model.op_handles: {err}") from None


def _check_factory_section(cfg: Any) -> None:
    """The checks of a factory's model section that import nothing: the name's form and the given costs."""
    from dynexit.models.interface import check_factory_name

    try:
        check_factory_name(cfg.factory)
    except ValueError as err:
        raise ValueError(f"model.factory: {err}") from None
    if cfg.costs is not None:
        _check_costs(list(cfg.costs), None)


def _check_costs(costs: list[float], names: tuple[str, ...] | None) -> None:
    if (names is not None and len(costs) != len(names)) or not all(
            math.isfinite(c) and c > 0 for c in costs) or any(b <= a for a, b in zip(costs, costs[1:])):
        count = f"{len(names)} positive GMACs, one per exit ({', '.join(names)})" if names else "positive GMACs"
        raise ValueError(f"model.costs must be {count}, increasing, got {costs!r}")


def _checked_model(cfg: Any) -> tuple[str, ...]:
    """The exit names of the model section ``cfg``, after checking that it builds and that its costs can be
    known (counted through its segments, or given in ``model.costs``)."""
    from dynexit.models import FAMILIES
    from dynexit.models.interface import has_segments

    family = model_family(cfg)
    if family != "factory" and FAMILIES[family].exit_names is not None and cfg.costs is None:
        return model_exit_names(cfg)
    model = build_configured_model(cfg)
    names = tuple(model.exit_names)
    if cfg.costs is not None:
        _check_costs(list(cfg.costs), names)
    elif not has_segments(model):
        raise ValueError(f"model.costs: {type(model).__name__} has no init_state/run_segment, so dynexit cannot "
                         f"count its per-exit costs; give them as model.costs: [GMACs of {', '.join(names)}]")
    return names


def validate_eval_config(cfg: EvalConfig) -> None:
    from dynexit.policies import CRITERIA, GRIDS

    if cfg.grid not in GRIDS:
        raise ValueError(f"eval.grid must be one of {', '.join(GRIDS)}, got {cfg.grid!r}")
    if cfg.criterion not in CRITERIA:
        raise ValueError(f"eval.criterion must be one of {', '.join(CRITERIA)}, got {cfg.criterion!r}")
    for budget in cfg.budgets:
        if not math.isfinite(budget) or budget <= 0:
            raise ValueError(f"eval.budgets must be positive GMACs, got {budget!r}")
    if cfg.batch_size < 1:
        raise ValueError(f"eval.batch_size must be a positive integer, got {cfg.batch_size!r}")


def to_container(cfg: Any) -> dict[str, Any]:
    """A plain dict of a dataclass config (for YAML, hashing, CSV columns); the model section's
    ``NEW_MODEL_KEYS`` only when set."""
    tree = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    for section, fields, new in (("model", MODEL_FIELDS, NEW_MODEL_KEYS), ("data", DATA_FIELDS, NEW_DATA_KEYS)):
        part = tree.get(section) if isinstance(tree, dict) else None
        if isinstance(part, dict) and fields.issuperset(part):
            for key in new:
                if part.get(key, 0) is None:
                    del part[key]
    return tree


def merge(schema: Any, *sources: Any, where: str = "config") -> Any:
    """Merges dicts/DictConfigs onto the structured ``schema`` and returns the dataclass object.

    Errors name the key path and ``where`` (a file name, or "--set").
    """
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, *(_fold_model_options(source) for source in sources))
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


def load_run_config(path: str | Path, overrides: list[str] | None = None, import_factories: bool = True) -> RunConfig:
    """Reads a run configuration YAML file (plus ``--set`` overrides) into a validated RunConfig.

    ``import_factories=False`` for a file dynexit wrote (a run folder's config.yaml): a factory it names is
    data, never imported (see validate_run_config)."""
    from dynexit.yaml_files import key_in_message, line_note, read_yaml

    path = Path(path)
    raw = read_yaml(path, "config file")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a run configuration is a mapping of sections "
                         f"({', '.join(f.name for f in dataclasses.fields(RunConfig))}), got {type(raw).__name__}")
    try:
        cfg = merge(RunConfig, raw, where=str(path))
    except ValueError as err:
        raise ValueError(f"{err}{line_note(path, str(err))}") from None
    if overrides:
        cfg = merge(cfg, parse_set(overrides), where="--set")
    try:
        validate_run_config(cfg, import_factories)  # errors now, before anything runs
    except (ValueError, TypeError) as err:
        key = key_in_message(str(err))
        given = set(_dotted_keys(OmegaConf.to_container(parse_set(overrides)))) if overrides else set()
        if key is not None and key in given:
            raise type(err)(f"--set: {err}") from None
        raise type(err)(f"{path}: {err}{line_note(path, str(err))}") from None
    return cfg


def _dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys += _dotted_keys(value, f"{prefix}{key}.")
    return keys


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Writes a config as YAML, atomically."""
    from dynexit.utils import atomic_write_text

    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(to_container(cfg))))  # unused new model keys left out
